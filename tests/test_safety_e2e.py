"""The safety checker through runsync: flagged results are never stored, clean ones are, per-image flags and cost."""

from __future__ import annotations

import base64

import pytest
import torch
from PIL import Image
from support.images import photo_like, to_bytes
from support.responses import completed_output
from support.s3 import s3_client
from support.safety_checkers import write_sensitive_checker, write_separating_checker

PROMPT = "a quiet harbour at dawn"
FLAGGED_SEED, CLEAN_SEED = 100, 101
STEPS = 2  # the worker's DEFAULT_STEPS (support.tiny_worker)


def generate_like_the_worker(folder, seed: int):
    """The image the worker will produce for (PROMPT, seed, 256x256): same pipeline, same call."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt=PROMPT, negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=STEPS, width=256, height=256,
        generator=[torch.Generator("cpu").manual_seed(seed)],
    ).images[0]


@pytest.fixture(scope="module")
def sensitive_checker(tiny_models, tmp_path_factory):
    flagged = generate_like_the_worker(tiny_models["qwen-image"], FLAGGED_SEED)
    clean = generate_like_the_worker(tiny_models["qwen-image"], CLEAN_SEED)
    return write_separating_checker(
        tiny_models["safety-checker"], tmp_path_factory.mktemp("checker") / "sensitive", [flagged], [clean]
    )


@pytest.fixture(scope="module")
def bucket(s3_server):
    s3_client(s3_server).create_bucket(Bucket="safety")
    return "safety"


@pytest.fixture(scope="module")
def worker(start_worker, sensitive_checker, s3_server, bucket):
    with start_worker(
        SAFETY_CHECKER_MODEL=str(sensitive_checker),
        BUCKET_ENDPOINT_URL=s3_server.endpoint_url,
        BUCKET_ACCESS_KEY_ID=s3_server.access_key,
        BUCKET_SECRET_ACCESS_KEY=s3_server.secret_key,
        BUCKET_NAME=bucket,
    ) as server:
        yield server


def objects(s3_server, bucket: str) -> list[str]:
    listing = s3_client(s3_server).list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def job(seed: int, **extra):
    return {"prompt": PROMPT, "size": "256*256", "seed": seed, **extra}


def test_flagged_image_fails_and_nothing_is_uploaded(worker, s3_server, bucket):
    before = objects(s3_server, bucket)
    body = worker.runsync(job(FLAGGED_SEED))
    assert body["status"] == "FAILED"
    assert body["error"] == "the generated image was flagged by the safety checker"
    assert objects(s3_server, bucket) == before


def test_clean_image_is_delivered_with_its_flag(worker, s3_server, bucket):
    output = completed_output(worker.runsync(job(CLEAN_SEED)))
    assert output["has_nsfw_concepts"] == [False] and output["safety_checker"] == "enabled"
    assert any(key.endswith("/0.png") for key in objects(s3_server, bucket))


def test_request_may_disable_the_check(worker):
    output = completed_output(worker.runsync(job(FLAGGED_SEED, enable_safety_checker=False)))
    assert output["safety_checker"] == "disabled by request" and "has_nsfw_concepts" not in output
    assert (
        completed_output(worker.runsync(job(FLAGGED_SEED, disable_safety_checker=True)))["safety_checker"]
        == "disabled by request"
    )


def test_mixed_batch_delivers_only_clean_images_and_charges_for_them(worker, s3_server, bucket):
    body = worker.runsync(job(FLAGGED_SEED, num_images=2))  # seeds 100 (flagged) and 101 (clean)
    output = completed_output(body)
    assert output["has_nsfw_concepts"] == [True, False]
    assert [image["seed"] for image in output["images"]] == [CLEAN_SEED]
    assert output["cost"] == pytest.approx(256 * 256 / 1e6 * 0.02, abs=1e-8)
    assert "1 of 2 images were flagged" in " ".join(output["notes"])
    keys = [key for key in objects(s3_server, bucket) if key.startswith(body["id"] + "/")]
    assert keys == [f"{body['id']}/0.png"]  # only the delivered image was stored


def test_missing_checker_fails_every_job_and_names_the_way_out(start_worker, tmp_path):
    with start_worker(SAFETY_CHECKER_MODEL=str(tmp_path / "nothing-here"), timeout=120) as worker:
        body = worker.runsync({"prompt": "a lighthouse"}, timeout=60)
    assert body["status"] == "FAILED", body
    assert body["error"].startswith("The worker could not start: ") and "SAFETY_CHECKER=off" in body["error"]


# Operator policies, in-process on the same real tiny pipeline and checker (no HTTP needed to prove them).


def test_always_checks_even_when_the_request_opts_out(make_worker, sensitive_checker):
    worker = make_worker(SAFETY_CHECKER_MODEL=str(sensitive_checker), SAFETY_CHECKER="always")
    result = worker.handle({"id": "a", "input": job(FLAGGED_SEED, enable_safety_checker=False)})
    assert result == {"error": "the generated image was flagged by the safety checker"}
    assert (
        worker.handle({"id": "b", "input": job(CLEAN_SEED, enable_safety_checker=False)})["safety_checker"]
        == "enforced by operator"
    )


def test_off_loads_no_checker_and_says_so(make_worker, tmp_path):
    worker = make_worker(SAFETY_CHECKER_MODEL=str(tmp_path / "absent"), SAFETY_CHECKER="off")
    result = worker.handle({"id": "c", "input": job(FLAGGED_SEED)})
    assert result["safety_checker"] == "disabled by operator" and "has_nsfw_concepts" not in result


def test_flagged_edit_input_is_refused_before_generating(make_worker, tiny_models, tmp_path):
    flagged_input, clean_input = photo_like(96, 64), Image.new("RGB", (96, 64), (20, 60, 200))
    checker = write_sensitive_checker(tiny_models["safety-checker"], tmp_path / "inputs", flagged_input, clean_input)
    worker = make_worker(
        QWEN_IMAGE_MODEL="none", QWEN_IMAGE_EDIT_MODEL=str(tiny_models["qwen-image-edit"]),
        SAFETY_CHECKER_MODEL=str(checker), SAFETY_CHECK_INPUTS="true", DEFAULT_STEPS="1",
    )
    data_uri = "data:image/png;base64," + base64.b64encode(to_bytes(flagged_input)).decode()
    result = worker.handle({"id": "d", "input": {"prompt": "make it blue", "image": data_uri}})
    assert result == {"error": "the input image (image) was flagged by the safety checker; nothing was generated"}
