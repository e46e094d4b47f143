"""The other hosts' parameters through runsync on the tiny pipelines: sizes, aliases, batches, formats, LoRAs,
fast mode, multi-image edit and progress."""

from __future__ import annotations

import time

import numpy as np
import pytest
from support.file_server import file_server
from support.images import photo_like, to_bytes
from support.responses import completed_output, decode_data_uri, open_image
from synthetic_loras import random_pairs, write_diffusers


@pytest.fixture(scope="module")
def lora_dir(tiny_models, tmp_path_factory):
    from diffusers import QwenImageTransformer2DModel

    folder = tmp_path_factory.mktemp("loras")
    transformer = QwenImageTransformer2DModel.from_pretrained(tiny_models["qwen-image"] / "transformer")
    write_diffusers(folder / "style.safetensors", random_pairs(transformer, seed=1))
    write_diffusers(folder / "lightning-8step.safetensors", random_pairs(transformer, seed=2))
    return folder


@pytest.fixture(scope="module")
def files(lora_dir):
    with file_server() as server:
        server.add("/style.safetensors", (lora_dir / "style.safetensors").read_bytes(), "application/octet-stream")
        server.add("/wide.png", to_bytes(photo_like(120, 80)))
        server.add("/tall.png", to_bytes(photo_like(64, 96, seed=2)))
        yield server


@pytest.fixture(scope="module")
def worker(start_worker, tiny_models, lora_dir, progress_receiver, tmp_path_factory):
    with start_worker(
        QWEN_IMAGE_EDIT_MODEL=str(tiny_models["qwen-image-edit-plus"]),
        RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS="true",
        LIGHTNING_LORA=str(lora_dir / "lightning-8step.safetensors"),
        LORA_CACHE_DIR=str(tmp_path_factory.mktemp("lora-cache")),
        # Where the SDK's progress_update posts; a receiver on 127.0.0.1 (production mode stays off).
        RUNPOD_WEBHOOK_POST_OUTPUT=progress_receiver.url_template,
    ) as server:
        yield server


def image_of(output: dict, index: int = 0) -> tuple[str, bytes]:
    url = output["image_url"] if index == 0 else output["images"][index]["url"]
    return decode_data_uri(url)


@pytest.mark.parametrize(
    "fields, size",
    [
        ({"width": 256, "height": 384}, (256, 384)),
        ({"image_size": {"width": 320, "height": 256}}, (320, 256)),
        ({"image_size": "square"}, (512, 512)),
    ],
)
def test_size_forms_give_that_output_size(worker, fields, size):
    output = completed_output(worker.runsync({"prompt": "a kite", "seed": 1, **fields}))
    assert open_image(image_of(output)[1]).size == size == (output["width"], output["height"])


@pytest.mark.parametrize(
    "fields, size",
    [
        ({"aspect_ratio": "16:9"}, (1664, 928)),
        ({"image_size": "optimize_for_quality", "aspect_ratio": "3:4"}, (1104, 1472)),
        ({"image_size": "optimize_for_speed", "aspect_ratio": "16:9"}, (1360, 768)),
        ({"image_size": "landscape_16_9"}, (1024, 576)),
    ],
)
def test_large_size_forms_resolve_in_a_dry_run(worker, fields, size):
    output = completed_output(worker.runsync({"prompt": "a kite", "dry_run": True, "num_images": 2, **fields}))
    assert output["dry_run"] is True and (output["width"], output["height"]) == size
    assert output["cost"] == pytest.approx(2 * size[0] * size[1] / 1e6 * 0.02, abs=1e-8)
    assert "image_url" not in output


def test_cfg_aliases_give_identical_images(worker):
    base = {"prompt": "a lamp", "size": "256*256", "seed": 11}
    outputs = [
        completed_output(worker.runsync({**base, name: 2.5}))
        for name in ("true_cfg_scale", "guidance", "guidance_scale")
    ]
    assert len({image_of(output) for output in outputs}) == 1
    assert all(output["true_cfg_scale"] == 2.5 for output in outputs)
    other = completed_output(worker.runsync({**base, "guidance": 6}))
    assert image_of(other) != image_of(outputs[0])


def test_num_images_are_distinct_reproducible_and_each_paid_for(worker):
    output = completed_output(worker.runsync({"prompt": "a shell", "size": "256*256", "seed": 40, "n": 3}))
    images = [image_of(output, i) for i in range(3)]
    assert len(set(images)) == 3
    assert [entry["seed"] for entry in output["images"]] == [40, 41, 42]
    assert output["cost"] == pytest.approx(3 * 256 * 256 / 1e6 * 0.02, abs=1e-8)
    # Image i of a batch is what seed + i gives alone.
    alone = completed_output(worker.runsync({"prompt": "a shell", "size": "256*256", "seed": 41}))
    difference = np.abs(
        np.asarray(open_image(image_of(alone)[1]), np.int16) - np.asarray(open_image(images[1][1]), np.int16)
    )
    assert difference.max() <= 2  # batched matmuls may round differently in the last bit


def test_output_formats_and_quality(worker):
    base = {"prompt": "a mosaic", "size": "256*256", "seed": 5}
    webp = completed_output(worker.runsync({**base, "output_format": "webp"}))
    mime, data = image_of(webp)
    assert mime == "image/webp" and open_image(data).format == "WEBP"
    low = image_of(completed_output(worker.runsync({**base, "output_format": "jpg", "output_quality": 10})))
    high = image_of(completed_output(worker.runsync({**base, "output_format": "jpeg", "output_quality": 100})))
    assert low[0] == high[0] == "image/jpeg" and len(low[1]) < len(high[1])


def test_enhance_prompt_is_reported_and_sync_mode_inlines(worker):
    output = completed_output(
        worker.runsync({"prompt": "a cat", "size": "256*256", "prompt_extend": True, "sync_mode": True})
    )
    assert output["prompt"] == "a cat, Ultra HD, 4K, cinematic composition."
    assert output["image_url"].startswith("data:image/png;base64,")


def test_lora_changes_the_image_and_leaves_nothing_behind(worker, files):
    base = {"prompt": "a garden", "size": "256*256", "seed": 21}
    plain = image_of(completed_output(worker.runsync(base)))
    styled = image_of(
        completed_output(worker.runsync({**base, "loras": [{"path": files.url("/style.safetensors"), "scale": 1.0}]}))
    )
    assert styled != plain
    assert image_of(completed_output(worker.runsync(base))) == plain
    # Replicate's single-LoRA form is the same LoRA, served from the cache without another download.
    downloads = files.requests.count("/style.safetensors")
    replicate = image_of(completed_output(worker.runsync({**base, "lora_weights": files.url("/style.safetensors")})))
    assert replicate == styled and files.requests.count("/style.safetensors") == downloads


def test_bad_lora_fails_clearly_and_next_job_is_clean(worker, files):
    body = worker.runsync(
        {"prompt": "a garden", "size": "256*256", "loras": [{"path": files.url("/missing.safetensors")}]}
    )
    assert body["status"] == "FAILED" and "Invalid LoRA (loras[0])" in body["error"] and "404" in body["error"]
    completed_output(worker.runsync({"prompt": "a garden", "size": "256*256"}))


def test_fast_mode_runs_the_lightning_schedule_and_reports_it(worker, progress_receiver):
    body = worker.runsync(
        {"prompt": "a bridge", "size": "256*256", "seed": 3, "go_fast": True, "num_inference_steps": 30}
    )
    output = completed_output(body)
    assert (output["num_inference_steps"], output["true_cfg_scale"], output["acceleration"]) == (8, 1.0, "regular")
    assert any("num_inference_steps 30 ignored" in note for note in output["notes"])
    plain = completed_output(
        worker.runsync(
            {"prompt": "a bridge", "size": "256*256", "seed": 3, "num_inference_steps": 8, "true_cfg_scale": 1}
        )
    )
    assert image_of(plain) != image_of(output)  # the Lightning LoRA and scheduler really applied
    # Progress: every ~10% of the 8 steps but never the last, each an IN_PROGRESS post for this job.
    deadline = time.monotonic() + 15  # the SDK posts from fire-and-forget threads: wait for them, boundedly
    while time.monotonic() < deadline and len([1 for job_id, _ in progress_receiver.posts if job_id == body["id"]]) < 7:
        time.sleep(0.1)
    posts = [post for job_id, post in progress_receiver.posts if job_id == body["id"]]
    assert sorted(post["output"]["step"] for post in posts) == [1, 2, 3, 4, 5, 6, 7]
    assert all(post["status"] == "IN_PROGRESS" and post["output"]["total_steps"] == 8 for post in posts)


def test_fast_mode_without_its_file_fails_clearly(worker):
    body = worker.runsync({"prompt": "a bridge", "size": "256*256", "acceleration": "high"})
    assert body["status"] == "FAILED"
    assert "Fast mode (high) is not installed" in body["error"] and "LIGHTNING_LORA_4STEP" in body["error"]


@pytest.mark.slow
def test_multi_image_edit_follows_the_last_image(worker, files):
    output = completed_output(
        worker.runsync(
            {
                "prompt": "put them together",
                "images": [files.url("/wide.png"), files.url("/tall.png")],
                "seed": 2,
                "num_inference_steps": 1,
            }
        )
    )
    mime, data = image_of(output)
    # ~1 MP at the last image's 2:3 aspect, multiples of 32: 832x1248.
    assert mime == "image/jpeg" and open_image(data).size == (832, 1248)


@pytest.mark.slow
def test_match_input_size_returns_the_input_dimensions(worker, files):
    output = completed_output(
        worker.runsync(
            {
                "prompt": "make it blue",
                "image": files.url("/wide.png"),
                "match_input_size": True,
                "num_inference_steps": 1,
                "output_format": "png",
            }
        )
    )
    assert open_image(image_of(output)[1]).size == (120, 80)
    assert output["cost"] == pytest.approx(120 * 80 / 1e6 * 0.02, abs=1e-8)
