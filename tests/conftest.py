"""Shared fixtures. Tests talk only to 127.0.0.1 and never put the runpod SDK in production mode.

    tiny_models    {"qwen-image", "qwen-image-edit", "qwen-image-edit-plus", "qwen-image-layered", "qwen-image-2.1",
                   "safety-checker": folder}, built once
    real_size_models  the published checkpoints' headers with no data (builder/real_size_models.py), built once
    start_worker   start_worker(**env, timeout=180) -> WorkerProcess: the real worker process, over HTTP (e2e);
                   http=True: the load-balancing HTTP server (SERVE=http); wait=False: launched, not awaited
    make_worker    make_worker(**env) -> Worker: the same worker in this process, called with worker.handle(job)
    s3_server      the local SigV4 S3 server (scripts/s3_server.py), or a loud skip where Swift is missing

Helpers live in tests/support/ (its __init__ lists them); builder/, scripts/ and tests/ are on sys.path through
pyproject's ``pythonpath``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.progress_receiver import ProgressReceiver
from support.tiny_worker import tiny_worker_env
from support.worker_process import WorkerProcess

if TYPE_CHECKING:
    from qwen_worker.worker import Worker

# Production mode would make the SDK contact Runpod (and 8.8.8.8) at start-up; make sure no test inherits it.
for _name in ("RUNPOD_WEBHOOK_GET_JOB", "RUNPOD_WEBHOOK_PING", "RUNPOD_AI_API_KEY"):
    os.environ.pop(_name, None)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
for _proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
    os.environ.pop(_proxy, None)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that starts a worker process is end-to-end: marked ``e2e`` here, from the fixture it uses, so no
    module has to remember it and ``pytest -m "not e2e"`` is the quick loop."""
    for item in items:
        if "start_worker" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny random-weight pipelines, built once per test session by the project's own builder."""
    from tiny_models import build_all  # builder/tiny_models.py

    return build_all(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def real_size_models(tmp_path_factory) -> dict[str, Path]:
    """Folders laid out like the real repositories whose safetensors files carry the published checkpoints' headers
    and no data (sparse), for the memory plan: ``builder/real_size_models.py``, built once per session (~20 s)."""
    from real_size_models import build_all  # builder/real_size_models.py

    return build_all(tmp_path_factory.mktemp("real-size"))


@pytest.fixture(scope="session")
def start_worker(tiny_models, tmp_path_factory) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: ``start_worker(**env, timeout=180)`` starts ``python handler.py --rp_serve_api`` on the tiny pipelines
    (support.tiny_worker's env, ``env`` on top) and returns it once its API answers.

    Session-scoped so that module-scoped fixtures can use it. Stop a worker where its test or module ends: ``with
    start_worker(...) as worker:`` (or ``worker.stop()``); any still running when the session ends is stopped here.
    Tests that use this fixture are marked ``e2e``.
    """
    started: list[WorkerProcess] = []

    def start(*, timeout: float = 180, http: bool = False, wait: bool = True, **env: str) -> WorkerProcess:
        worker = WorkerProcess(
            tiny_worker_env(tiny_models, **env), tmp_path_factory.mktemp("worker") / "worker.log", http=http
        )
        started.append(worker)
        return worker.start(timeout=timeout) if wait else worker.launch()

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def make_worker(tiny_models) -> Callable[..., Worker]:
    """Factory: ``make_worker(**env)`` builds the worker in this process, as app.create_worker does from the
    environment, on the tiny pipelines (support.tiny_worker's env, ``env`` on top). Faster than a process, and its
    insides (``worker.runner``) are there to inspect. Raises ConfigError where create_worker would refuse to start."""

    # Imported here, not at the top: a run of a few light test files need not load torch and diffusers.
    from qwen_worker.app import build_worker
    from qwen_worker.config import Settings

    def make(**env: str) -> Worker:
        return build_worker(Settings.from_env(tiny_worker_env(tiny_models, **env)))

    return make


S3_SECRET = "tests-s3-secret-Zq7"  # fixed so a restarted server accepts the same worker configuration


@pytest.fixture(scope="module")
def progress_receiver() -> Iterator[ProgressReceiver]:
    """Where a worker started with ``RUNPOD_WEBHOOK_POST_OUTPUT=progress_receiver.url_template`` posts progress."""
    receiver = ProgressReceiver()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SigV4-checking S3 server (OpenStack Swift + s3api) on 127.0.0.1, from scripts/s3_server.py.

    Where Swift is not installed (no root to run scripts/install_s3_server.sh), S3 tests skip loudly; CI sets
    REQUIRE_S3_TESTS=1, which turns that skip into a failure.
    """
    import s3_server as server  # scripts/s3_server.py

    workdir = tmp_path_factory.mktemp("s3")
    try:
        info = server.start(workdir, secret_key=S3_SECRET, timeout=60)
    except server.S3ServerError as err:
        if os.environ.get("REQUIRE_S3_TESTS") == "1":
            pytest.fail(f"REQUIRE_S3_TESTS=1 but the local S3 server could not start: {err}")
        pytest.skip(f"LOCAL S3 SERVER UNAVAILABLE, S3 tests skipped: {err}")
    yield info
    server.stop(workdir)
