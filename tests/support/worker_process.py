"""The real worker as Runpod's local test API serves it: ``python handler.py --rp_serve_api`` on 127.0.0.1; or, with
``http=True``, as a load-balancing endpoint serves it: ``SERVE=http python handler.py`` (http_server.py).

Tests get one through the ``start_worker`` fixture (tests/conftest.py); this module is what that fixture returns.
Every wait is bounded: start-up, each request, and the stop (SIGINT, then SIGKILL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[2]
# Variables a test server must never inherit: production mode, proxies, and any real credentials.
_SCRUBBED_PREFIXES = (
    "RUNPOD_", "BUCKET_", "AWS_", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "QWEN_", "HF_", "SERVE", "PORT",
)
STOP_TIMEOUT_S = 15


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class WorkerProcess:
    """One worker process serving the SDK's local API on a free port; ``log_text()`` returns everything it printed.

    The process sees only ``env`` over a scrubbed copy of the test's environment (offline, two steps by default), so
    nothing a developer has exported (credentials, Runpod's production variables, proxies) reaches it. A context
    manager: ``with`` stops it, and so does the ``start_worker`` fixture at the end of the session at the latest.
    """

    def __init__(self, env: Mapping[str, str], log_path: Path, *, http: bool = False) -> None:
        self.port = free_port()
        self.http = http
        self.log_path = log_path
        base = {k: v for k, v in os.environ.items() if not k.upper().startswith(_SCRUBBED_PREFIXES)}
        self.env = {
            **base,
            "HF_HUB_OFFLINE": "1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "PYTHONUNBUFFERED": "1",
            "DEFAULT_STEPS": "2",
            **({"SERVE": "http", "PORT": str(self.port), "SERVE_HOST": "127.0.0.1"} if http else {}),
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> WorkerProcess:
        """Start the process and wait until its API answers (``/ping`` 200 for the HTTP server); raise RuntimeError
        with the log's tail if it exits or does not answer within ``timeout`` seconds."""
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> WorkerProcess:
        """Start the process without waiting for it."""
        command = ["handler.py"] if self.http else [
            "handler.py", "--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(self.port),
        ]
        with open(self.log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [sys.executable, *command],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 180) -> WorkerProcess:
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
            try:
                if requests.get(self.url + ("/ping" if self.http else "/"), timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"worker did not answer within {timeout} s:\n{self.log_text()[-4000:]}")

    def runsync(self, payload: Mapping[str, Any], timeout: float = 300) -> dict[str, Any]:
        """POST ``{"input": payload}`` to /runsync, as a Runpod client does; the answer's JSON body."""
        response = requests.post(self.url + "/runsync", json={"input": payload}, timeout=timeout)
        response.raise_for_status()
        return response.json()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGINT to the process group (what Ctrl-C does), SIGKILL if it is still there after STOP_TIMEOUT_S."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=STOP_TIMEOUT_S)

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()
