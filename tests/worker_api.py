"""Starts the real worker (``python handler.py --rp_serve_api``) on 127.0.0.1 and calls it like a Runpod client."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
# Variables a test server must never inherit: production mode, proxies, and any real credentials.
_SCRUBBED_PREFIXES = ("RUNPOD_", "BUCKET_", "AWS_", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "QWEN_", "HF_")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class WorkerServer:
    """One worker process serving the SDK's local API. ``log_text()`` returns everything it printed."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        base = {k: v for k, v in os.environ.items() if not k.upper().startswith(_SCRUBBED_PREFIXES)}
        self.env = {
            **base,
            "HF_HUB_OFFLINE": "1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "PYTHONUNBUFFERED": "1",
            "DEFAULT_STEPS": "2",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> "WorkerServer":
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "handler.py", "--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(self.port)],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
            try:
                if requests.get(self.base_url + "/", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"worker did not answer within {timeout} s:\n{self.log_text()[-4000:]}")

    def runsync(self, payload: Mapping[str, Any], timeout: float = 300) -> dict[str, Any]:
        response = requests.post(self.base_url + "/runsync", json={"input": payload}, timeout=timeout)
        response.raise_for_status()
        return response.json()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)


def completed_output(body: Mapping[str, Any]) -> dict[str, Any]:
    assert body.get("status") == "COMPLETED", body
    return body["output"]


def decode_data_uri(url: str) -> tuple[str, bytes]:
    header, payload = url.split(",", 1)
    assert header.startswith("data:image/") and header.endswith(";base64"), header[:60]
    return header[5:-7], base64.b64decode(payload)


def open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
