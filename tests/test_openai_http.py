"""The load-balancing HTTP server (SERVE=http) driven by the official ``openai`` SDK, on the tiny pipelines.

One server serves most tests (text-to-image, Edit-Plus, a bucket on the local S3 server, SERVE_MAX_WAITING=1);
others start where a test needs its own process: the start-up and SIGTERM sequence, a failed start, and the queue
worker for Runpod's ``/openai/v1`` job shape.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import openai
import pytest
import requests
from PIL import Image
from support.file_server import file_server
from support.images import photo_like, to_bytes
from support.s3 import s3_client
from support.worker_process import free_port

SMALL = "256x256"


def client_for(server, **options) -> openai.OpenAI:
    # No retries: the SDK would retry 429 and 5xx on its own and hide what the server answered.
    options = {"max_retries": 0, "timeout": 300, **options}
    return openai.OpenAI(base_url=server.url + "/v1", api_key="rp-test-key", **options)


def image_of(item) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item.b64_json)))


def png_file(image: Image.Image, name: str = "input.png") -> tuple[str, bytes, str]:
    return (name, to_bytes(image), "image/png")


@pytest.fixture(scope="module")
def bucket(s3_server):
    s3_client(s3_server).create_bucket(Bucket="openai")
    return "openai"


@pytest.fixture(scope="module")
def server(start_worker, tiny_models, s3_server, bucket):
    with start_worker(
        http=True,
        QWEN_IMAGE_EDIT_MODEL=str(tiny_models["qwen-image-edit-plus"]),
        SERVE_MAX_WAITING="1",
        SERVE_MAX_BODY_BYTES="2000000",
        BUCKET_ENDPOINT_URL=s3_server.endpoint_url,
        BUCKET_ACCESS_KEY_ID=s3_server.access_key,
        BUCKET_SECRET_ACCESS_KEY=s3_server.secret_key,
        BUCKET_NAME=bucket,
        RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS="true",
    ) as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    return client_for(server)


# --- generations -----------------------------------------------------------------------------------------------------


def test_generate_two_images_as_base64(client):
    response = client.images.generate(prompt="a lighthouse", n=2, size=SMALL, extra_body={"seed": 11})
    assert len(response.data) == 2
    images = [image_of(item) for item in response.data]
    assert all(image.format == "PNG" and image.size == (256, 256) for image in images)
    assert images[0].tobytes() != images[1].tobytes()  # seeds 11 and 12
    assert [item.model_extra["seed"] for item in response.data] == [11, 12]
    assert (response.size, response.output_format, response.quality, response.background) == (
        SMALL,
        "png",
        "high",
        "opaque",
    )
    assert response.model_extra["cost"] == pytest.approx(2 * 256 * 256 / 1e6 * 0.02)
    assert response.created > 0


@pytest.mark.parametrize("size, fmt, pil_format", [("512x256", "jpeg", "JPEG"), ("256x384", "webp", "WEBP")])
def test_generate_sizes_and_formats(client, size, fmt, pil_format):
    response = client.images.generate(prompt="a fox", size=size, output_format=fmt, output_compression=80)
    image = image_of(response.data[0])
    assert image.format == pil_format
    assert f"{image.size[0]}x{image.size[1]}" == size == response.size
    assert response.output_format == fmt


def test_generate_url_is_the_bucket_presigned_url(client, s3_server, bucket):
    raw = client.images.with_raw_response.generate(prompt="a boat", size=SMALL, response_format="url")
    response = raw.parse()
    url = response.data[0].url
    assert url.startswith(f"{s3_server.endpoint_url}/{bucket}/") and "X-Amz-Signature=" in url
    assert response.data[0].b64_json is None
    fetched = requests.get(url, timeout=10)
    assert fetched.status_code == 200 and Image.open(io.BytesIO(fetched.content)).size == (256, 256)
    assert float(raw.headers["X-Image-Cost-USD"]) == pytest.approx(256 * 256 / 1e6 * 0.02)


def test_quality_low_without_lightning_runs_high_and_says_so(client):
    response = client.images.generate(prompt="a tree", size=SMALL, quality="low")
    assert response.quality == "high"
    assert any("quality low is not available" in note for note in response.model_extra["notes"])


def test_models_lists_the_loaded_models(client, tiny_models):
    ids = {model.id for model in client.models.list().data}
    assert ids == {str(tiny_models["qwen-image"]), str(tiny_models["qwen-image-edit-plus"])}


# --- edits ---------------------------------------------------------------------------------------------------------


def test_edit_one_image(client):
    response = client.images.edit(image=png_file(photo_like(256, 256)), prompt="make it blue", size=SMALL)
    assert image_of(response.data[0]).size == (256, 256)


def test_edit_several_images(client):
    files = [png_file(photo_like(256, 256, seed=i), f"in{i}.png") for i in range(2)]
    response = client.images.edit(image=files, prompt="combine them", size=SMALL)
    assert image_of(response.data[0]).size == (256, 256)


def inpainting_inputs() -> tuple[Image.Image, Image.Image, tuple[int, int, int, int]]:
    photo = photo_like(256, 256, seed=3)
    box = (96, 96, 160, 160)
    mask = Image.new("RGBA", photo.size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)  # fully transparent: edit here (OpenAI's polarity)
    return photo, mask, box


def outside(image: Image.Image, box: tuple[int, int, int, int]) -> bytes:
    """The pixels outside ``box`` (the box painted black), to compare two images there."""
    copy = image.convert("RGB").copy()
    copy.paste((0, 0, 0), box)
    return copy.tobytes()


def test_edit_with_a_mask_changes_only_the_transparent_pixels(client):
    photo, mask, box = inpainting_inputs()
    response = client.images.edit(image=png_file(photo), mask=png_file(mask, "mask.png"), prompt="a red ball")
    result = image_of(response.data[0])
    assert result.size == photo.size
    assert outside(result, box) == outside(photo, box)
    assert result.crop(box).tobytes() != photo.crop(box).tobytes()


def test_edit_json_body_with_image_urls_and_a_mask(server):
    photo, mask, box = inpainting_inputs()

    def data_uri(image: Image.Image) -> str:
        return "data:image/png;base64," + base64.b64encode(to_bytes(image)).decode()

    body = {"prompt": "a red ball", "images": [{"image_url": data_uri(photo)}], "mask": {"image_url": data_uri(mask)}}
    answer = requests.post(server.url + "/v1/images/edits", json=body, timeout=300)
    assert answer.status_code == 200, answer.text
    result = Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"])))
    assert outside(result, box) == outside(photo, box)


# --- errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, param",
    [
        ({"n": 9}, "n"),
        ({"size": "256*256"}, "size"),
        ({"size": "250x256"}, "size"),
        ({"quality": "ultra"}, "quality"),
        ({"output_format": "gif"}, "output_format"),
        ({"output_compression": 50}, "output_compression"),  # png is lossless
        ({"background": "transparent"}, "background"),  # Qwen-Image draws no alpha (2.1 does)
        ({"moderation": "strict"}, "moderation"),
        ({"model": "gpt-image-1"}, "model"),
        ({"partial_images": 2}, "partial_images"),
        ({"style": "vivid"}, "style"),
        ({"extra_body": {"seed": "x"}}, "seed"),
        ({"extra_body": {"num_inference_steps": 500}}, "num_inference_steps"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
        ({"prompt": ""}, "prompt"),
    ],
)
def test_bad_generation_is_a_400_naming_the_parameter(client, options, param):
    arguments = {"prompt": "a cat", "size": SMALL, **options}
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(**arguments)
    assert caught.value.status_code == 400
    assert caught.value.param == param
    assert param in caught.value.message


def test_stream_is_refused_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a cat", stream=True)
    assert caught.value.param == "stream"


@pytest.mark.parametrize(
    "files, param",
    [
        ({"image": ("notes.txt", b"hello, not an image", "text/plain")}, "image"),
        ({"image": [png_file(photo_like(256, 256)), ("b.png", b"\x89PNG broken", "image/png")]}, "image[1]"),
        ({"image": png_file(photo_like(256, 256)), "mask": png_file(photo_like(256, 256))}, "mask"),  # no alpha
        ({"image": [png_file(photo_like(256, 256))] * 2, "mask": png_file(inpainting_inputs()[1])}, "mask"),
        ({"image": [png_file(photo_like(256, 256))] * 4}, "image"),  # Edit-Plus takes at most three
    ],
)
def test_bad_edit_is_a_400_naming_the_parameter(client, files, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(prompt="edit", **files)
    assert caught.value.param == param, caught.value.message


# --- hostile bodies ------------------------------------------------------------------------------------------------


def raw_request(server, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes as they are and read the status line and body of the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(head + body)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and answer.split(b"\r\n\r\n", 1)[1].endswith(b"}"):
                break
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[1]


def test_oversized_body_is_refused_from_its_content_length_before_it_is_read(server):
    head = (
        b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000000\r\n\r\n"
    )
    status, body = raw_request(server, head)  # not one byte of the gigabyte is sent
    assert status == 413
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_oversized_chunked_body_is_refused_once_it_passes_the_limit(server):
    def chunks():  # a well-formed multipart file of 4 MB against the server's 2 MB limit, sent without a length
        yield b'--abc\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        for _ in range(40):
            yield b"x" * 100_000
        yield b"\r\n--abc--\r\n"

    answer = requests.post(
        server.url + "/v1/images/edits",
        data=chunks(),
        timeout=60,
        headers={"Content-Type": "multipart/form-data; boundary=abc"},
    )
    assert answer.status_code == 413


@pytest.mark.parametrize(
    "content_type, body",
    [
        ("multipart/form-data; boundary=abc", b'--abc\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx'),
        ("multipart/form-data", b"no boundary at all"),
        (
            "multipart/form-data; boundary=abc",
            b"".join(
                b'--abc\r\nContent-Disposition: form-data; name="image[]"; filename="a.png"\r\n\r\nxx\r\n'
                for _ in range(20)
            )
            + b"--abc--\r\n",
        ),
        ("application/json", b"{not json"),
    ],
    ids=["truncated", "no-boundary", "too-many-files", "bad-json"],
)
def test_malformed_bodies_are_400_and_the_next_request_is_served(server, client, content_type, body):
    answer = requests.post(
        server.url + "/v1/images/edits", data=body, headers={"Content-Type": content_type}, timeout=60
    )
    assert answer.status_code == 400, answer.text
    assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
    assert client.images.generate(prompt="still here", size=SMALL).data


# --- backpressure ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def held_job(server) -> Iterator[Future]:
    """An edit that runs (holds the GPU's one place) until the block ends: its input image is served by a file server
    that answers only then. Yields the future of its response, once the worker is downloading that image, so the
    test's steps happen while it runs on any machine, however fast."""
    release = threading.Event()
    with file_server() as files, ThreadPoolExecutor(max_workers=1) as pool:
        url = files.add("/held.png", to_bytes(photo_like(256, 256)))
        files.routes["/held.png"].hold = release
        body = {"prompt": "held", "images": [{"image_url": url}], "size": SMALL}
        running = pool.submit(requests.post, server.url + "/v1/images/edits", json=body, timeout=300)
        try:
            files.wait_for_request("/held.png")
            yield running
        finally:
            release.set()
        answer = running.result(timeout=300)
        assert answer.status_code == 200, answer.text  # the held job itself completes


def test_overload_is_answered_429_with_retry_after_and_every_accepted_request_completes(server):
    client = client_for(server)

    def one(index: int):
        try:
            return client.images.generate(prompt=f"crowd {index}", size=SMALL, extra_body={"num_inference_steps": 4})
        except openai.RateLimitError as err:
            return err

    with ThreadPoolExecutor(max_workers=5) as pool:
        with held_job(server):
            crowd = [pool.submit(one, index) for index in range(5)]
            # The one waiting place goes to one of them; the other four are refused at once, while the job runs.
            deadline = time.monotonic() + 60
            while sum(future.done() for future in crowd) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sum(future.done() for future in crowd) == 4
        results = [future.result(timeout=300) for future in crowd]
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    served = [r for r in results if not isinstance(r, openai.RateLimitError)]
    assert (len(refused), len(served)) == (4, 1)
    assert all(int(err.response.headers["Retry-After"]) >= 1 for err in refused)
    assert all(err.code == "rate_limit_exceeded" for err in refused)
    assert image_of(served[0].data[0]).size == (256, 256)  # the waiting one ran once the held job finished


def test_a_client_that_leaves_while_waiting_frees_its_place(server):
    body = json.dumps({"prompt": "slow", "size": SMALL}).encode()
    head = (
        b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    # A client with a short timeout: a request that is admitted waits behind the held job and times out; one refused
    # is answered 429 at once. Which of the two happens is then the server's decision alone, not the machine's speed.
    impatient = client_for(server, timeout=3)
    with held_job(server):
        leaver = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        leaver.sendall(head + body)  # waits behind the held job: the one waiting place is taken
        time.sleep(1.0)  # for the server to read it: a local request to an idle event loop
        with pytest.raises(openai.RateLimitError):
            impatient.images.generate(prompt="no room", size=SMALL)
        leaver.close()
        deadline = time.monotonic() + 30
        while True:  # until the server has noticed the leaver is gone (promptly: it listens for the disconnect)
            try:
                impatient.images.generate(prompt="room again", size=SMALL)
            except openai.APITimeoutError:
                break  # admitted: it waited behind the held job, in the place the leaver gave up
            except openai.RateLimitError:
                assert time.monotonic() < deadline, "the leaver's place was never freed"
                time.sleep(0.2)
            else:
                raise AssertionError("served while the held job still ran")


# --- the native contract over HTTP -------------------------------------------------------------------------------


def test_runsync_answers_runpods_shape(server):
    answer = requests.post(server.url + "/runsync", json={"input": {"prompt": "a cat", "size": "256*256"}}, timeout=300)
    body = answer.json()
    assert answer.status_code == 200 and body["status"] == "COMPLETED" and body["id"]
    assert body["output"]["width"] == 256 and body["output"]["image_url"].startswith("http")

    failed = requests.post(server.url + "/runsync", json={"input": {"prompt": "a cat", "size": "9*9"}}, timeout=60)
    assert failed.json()["status"] == "FAILED"
    assert failed.json()["error"].startswith("Invalid parameter: size")


# --- start-up, shutdown, failure ----------------------------------------------------------------------------------


def test_ping_goes_204_then_200_url_is_refused_without_a_bucket_and_sigterm_finishes_the_running_job(
    start_worker, tiny_models
):
    process = start_worker(
        http=True,
        wait=False,
        QWEN_IMAGE_EDIT_MODEL=str(tiny_models["qwen-image-edit-plus"]),
        RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS="true",
    )
    codes: list[int] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and codes[-1:] != [200]:
        with contextlib.suppress(requests.ConnectionError):  # not listening yet
            codes.append(requests.get(process.url + "/ping", timeout=2).status_code)
        time.sleep(0.1)
    assert 204 in codes and codes[-1] == 200, codes
    assert set(codes) == {204, 200} and codes.index(200) > codes.index(204)

    client = client_for(process)
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a cat", response_format="url")
    assert caught.value.param == "response_format" and "bucket" in caught.value.message

    with held_job(process) as running, ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(client.images.generate, prompt="waiting", size=SMALL)
        time.sleep(1.0)  # for the server to read it: a local request to an idle event loop
        process.process.send_signal(signal.SIGTERM)
        with pytest.raises(openai.InternalServerError) as refused:
            waiting.result(timeout=60)
        assert refused.value.status_code == 503 and "shutting down" in refused.value.message
        assert not running.done()  # still held: SIGTERM did not cut it; held_job checks it completes
    assert process.process.wait(timeout=60) == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(process.url + "/ping", timeout=2)


def test_failed_start_answers_503_with_the_cause_everywhere(start_worker, tmp_path):
    health = f"http://127.0.0.1:{free_port()}"  # PORT_HEALTH apart from PORT, as an endpoint may set it
    process = start_worker(
        http=True, wait=False, QWEN_IMAGE_MODEL=str(tmp_path / "missing-model"), PORT_HEALTH=health.rsplit(":", 1)[1]
    )
    deadline = time.monotonic() + 180
    status = None
    while time.monotonic() < deadline and status != 503:
        with contextlib.suppress(requests.ConnectionError):  # not listening yet
            status = requests.get(health + "/ping", timeout=2).status_code
        time.sleep(0.2)
    assert status == 503
    ping = requests.get(health + "/ping", timeout=2).json()
    assert "missing-model" in ping["error"]["message"]
    with pytest.raises(openai.InternalServerError) as caught:
        client_for(process).images.generate(prompt="a cat")
    assert caught.value.status_code == 503 and "missing-model" in caught.value.message
    runsync = requests.post(process.url + "/runsync", json={"input": {"prompt": "a cat"}}, timeout=10)
    assert runsync.status_code == 503 and runsync.json()["status"] == "FAILED"
    assert "missing-model" in runsync.json()["error"]
    process.stop()


def test_queue_worker_takes_runpods_openai_job_shape(start_worker):
    with start_worker() as worker:
        generated = worker.runsync(
            {"openai_route": "/v1/images/generations", "openai_input": {"prompt": "a cat", "size": SMALL, "n": 2}}
        )
        assert generated["status"] == "COMPLETED", generated
        output = generated["output"]
        assert len(output["data"]) == 2 and output["size"] == SMALL
        assert Image.open(io.BytesIO(base64.b64decode(output["data"][0]["b64_json"]))).size == (256, 256)

        models = worker.runsync({"openai_route": "/v1/models"})
        assert models["output"]["object"] == "list" and len(models["output"]["data"]) == 1

        refused = worker.runsync({"openai_route": "/v1/images/generations", "openai_input": {"prompt": "x", "n": 9}})
        assert refused["status"] == "FAILED" and refused["error"].startswith("Invalid parameter: n ")
