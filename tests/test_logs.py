"""The worker's logs carry job ids, stage timings and errors, and never secrets, presigned URLs' signatures, base64
image data or whole prompts.

Two workers run with S3 configured: one with the right secret (text-to-image with a long prompt, inline and uploaded
results, an edit from a data URI, an edit from a presigned URL, a LoRA from a presigned URL, refused and failing
requests) and one with a wrong, distinctive secret (every upload fails with access denied, the bucket answering
SignatureDoesNotMatch). Everything both printed (the SDK's own lines included, at the worker's default SDK log level
INFO) is then searched.
"""

from __future__ import annotations

import base64
import re
from urllib.parse import parse_qs, urlsplit

import pytest
from support.images import photo_like, to_bytes
from support.s3 import s3_client

pytestmark = pytest.mark.s3

BUCKET = "logs"
WRONG_SECRET = "wrong-Secret-Kq8Vx3NmP0aZ"
MARKER = "ZEBRAQUOKKA7731"
# ~300 characters; the marker sits in the second half, where no log line may reach.
PROMPT = (
    "A quiet harbour at dawn, fishing boats with peeling blue paint, gulls over the breakwater, mist on the water, "
    "soft golden light, 35mm film look, shallow depth of field, and far behind the lighthouse a painted sign reading "
    f"{MARKER} in tall red letters above the old ferry terminal, rendered in fine detail"
)
PROMPT_PREFIX_ALLOWED = 80  # a log line may quote at most this much of a prompt
BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{200,}")


def bucket_env(info, secret: str) -> dict[str, str]:
    return {
        "BUCKET_ENDPOINT_URL": info.endpoint_url,
        "BUCKET_ACCESS_KEY_ID": info.access_key,
        "BUCKET_SECRET_ACCESS_KEY": secret,
        "BUCKET_NAME": BUCKET,
    }


def signature(url: str) -> str:
    return parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]


def lora_bytes(tiny_models, folder) -> bytes:
    import synthetic_loras as lora_files  # here, not at the top: it imports torch
    from diffusers import QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel.from_pretrained(
        tiny_models["qwen-image"] / "transformer", local_files_only=True
    )
    pairs = lora_files.random_pairs(transformer, seed=9)
    return lora_files.write_diffusers(folder / "style.safetensors", pairs).read_bytes()


@pytest.fixture(scope="module")
def run(start_worker, s3_server, tiny_models, tmp_path_factory):
    """Runs every job once; returns (log text of both workers, {name: response}, presigned URLs seen)."""
    client = s3_client(s3_server)
    client.create_bucket(Bucket=BUCKET)
    folder = tmp_path_factory.mktemp("logs")
    # Inputs in the bucket, reached through presigned URLs as a client would send them.
    client.put_object(Bucket=BUCKET, Key="inputs/photo.png", Body=to_bytes(photo_like(96, 64)), ContentType="image/png")
    client.put_object(Bucket=BUCKET, Key="inputs/style.safetensors", Body=lora_bytes(tiny_models, folder))

    def presign(key: str) -> str:
        return client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=600)

    photo_url, lora_url = presign("inputs/photo.png"), presign("inputs/style.safetensors")
    missing_lora_url = presign("inputs/none.safetensors")
    tampered = photo_url.replace(signature(photo_url), "0" * len(signature(photo_url)))
    data_uri = "data:image/png;base64," + base64.b64encode(to_bytes(photo_like(128, 96, seed=2))).decode()
    assert len(data_uri) > 2000

    common = {  # on top of the tiny worker's text-to-image model and checker
        "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS": "true",
        "LORA_CACHE_DIR": str(folder / "loras"),
    }
    edit = {"num_inference_steps": 2, "size": "256*256"}
    jobs = {
        "t2i": {"prompt": PROMPT, "negative_prompt": PROMPT, "size": "256*256", "seed": 3},
        "inline": {"prompt": PROMPT, "size": "256*256", "seed": 4, "sync_mode": True, "num_images": 2},
        "edit_data_uri": {"prompt": PROMPT, "image": data_uri, **edit},
        "edit_presigned": {"prompt": PROMPT, "image": photo_url, **edit},
        "lora_presigned": {"prompt": PROMPT, "size": "256*256", "loras": [{"path": lora_url, "scale": 0.7}]},
        "invalid_size": {"prompt": PROMPT, "size": "1024x1024"},
        "invalid_base64": {"prompt": PROMPT, "image": "data:image/png;base64," + "QUJD" * 2000 + "!", **edit},
        "tampered_url": {"prompt": PROMPT, "image": tampered, **edit},
        "missing_lora": {"prompt": PROMPT, "size": "256*256", "loras": [{"path": missing_lora_url, "scale": 1}]},
    }
    responses = {}
    edit_model = {"QWEN_IMAGE_EDIT_MODEL": str(tiny_models["qwen-image-edit"])}
    right = bucket_env(s3_server, s3_server.secret_key)
    with start_worker(**common, **edit_model, **right) as worker:
        for name, payload in jobs.items():
            responses[name] = worker.runsync(payload)

    with start_worker(**common, **bucket_env(s3_server, WRONG_SECRET)) as wrong:
        responses["upload_denied"] = wrong.runsync({"prompt": PROMPT, "size": "256*256", "seed": 5})

    urls = [photo_url, lora_url, missing_lora_url, tampered]
    for body in responses.values():
        images = (body.get("output") or {}).get("images", [])
        urls += [image["url"] for image in images if image["url"].startswith("http")]
    return worker.log_text() + wrong.log_text(), responses, urls


def test_the_jobs_ran_as_expected(run):
    _, responses, _ = run
    status = {name: body["status"] for name, body in responses.items()}
    assert status == {
        "t2i": "COMPLETED", "inline": "COMPLETED", "edit_data_uri": "COMPLETED", "edit_presigned": "COMPLETED",
        "lora_presigned": "COMPLETED", "invalid_size": "FAILED", "invalid_base64": "FAILED", "tampered_url": "FAILED",
        "missing_lora": "FAILED", "upload_denied": "FAILED",
    }, responses
    assert responses["inline"]["output"]["image_url"].startswith("data:image/png;base64,")
    assert "access denied" in responses["upload_denied"]["error"]
    assert "answered HTTP 403" in responses["tampered_url"]["error"]
    assert "answered HTTP 404" in responses["missing_lora"]["error"]
    assert WRONG_SECRET not in str(responses) and "X-Amz-Signature" not in "".join(
        body.get("error", "") for body in responses.values()
    )


def test_no_secret_key_in_the_logs(run, s3_server):
    logs, _, _ = run
    assert s3_server.secret_key not in logs
    assert WRONG_SECRET not in logs
    # Nor the pieces of the bucket's SignatureDoesNotMatch answer, which quote what the client signed.
    for word in ("SignatureProvided", "StringToSign", "CanonicalRequest", "AWS4-HMAC-SHA256 Credential"):
        assert word not in logs


def test_no_presigned_query_strings_or_signatures(run):
    logs, _, urls = run
    assert len(urls) >= 8
    assert "X-Amz-" not in logs and "Signature=" not in logs
    for url in urls:
        assert signature(url) not in logs
        assert urlsplit(url).query not in logs


def test_no_base64_image_data(run):
    logs, _, _ = run
    runs = BASE64_RUN.findall(logs)
    assert not runs, [run[:80] + "..." for run in runs]
    assert "base64," not in logs


def test_prompts_appear_at_most_as_a_short_prefix(run):
    logs, _, _ = run
    assert MARKER not in logs
    window = 40
    quoted = [
        PROMPT[start:start + window]
        for start in range(PROMPT_PREFIX_ALLOWED - window + 1, len(PROMPT) - window + 1)
        if PROMPT[start:start + window] in logs
    ]
    assert not quoted, quoted[:3]


def test_every_job_id_its_timings_and_its_error_are_logged(run):
    logs, responses, _ = run
    lines = logs.splitlines()
    for name, body in responses.items():
        job_id = body["id"]
        mine = [line for line in lines if job_id in line]
        assert any("Started." in line for line in mine), (name, mine)
        if body["status"] == "COMPLETED":
            timings = [line for line in mine if "timings_ms=" in line]
            assert len(timings) == 1, (name, mine)
            for stage in ("encode_prompt", "denoise", "decode", "encode_image", "upload"):
                assert f"'{stage}': " in timings[0], (stage, timings[0])
            assert any(f"job {job_id} done in " in line for line in mine), (name, mine)
        else:
            failed = [line for line in mine if f"job {job_id} failed: " in line]
            assert len(failed) == 1 and " WARNING " in failed[0], (name, mine)
            assert body["error"][:60] in failed[0], (body["error"], failed[0])


def test_the_sdk_logs_at_info_and_nothing_at_debug(run):
    # At DEBUG the SDK logs every handler output whole ("Handler output: {...}", base64 images and presigned URLs
    # included); the worker sets it to INFO unless RUNPOD_LOG_LEVEL says otherwise.
    logs, _, _ = run
    assert "Log level set to INFO" in logs
    assert not [line for line in logs.splitlines() if line.startswith("DEBUG")]
    assert "Handler output" not in logs and "run_job return" not in logs
