"""Shared fixtures. Tests talk only to 127.0.0.1 and never put the runpod SDK in production mode."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # fixture helpers (fixtures_http, images, ...)

# Production mode would make the SDK contact Runpod (and 8.8.8.8) at start-up; make sure no test inherits it.
for _name in ("RUNPOD_WEBHOOK_GET_JOB", "RUNPOD_WEBHOOK_PING", "RUNPOD_AI_API_KEY"):
    os.environ.pop(_name, None)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
for _proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
    os.environ.pop(_proxy, None)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny random-weight pipelines, built once per test session by the project's own builder."""
    sys.path.insert(0, str(ROOT / "builder"))
    from tiny_models import build_all

    return build_all(tmp_path_factory.mktemp("tiny-models"))


S3_SECRET = "tests-s3-secret-Zq7"  # fixed so a restarted server accepts the same worker configuration


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SigV4-checking S3 server (OpenStack Swift + s3api) on 127.0.0.1, from scripts/s3_server.py.

    Where Swift is not installed (no root to run scripts/install_s3_server.sh), S3 tests skip loudly; CI sets
    REQUIRE_S3_TESTS=1, which turns that skip into a failure.
    """
    sys.path.insert(0, str(ROOT / "scripts"))
    import s3_server as server

    workdir = tmp_path_factory.mktemp("s3")
    try:
        info = server.start(workdir, secret_key=S3_SECRET, timeout=60)
    except server.S3ServerError as err:
        if os.environ.get("REQUIRE_S3_TESTS") == "1":
            pytest.fail(f"REQUIRE_S3_TESTS=1 but the local S3 server could not start: {err}")
        pytest.skip(f"LOCAL S3 SERVER UNAVAILABLE, S3 tests skipped: {err}")
    yield info
    server.stop(workdir)


def s3_client(info):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=info.endpoint_url,
        aws_access_key_id=info.access_key,
        aws_secret_access_key=info.secret_key,
        region_name=info.region,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
