"""Runpod serverless entry point for the Qwen-Image worker.

Accepted input shapes (inside the job's ``input``; the README has every field, default and range):

    text-to-image  {"prompt": str, "negative_prompt"?: str, "size"?: "W*H", "seed"?: int,
                    "enable_safety_checker"?: bool, ...}
    edit           {"prompt": str, "image": http(s) URL | data:image/...;base64, URI, "negative_prompt"?: str,
                    "seed"?: int, "output_format"?: "png" | "jpeg", "enable_safety_checker"?: bool, ...}

Output: {"image_url": str, "cost": float, "seed": int, "width": int, "height": int}, or {"error": str} (FAILED).

Run ``python handler.py`` for the SDK's local test mode (reads ./test_input.json), ``python handler.py --rp_serve_api``
for its local HTTP API, and plain ``python -u handler.py`` on Runpod.
"""

from __future__ import annotations

from typing import Any

from qwen_worker.app import create_worker

_worker = None


def handler(job: dict[str, Any]) -> dict[str, Any]:
    global _worker
    if _worker is None:
        _worker = create_worker()
    return _worker.handle(job)


if __name__ == "__main__":
    import runpod

    _worker = create_worker()  # load the models before the first job, not during it
    runpod.serverless.start({"handler": handler})
