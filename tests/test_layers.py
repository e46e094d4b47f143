"""Layer decomposition (Qwen-Image-Layered) through runsync on the tiny layered pipeline: RGBA layers whose alpha
survives encoding and storage, the captioning path without a prompt, the refusals, the dry-run quote, and an endpoint
without the model naming QWEN_IMAGE_LAYERED_MODEL."""

from __future__ import annotations

import base64
import io
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from PIL import Image
from support.images import photo_like, to_bytes
from support.responses import completed_output, decode_data_uri, open_image
from support.s3 import s3_client
from test_qwen21 import png_alpha
from test_s3 import worker_env

PRICE = 0.02  # PRICE_PER_MEGAPIXEL's default


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(to_bytes(image)).decode()


# 3:2, and partly transparent: the worker flattens it onto white and hands the pipeline opaque RGBA.
_SOURCE = photo_like(120, 80).convert("RGBA")
_SOURCE.putalpha(Image.linear_gradient("L").resize(_SOURCE.size))
INPUT = data_uri(_SOURCE)
LAYERED_SIZE = (768, 512)  # resolution 640 at 3:2: sqrt(640² x 1.5) = 784 -> 768, 523 -> 512 (multiples of 32)


@pytest.fixture(scope="module")
def worker(tiny_models, start_worker):
    # The tiny safety checker never flags, so every job also runs the per-layer check on white.
    with start_worker(QWEN_IMAGE_LAYERED_MODEL=str(tiny_models["qwen-image-layered"])) as server:
        yield server


def test_layers_are_rgba_images_whose_alpha_survives_encoding(worker):
    job = {"image": INPUT, "layers": 3, "prompt": "a poster", "seed": 3, "num_inference_steps": 1}
    output = completed_output(worker.runsync(job))
    assert len(output["images"]) == 3 and output["image_url"] == output["images"][0]["url"]
    assert (output["width"], output["height"]) == LAYERED_SIZE
    alphas = []
    for entry in output["images"]:
        assert (entry["width"], entry["height"]) == LAYERED_SIZE and entry["content_type"] == "image/png"
        assert entry["seed"] == 3
        mime, data = decode_data_uri(entry["url"])
        alpha = png_alpha(data)  # read from the bytes: IHDR colour type 6, the alpha plane itself
        rgba = open_image(data)
        assert mime == "image/png" and rgba.mode == "RGBA"
        assert np.array_equal(np.asarray(rgba)[..., 3], alpha)
        alphas.append(alpha)
    assert any(alpha.min() < 255 for alpha in alphas)  # the model's alpha, not opaque planes
    # Every delivered layer is priced, and the dry run quotes the same.
    assert output["cost"] == pytest.approx(3 * LAYERED_SIZE[0] * LAYERED_SIZE[1] / 1e6 * PRICE)
    quote = completed_output(worker.runsync({**job, "dry_run": True}))
    assert quote["task"] == "layers" and quote["cost"] == output["cost"]
    assert (quote["layers"], quote["resolution"], quote["output_format"]) == (3, 640, "png")
    assert (quote["width"], quote["height"]) == LAYERED_SIZE

    # WebP keeps the alpha plane too (losslessly at these settings): the same seed gives the same layers.
    webp = completed_output(worker.runsync({**job, "output_format": "webp"}))
    for entry, alpha in zip(webp["images"], alphas, strict=True):
        mime, data = decode_data_uri(entry["url"])
        decoded = Image.open(io.BytesIO(data))
        assert mime == "image/webp"
        if alpha.min() < 255:  # libwebp drops only a fully opaque layer's alpha plane
            assert decoded.mode == "RGBA"
            assert np.abs(np.asarray(decoded)[..., 3].astype(int) - alpha).max() <= 1


def test_without_a_prompt_the_pipeline_captions_the_image(worker):
    output = completed_output(worker.runsync({"image": INPUT, "layers": 2, "seed": 1, "num_inference_steps": 1}))
    assert len(output["images"]) == 2
    assert open_image(decode_data_uri(output["image_url"])[1]).mode == "RGBA"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"output_format": "jpeg"}, "output_format jpeg has no alpha channel, which layers need: use png or webp"),
        ({"layers": 11}, "layers must be between 2 and 10, got 11"),
        ({"resolution": 800}, "resolution must be 640 or 1024, got 800"),
        ({"size": "512*512"}, "size cannot be combined with layers"),
        ({"num_images": 2}, "num_images must be 1 with layers"),
        ({"strength": 0.5}, "strength cannot be combined with layers"),
        ({"layers": None, "resolution": 640, "prompt": "p"}, "resolution applies only to layer decomposition"),
        ({"image": None}, "layers needs the input image ('image') for layers"),
    ],
)
def test_layer_requests_fail_clearly_through_runsync(worker, fields, message):
    job = {key: value for key, value in {"image": INPUT, "layers": 3, **fields}.items() if value is not None}
    body = worker.runsync(job)
    assert body["status"] == "FAILED" and body["error"].startswith(f"Invalid parameter: {message}"), body


def test_an_endpoint_without_the_model_names_the_variable(tiny_models, start_worker):
    with start_worker(SAFETY_CHECKER="off") as plain:
        body = plain.runsync({"image": INPUT, "layers": 3})
    assert body["status"] == "FAILED", body
    assert "QWEN_IMAGE_LAYERED_MODEL" in body["error"] and "unknown field" not in body["error"], body


@pytest.fixture(scope="module")
def s3_worker(tiny_models, start_worker, s3_server):
    s3_client(s3_server).create_bucket(Bucket="layers")
    env = worker_env(s3_server, "layers", QWEN_IMAGE_LAYERED_MODEL=str(tiny_models["qwen-image-layered"]))
    with start_worker(SAFETY_CHECKER="off", **env) as server:
        yield server


def test_layer_alpha_survives_the_upload_to_the_bucket(s3_worker, s3_server):
    output = completed_output(s3_worker.runsync({"image": INPUT, "layers": 2, "prompt": "p", "seed": 4}))
    for entry in output["images"]:
        fetched = requests.get(entry["url"], timeout=10)  # what a caller downloads: the presigned URL
        key = urlsplit(entry["url"]).path.split("/layers/", 1)[1]
        stored = s3_client(s3_server).get_object(Bucket="layers", Key=key)["Body"].read()
        assert fetched.status_code == 200 and fetched.content == stored
        alpha = png_alpha(fetched.content)
        assert np.array_equal(np.asarray(open_image(fetched.content))[..., 3], alpha)
