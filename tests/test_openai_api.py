"""The OpenAI mapping in this process (openai_api.py): what runs for each quality on endpoints with and without the
Lightning paths, the mask's polarity, and the parameter every error names. The server and the SDK are
tests/test_openai_http.py."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image
from support.images import photo_like, to_bytes
from synthetic_loras import lightning_and_style

from qwen_worker import openai_api
from qwen_worker.openai_api import EDITS, GENERATIONS, ImageInput, OpenAIError, prepare


@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory):
    return lightning_and_style(tiny_models["qwen-image"] / "transformer", tmp_path_factory.mktemp("oai-loras"))


@pytest.fixture(scope="module")
def plain(make_worker):
    return make_worker(SAFETY_CHECKER="off")


@pytest.mark.parametrize(
    "env, quality, runs, acceleration, noted",
    [
        ({"LIGHTNING_LORA": "eight"}, "medium", "medium", "regular", False),
        ({"LIGHTNING_LORA": "eight"}, "low", "high", None, True),  # no 4-step file: falls back to high
        ({"LIGHTNING_LORA": "eight"}, "auto", "high", None, False),
        ({"LIGHTNING_LORA": "eight", "LIGHTNING_FUSE": "true"}, "high", "medium", "regular", True),  # fused only
        ({"LIGHTNING_LORA_4STEP": "four"}, "low", "low", "high", False),
    ],
)
def test_quality_runs_the_fast_path_the_endpoint_has_and_says_when_it_differs(
    make_worker, files, env, quality, runs, acceleration, noted
):
    worker = make_worker(SAFETY_CHECKER="off", **{name: str(files[value]) if value in files else value
                                                  for name, value in env.items()})
    prepared = prepare(worker, GENERATIONS, {"prompt": "a cat", "quality": quality})
    assert prepared.quality == runs
    assert prepared.native.get("acceleration") == acceleration
    assert any(f"quality {quality} is not available" in note for note in prepared.notes) == noted


def test_defaults_are_openai_s(plain):
    prepared = prepare(plain, GENERATIONS, {"prompt": "a cat", "user": "someone@example.com"})
    assert prepared.native == {"prompt": "a cat", "output_format": "png", "sync_mode": True}
    assert "someone" not in repr(prepared)  # user is dropped, never carried
    assert (prepared.quality, prepared.response_format, prepared.background) == ("high", "b64_json", "opaque")


def test_moderation_low_asks_for_no_check(plain):
    assert prepare(plain, GENERATIONS, {"prompt": "a", "moderation": "low"}).native["enable_safety_checker"] is False


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(to_bytes(image)).decode()


def test_the_mask_s_transparent_pixels_become_the_native_white(plain):
    mask = Image.new("RGBA", (64, 64), (10, 20, 30, 255))
    mask.paste((0, 0, 0, 0), (8, 8, 24, 24))
    mask.paste((0, 0, 0, 1), (40, 40, 48, 48))  # almost transparent is kept: only fully transparent is edited
    converted = openai_api.native_mask(ImageInput(data_uri(mask), "mask"), plain)
    native = Image.open(io.BytesIO(base64.b64decode(converted.split(",", 1)[1])))
    assert native.mode == "L" and native.getbbox() == (8, 8, 24, 24)
    assert native.getpixel((10, 10)) == 255 and native.getpixel((44, 44)) == 0


@pytest.mark.parametrize(
    "mask, rule",
    [
        (photo_like(64, 64), "must have an alpha channel"),
        (Image.new("RGBA", (64, 64), (0, 0, 0, 255)), "has no fully transparent pixel"),
    ],
)
def test_a_mask_that_marks_nothing_is_refused_naming_mask(plain, mask, rule):
    prepared = prepare(
        plain, EDITS, {"prompt": "x"}, [ImageInput(data_uri(photo_like(256, 256)), "image")],
        ImageInput(data_uri(mask), "mask"),
    )
    with pytest.raises(OpenAIError) as caught:
        openai_api.execute(plain, prepared, "job")
    assert caught.value.status == 400 and caught.value.param == "mask" and rule in caught.value.message


def test_native_errors_name_the_openai_parameter(plain):
    images = [ImageInput(data_uri(photo_like(64, 64)), f"images[{i}].image_url") for i in range(2)]
    with pytest.raises(OpenAIError) as caught:
        prepare(plain, EDITS, {"prompt": "x"}, images)  # no edit model here, and none takes several images
    assert caught.value.status == 400 and caught.value.param == "model"
    with pytest.raises(OpenAIError) as caught:
        prepare(plain, GENERATIONS, {"prompt": "x", "extra": 1})
    assert caught.value.param == "extra" and caught.value.code == "unknown_parameter"


def test_queue_job_shape_answers_openai_s_objects(plain):
    answer = openai_api.handle_job(plain, {"id": "q", "input": {"openai_route": "/v1/models"}})
    assert answer["object"] == "list" and answer["data"][0]["modes"][0] == "text-to-image"
    refused = openai_api.handle_job(plain, {"id": "q", "input": {"openai_route": "/v1/chat/completions"}})
    assert refused["error"].startswith("Invalid parameter: openai_route must be one of")
    edit = {"openai_route": EDITS, "openai_input": {"prompt": "x", "images": [{"file_id": "file-1"}]}}
    assert "file_id is not supported" in openai_api.handle_job(plain, {"id": "q", "input": edit})["error"]


class BrokenGpuWorker:
    """A stand-in for the Worker whose every job meets a sticky CUDA fault (GenerationError, fatal)."""

    def __init__(self, real) -> None:
        self.settings = real.settings
        self.image_limits = real.image_limits
        self.check = real.check
        self.served_models = real.served_models

    def run(self, job, job_id):
        from qwen_worker.errors import GenerationError

        raise GenerationError("CUDA error: an illegal memory access was encountered", fatal=True)


def test_a_fatal_gpu_fault_answers_500_and_takes_the_worker_out_of_routing(plain):
    from starlette.testclient import TestClient

    from qwen_worker.http_server import Health, JobGate, create_app

    health = Health()
    health.worker = BrokenGpuWorker(plain)
    with TestClient(create_app(health, JobGate(max_waiting=1), 1_000_000)) as client:
        assert client.get("/ping").status_code == 200
        answer = client.post("/v1/images/generations", json={"prompt": "a cat", "size": "256x256"})
        assert answer.status_code == 500 and "illegal memory access" in answer.json()["error"]["message"]
        ping = client.get("/ping")
        assert ping.status_code == 503 and "must be replaced" in ping.json()["error"]["message"]
        assert client.post("/v1/images/generations", json={"prompt": "a cat"}).status_code == 503
