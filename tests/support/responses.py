"""Reading a worker's answer: the output of a COMPLETED job, and the image bytes behind an inline data URI."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from typing import Any

from PIL import Image


def completed_output(body: Mapping[str, Any]) -> dict[str, Any]:
    """The ``output`` of a runsync answer, failing the test with the whole answer when the job did not complete."""
    assert body.get("status") == "COMPLETED", body
    return body["output"]


def decode_data_uri(url: str) -> tuple[str, bytes]:
    """(MIME type, bytes) of a ``data:image/...;base64,`` result URL."""
    header, payload = url.split(",", 1)
    assert header.startswith("data:image/") and header.endswith(";base64"), header[:60]
    return header[5:-7], base64.b64decode(payload)


def open_image(data: bytes) -> Image.Image:
    """Decode ``data`` fully (``load()`` raises on a truncated file, which ``open`` alone would not notice)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
