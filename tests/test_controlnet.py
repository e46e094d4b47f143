"""ControlNet through runsync on the tiny Qwen-Image pipeline and the tiny ControlNet (its zero-initialised output
blocks randomised by the builder, so it acts): it changes the image, leaves the plain pipeline untouched, and an
endpoint without it names QWEN_IMAGE_CONTROLNET_MODEL."""

from __future__ import annotations

import base64

import pytest
from PIL import Image
from support.images import photo_like, to_bytes
from support.responses import completed_output, decode_data_uri, open_image


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(to_bytes(image)).decode()


CONTROL = data_uri(photo_like(96, 64))  # another size and aspect than the output: resized to it
JOB = {"prompt": "a glass house", "size": "256*256", "seed": 11, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def worker(tiny_models, start_worker):
    with start_worker(QWEN_IMAGE_CONTROLNET_MODEL=str(tiny_models["qwen-image-controlnet"])) as server:
        yield server


def image_bytes(output: dict) -> bytes:
    return decode_data_uri(output["image_url"])[1]


def test_controlnet_changes_the_image_and_leaves_the_plain_pipeline_untouched(worker):
    before = image_bytes(completed_output(worker.runsync(JOB)))
    controlled = completed_output(worker.runsync({**JOB, "control_image": CONTROL}))
    assert (controlled["width"], controlled["height"]) == (256, 256)
    assert image_bytes(controlled) != before  # the same seed, steered by the control image
    softer = completed_output(worker.runsync({**JOB, "control_image": CONTROL, "controlnet_conditioning_scale": 0.3}))
    assert image_bytes(softer) not in (before, image_bytes(controlled))
    after = image_bytes(completed_output(worker.runsync(JOB)))
    assert after == before  # byte-identical: the ControlNet job left no trace on the shared modules
    assert open_image(after).size == (256, 256)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"controlnet_conditioning_scale": 2.5}, "controlnet_conditioning_scale must be between 0 and 2, got 2.5"),
        ({"image": CONTROL}, "image cannot be combined with control_image"),
        ({"control_image": None, "controlnet_conditioning_scale": 1}, "controlnet_conditioning_scale applies only"),
    ],
)
def test_controlnet_requests_fail_clearly_through_runsync(worker, fields, message):
    job = {key: value for key, value in {**JOB, "control_image": CONTROL, **fields}.items() if value is not None}
    body = worker.runsync(job)
    assert body["status"] == "FAILED" and body["error"].startswith(f"Invalid parameter: {message}"), body


def test_an_endpoint_without_a_controlnet_names_the_variable(start_worker):
    with start_worker(SAFETY_CHECKER="off") as plain:
        body = plain.runsync({**JOB, "control_image": CONTROL})
        quote = plain.runsync({**JOB, "dry_run": True})
    assert body["status"] == "FAILED", body
    assert "QWEN_IMAGE_CONTROLNET_MODEL" in body["error"] and "unknown field" not in body["error"], body
    assert completed_output(quote)["task"] == "text-to-image"


def test_a_controlnet_dry_run_quotes_text_to_image_sizes(worker):
    quote = completed_output(worker.runsync({**JOB, "control_image": CONTROL, "dry_run": True}))
    assert quote["task"] == "controlnet" and (quote["width"], quote["height"]) == (256, 256)
