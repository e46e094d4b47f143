"""The whole path through the runpod SDK's local API, on the tiny pipelines: what a Runpod client sees."""

from __future__ import annotations

import base64

import pytest
from support.file_server import closed_port, file_server
from support.images import photo_like, to_bytes
from support.responses import completed_output, decode_data_uri, open_image

from qwen_worker.schema import SEED_LIMIT

EDIT_PROMPT = "change the trench coat and high heels color to light grey"


@pytest.fixture(scope="module")
def images_server():
    with file_server() as server:
        server.add("/fashion-photo.png", to_bytes(photo_like(120, 80)))
        yield server


@pytest.fixture(scope="module")
def worker(start_worker, tiny_models):
    with start_worker(
        QWEN_IMAGE_EDIT_MODEL=str(tiny_models["qwen-image-edit"]), RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS="true"
    ) as server:
        yield server


def test_runpod_t2i_example_completes(worker):
    body = worker.runsync(
        {
            "prompt": "A fashion-forward woman sitting at cobblestone street in Paris",
            "negative_prompt": "",
            "size": "1328*1328",
            "seed": -1,
            "enable_safety_checker": True,
        }
    )
    output = completed_output(body)
    mime, data = decode_data_uri(output["image_url"])
    image = open_image(data)
    assert (mime, image.format, image.size) == ("image/png", "PNG", (1328, 1328))
    assert output["cost"] == pytest.approx(0.03527168, abs=1e-9)
    assert (output["width"], output["height"]) == (1328, 1328)
    assert isinstance(output["seed"], int) and 0 <= output["seed"] < SEED_LIMIT


@pytest.mark.slow
def test_runpod_edit_example_completes(worker, images_server):
    body = worker.runsync(
        {
            "prompt": EDIT_PROMPT,
            "negative_prompt": "",
            "seed": -1,
            "image": images_server.url("/fashion-photo.png"),
            "output_format": "png",
            "enable_safety_checker": True,
        }
    )
    output = completed_output(body)
    mime, data = decode_data_uri(output["image_url"])
    image = open_image(data)
    # The model keeps the input's 3:2 aspect at about one megapixel (multiples of 32): 1248x832.
    assert (mime, image.format, image.size) == ("image/png", "PNG", (1248, 832))
    assert output["cost"] == pytest.approx(1248 * 832 / 1e6 * 0.02, abs=1e-9)


def test_bad_size_fails_with_runpods_wording_and_next_job_succeeds(worker):
    body = worker.runsync({"prompt": "a cat", "size": "1024x1024"})
    assert body["status"] == "FAILED"
    assert isinstance(body["error"], str) and "size format must be width*height" in body["error"]
    assert completed_output(worker.runsync({"prompt": "a cat", "size": "256*256", "seed": 3}))["width"] == 256


@pytest.mark.parametrize(
    "payload, words",
    [
        ({"prompt": "a cat", "sead": 4}, "'sead'"),
        ({"prompt": "a cat", "seed": "12"}, "seed must be an integer"),
        ({"prompt": "a cat", "enable_safety_checker": "yes"}, "enable_safety_checker must be a boolean"),
        ({"negative_prompt": "x"}, "prompt is required"),
    ],
)
def test_invalid_requests_fail_with_a_string_naming_the_field(worker, payload, words):
    body = worker.runsync(payload)
    assert body["status"] == "FAILED" and isinstance(body["error"], str) and words in body["error"]


def test_same_seed_same_bytes_and_random_seeds_differ(worker):
    request = {"prompt": "a red bicycle", "size": "256*256", "seed": 1234}
    first = completed_output(worker.runsync(request))
    second = completed_output(worker.runsync(request))
    assert first["seed"] == second["seed"] == 1234
    assert decode_data_uri(first["image_url"]) == decode_data_uri(second["image_url"])
    other = completed_output(worker.runsync({**request, "seed": 1235}))
    assert decode_data_uri(other["image_url"]) != decode_data_uri(first["image_url"])

    random_seeds = {completed_output(worker.runsync({**request, "seed": -1}))["seed"] for _ in range(2)}
    assert len(random_seeds) == 2


def test_unreachable_image_fails_as_invalid_image_url(worker, images_server):
    for url in (f"http://127.0.0.1:{closed_port()}/x.png", images_server.url("/nope.png")):
        body = worker.runsync({"prompt": EDIT_PROMPT, "image": url})
        assert body["status"] == "FAILED" and "Invalid image URL" in body["error"], body


def test_logs_do_not_carry_image_data(worker):
    completed_output(worker.runsync({"prompt": "a tree", "size": "256*256", "seed": 5}))
    assert "base64," not in worker.log_text()


def test_base64_as_clients_send_it_is_accepted_and_garbage_refused(worker):
    encoded = base64.b64encode(to_bytes(photo_like(120, 80), "JPEG")).decode()
    wrapped = "\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))  # `base64` output, CRLF
    url_safe = encoded.replace("+", "-").replace("/", "_").rstrip("=")
    for image in (
        encoded,
        wrapped,
        url_safe,
        "data:image/jpeg;base64," + wrapped,
        "data:image/jpeg;base64," + url_safe,
    ):
        quote = completed_output(worker.runsync({"prompt": EDIT_PROMPT, "image": image, "dry_run": True}))
        assert (quote["width"], quote["height"]) == (1248, 832)  # the input's 3:2, so it really was decoded
    for garbage in ("cat.png", "aGVsbG8gd29ybGQ="):
        body = worker.runsync({"prompt": EDIT_PROMPT, "image": garbage})
        assert body["status"] == "FAILED", body
        assert body["error"].startswith("Invalid image URL (image): the value is not an http(s) URL"), body
