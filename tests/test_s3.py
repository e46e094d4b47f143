"""Results uploaded to a real S3-compatible server and returned as genuine presigned URLs, through runsync."""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from support.responses import completed_output, open_image
from support.s3 import s3_client

from qwen_worker.config import Settings
from qwen_worker.storage import S3Store


def worker_env(info, bucket: str, **extra: str) -> dict[str, str]:
    """A worker storing results in ``bucket`` on the local S3 server (``extra`` on top)."""
    return {
        "BUCKET_ENDPOINT_URL": info.endpoint_url,
        "BUCKET_ACCESS_KEY_ID": info.access_key,
        "BUCKET_SECRET_ACCESS_KEY": info.secret_key,
        "BUCKET_NAME": bucket,
        "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS": "true",
        **extra,
    }


@pytest.fixture(scope="module")
def bucket(s3_server):
    s3_client(s3_server).create_bucket(Bucket="results")
    return "results"


@pytest.fixture(scope="module")
def s3_worker(start_worker, s3_server, bucket):
    with start_worker(**worker_env(s3_server, bucket, BUCKET_PREFIX="qwen")) as server:
        yield server


@pytest.mark.parametrize("fmt, mime", [("png", "image/png"), ("jpeg", "image/jpeg")])
def test_url_serves_exactly_the_stored_bytes(s3_worker, s3_server, bucket, fmt, mime):
    output = completed_output(
        s3_worker.runsync({"prompt": "a lighthouse", "size": "256*256", "seed": 9, "output_format": fmt})
    )
    url = output["image_url"]
    assert url.startswith(s3_server.endpoint_url + f"/{bucket}/qwen/test-")
    key = urlsplit(url).path.split(f"/{bucket}/", 1)[1]
    assert key.endswith("/0." + ("jpg" if fmt == "jpeg" else "png"))

    fetched = requests.get(url, timeout=10)  # a plain GET, no credentials: the signature is the authority
    assert fetched.status_code == 200
    assert fetched.headers["Content-Type"] == mime
    stored = s3_client(s3_server).get_object(Bucket=bucket, Key=key)["Body"].read()
    assert fetched.content == stored
    assert open_image(stored).format == ("JPEG" if fmt == "jpeg" else "PNG")
    assert output["cost"] == pytest.approx(256 * 256 / 1e6 * 0.02)


def test_url_lives_seven_days_and_a_tampered_signature_is_refused(s3_worker):
    url = completed_output(s3_worker.runsync({"prompt": "a boat", "size": "256*256", "seed": 1}))["image_url"]
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Expires"] == ["604800"] and query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    signature = query["X-Amz-Signature"][0]
    tampered = url.replace(signature, ("0" if signature[0] != "0" else "1") + signature[1:])
    assert requests.get(tampered, timeout=10).status_code == 403
    assert requests.get(url, timeout=10).status_code == 200


def test_storage_outage_fails_clearly_then_recovers(s3_worker, s3_server):
    import s3_server as server  # scripts/s3_server.py

    port = urlsplit(s3_server.endpoint_url).port
    server.stop(s3_server.workdir)
    try:
        body = s3_worker.runsync({"prompt": "a fox", "size": "256*256"})
        assert body["status"] == "FAILED"
        assert "could not connect to the storage endpoint" in body["error"]
    finally:
        server.start(s3_server.workdir, port=port, secret_key=s3_server.secret_key, timeout=60)
    completed_output(s3_worker.runsync({"prompt": "a fox", "size": "256*256"}))
    assert s3_server.secret_key not in s3_worker.log_text()


def test_missing_bucket_fails_then_short_ttl_url_expires(start_worker, s3_server):
    with start_worker(**worker_env(s3_server, "created-later", IMAGE_URL_TTL_SECONDS="1")) as worker:
        assert "storage check at start-up failed" in worker.log_text()  # warned, did not crash
        body = worker.runsync({"prompt": "a fox", "size": "256*256"})
        assert body["status"] == "FAILED" and "the bucket does not exist" in body["error"]

        s3_client(s3_server).create_bucket(Bucket="created-later")
        url = completed_output(worker.runsync({"prompt": "a fox", "size": "256*256"}))["image_url"]
        assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["1"]
        time.sleep(2.5)
        assert requests.get(url, timeout=10).status_code == 403


def test_wrong_secret_fails_without_leaking_it(start_worker, s3_server, bucket):
    wrong = "not-the-secret-ABC123"
    with start_worker(**worker_env(s3_server, bucket, BUCKET_SECRET_ACCESS_KEY=wrong)) as worker:
        body = worker.runsync({"prompt": "a fox", "size": "256*256"})
        assert body["status"] == "FAILED" and "access denied" in body["error"]
        assert wrong not in body["error"]
        # The worker keeps serving: validation still answers, and nothing killed the process.
        assert worker.runsync({"prompt": ""})["status"] == "FAILED"
        assert worker.process.poll() is None
    assert wrong not in worker.log_text()


def test_upload_fallback_returns_inline_with_a_warning(start_worker, s3_server, bucket):
    with start_worker(**worker_env(s3_server, "no-such-bucket", UPLOAD_FALLBACK="inline")) as worker:
        output = completed_output(worker.runsync({"prompt": "a fox", "size": "256*256"}))
        assert output["image_url"].startswith("data:image/png;base64,")
        assert "bucket does not exist" in output["warning"] and "UPLOAD_FALLBACK=inline" in output["warning"]


def test_client_never_sends_aws_chunked_checksum_trailers():
    # R2, GCS and others reject boto3's default aws-chunked CRC trailers; Swift accepts both, so assert the setting.
    settings = Settings.from_env(
        {"BUCKET_ENDPOINT_URL": "http://127.0.0.1:9", "BUCKET_ACCESS_KEY_ID": "k", "BUCKET_SECRET_ACCESS_KEY": "s",
         "BUCKET_NAME": "b"}
    )
    config = S3Store(settings.bucket)._client.meta.config
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    assert config.signature_version == "s3v4"
