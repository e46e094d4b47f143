"""Image-to-image, inpainting and outpainting through runsync on the tiny pipelines, as a caller sees them.

One worker serves text-to-image with an Edit-Plus model (so inpainting runs on the text-to-image inpaint pipeline);
a second, for the slow test only, a plain Qwen-Image-Edit model alone (edit-inpainting, rendered at ~1 MP)."""

from __future__ import annotations

import base64
import time

import numpy as np
import pytest
from PIL import Image
from support.images import photo_like, to_bytes
from support.responses import completed_output, decode_data_uri, open_image


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(to_bytes(image)).decode()


INPUT = photo_like(320, 256)
# Repaint a 120x120 square at (100, 60); drawn at half size so the worker must stretch it over the image.
MASK = Image.new("L", (160, 128), 0)
MASK.paste(255, (50, 30, 110, 90))
MASK_BOX = (100, 60, 220, 180)
SEAM = 32  # the most the paste-back may feather


@pytest.fixture(scope="module")
def worker(tiny_models, progress_receiver, tmp_path_factory, start_worker):
    from diffusers import QwenImageTransformer2DModel
    from synthetic_loras import random_pairs, write_diffusers

    lightning = tmp_path_factory.mktemp("modes-loras") / "lightning-8step.safetensors"
    transformer = QwenImageTransformer2DModel.from_pretrained(tiny_models["qwen-image"] / "transformer")
    write_diffusers(lightning, random_pairs(transformer, seed=2))
    with start_worker(
        QWEN_IMAGE_EDIT_MODEL=str(tiny_models["qwen-image-edit-plus"]),
        LIGHTNING_LORA=str(lightning),
        RUNPOD_WEBHOOK_POST_OUTPUT=progress_receiver.url_template,
    ) as server:
        yield server


def pixels(output: dict, index: int = 0) -> np.ndarray:
    url = output["image_url"] if index == 0 else output["images"][index]["url"]
    return np.asarray(open_image(decode_data_uri(url)[1]).convert("RGB"), dtype=np.int16)


def test_the_from_pipe_modes_are_built_at_start_up(worker):
    log = worker.log_text()
    assert "image-to-image: QwenImageImg2ImgPipeline" in log and "inpainting: QwenImageInpaintPipeline" in log


def test_image_to_image_departs_further_from_the_input_as_strength_grows(worker):
    # 6 steps without true CFG keep it quick: 1, 2, 4 and 6 transformer passes.
    base = {"prompt": "a red barn", "image": data_uri(INPUT), "size": "256*256", "seed": 3, "num_inference_steps": 6}
    outputs = {
        strength: completed_output(worker.runsync({**base, "strength": strength, "true_cfg_scale": 1}))
        for strength in (0.05, 0.3, 0.6, 1.0)
    }
    assert all((output["width"], output["height"]) == (256, 256) for output in outputs.values())
    assert outputs[0.3]["notes"] == ["strength 0.3 runs the last 2 of 6 steps"]
    # Random tiny VAEs lose the input itself; the output at a very small strength stands for it.
    nearly_the_input = pixels(outputs[0.05])
    distances = [float(np.abs(pixels(outputs[s]) - nearly_the_input).mean()) for s in (0.3, 0.6, 1.0)]
    assert 0 < distances[0] < distances[1] < distances[2], distances


def test_image_to_image_follows_the_input_aspect_and_fast_mode_counts_the_steps_it_runs(worker, progress_receiver):
    request = {"prompt": "p", "image": data_uri(INPUT), "strength": 0.5}
    quote = completed_output(worker.runsync({**request, "dry_run": True}))
    # ~1 MP at the input's 5:4, multiples of 16.
    assert (quote["task"], quote["width"], quote["height"], quote["strength"]) == ("image-to-image", 1152, 912, 0.5)
    assert quote["cost"] == pytest.approx(1152 * 912 / 1e6 * 0.02, abs=1e-8)
    body = worker.runsync({**request, "size": "256*256", "go_fast": True, "seed": 1})
    output = completed_output(body)
    assert (output["num_inference_steps"], output["acceleration"]) == (8, "regular")
    assert "strength 0.5 runs the last 4 of 8 steps" in output["notes"]
    deadline = time.monotonic() + 15  # the SDK posts progress from fire-and-forget threads
    while time.monotonic() < deadline and len([1 for job_id, _ in progress_receiver.posts if job_id == body["id"]]) < 3:
        time.sleep(0.1)
    posts = [post["output"] for job_id, post in progress_receiver.posts if job_id == body["id"]]
    assert sorted(post["step"] for post in posts) == [1, 2, 3] and {post["total_steps"] for post in posts} == {4}


def test_inpainting_keeps_every_pixel_outside_the_mask(worker):
    base = {"prompt": "a blue door", "image": data_uri(INPUT), "mask": data_uri(MASK), "seed": 5, "num_images": 2}
    output = completed_output(worker.runsync(base))
    assert (output["width"], output["height"]) == INPUT.size and output["images"][0]["content_type"] == "image/png"
    assert output["cost"] == pytest.approx(2 * 320 * 256 / 1e6 * 0.02, abs=1e-8)
    assert output["has_nsfw_concepts"] == [False, False]  # the safety checker ran on both
    original = np.asarray(INPUT, dtype=np.int16)
    far = np.ones(original.shape[:2], dtype=bool)  # farther than the seam from the mask
    left, top, right, bottom = MASK_BOX
    far[max(0, top - SEAM) : bottom + SEAM, max(0, left - SEAM) : right + SEAM] = False
    inside = np.zeros_like(far)
    inside[top + SEAM : bottom - SEAM, left + SEAM : right - SEAM] = True
    for index in range(2):
        image = pixels(output, index)
        assert (image[far] == original[far]).all()
        assert np.abs(image[inside] - original[inside]).mean() > 10  # and the mask really was repainted
    # Without the paste-back: the pipeline's own output, which the VAE round trip moves everywhere.
    own = completed_output(worker.runsync({**base, "num_images": 1, "preserve_unmasked": False}))
    assert np.abs(pixels(own)[far] - original[far]).mean() > 10


def test_outpainting_returns_the_grown_canvas_with_the_input_inside(worker):
    image = photo_like(288, 256, seed=4)
    output = completed_output(
        worker.runsync({"prompt": "more of the field", "image": data_uri(image), "expand": {"left": 32, "bottom": 16}})
    )
    assert (output["width"], output["height"]) == (320, 272)
    assert output["cost"] == pytest.approx(320 * 272 / 1e6 * 0.02, abs=1e-8)
    result = pixels(output)
    assert (result[0:256, 32:320] == np.asarray(image, dtype=np.int16)).all()
    assert result[:, :32].std() > 0  # the new border was generated, not left blank


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"mask_image": "MASK", "size": "512*512"}, "Invalid parameter: size cannot be combined with mask_image"),
        ({"strength": 0}, "Invalid parameter: strength must be greater than 0"),
        ({"expand": {"left": 8}, "mask": "MASK"}, "Invalid parameter: expand cannot be combined with mask"),
        ({"mask_image": "BLACK"}, "Invalid parameter: mask_image is black everywhere"),
    ],
)
def test_contradictions_fail_clearly_through_runsync(worker, fields, message):
    uris = {"MASK": data_uri(MASK), "BLACK": data_uri(Image.new("L", (16, 16), 0))}
    fields = {name: uris.get(value, value) if isinstance(value, str) else value for name, value in fields.items()}
    body = worker.runsync({"prompt": "p", "image": data_uri(INPUT), **fields})
    assert body["status"] == "FAILED" and body["error"].startswith(message), body


@pytest.fixture(scope="module")
def edit_worker(tiny_models, start_worker):
    with start_worker(
        QWEN_IMAGE_MODEL="none", QWEN_IMAGE_EDIT_MODEL=str(tiny_models["qwen-image-edit"]), SAFETY_CHECKER="off"
    ) as server:
        yield server


@pytest.mark.slow
def test_a_plain_edit_model_inpaints_with_its_instruction_and_returns_the_input_size(edit_worker):
    body = edit_worker.runsync({"prompt": "p", "image": data_uri(INPUT), "strength": 0.5})
    assert body["status"] == "FAILED" and "does not serve image-to-image (strength)" in body["error"]
    assert "QWEN_IMAGE_MODEL" in body["error"]
    request = {"prompt": "paint the door blue", "image": data_uri(INPUT), "mask_url": data_uri(MASK)}
    output = completed_output(edit_worker.runsync({**request, "num_inference_steps": 1}))
    assert (output["width"], output["height"]) == INPUT.size  # rendered at ~1 MP, resized back
    assert "inpainting: QwenImageEditInpaintPipeline" in edit_worker.log_text()
    original, image = np.asarray(INPUT, dtype=np.int16), pixels(output)
    left, top, right, bottom = MASK_BOX
    far = np.ones(original.shape[:2], dtype=bool)
    far[max(0, top - SEAM) : bottom + SEAM, max(0, left - SEAM) : right + SEAM] = False
    assert (image[far] == original[far]).all()
