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
