"""Runpod serverless entry point for the Qwen-Image worker.

Accepted input shapes (inside the job's ``input``; the README's parameter table has every field, alias, default and
range, and the fal / Replicate / DashScope spellings of each):

    text-to-image  {"prompt": str, "negative_prompt"?: str, "size"?: "W*H" (or width+height, aspect_ratio,
                    image_size), "seed"?: int, "num_images"?: 1..4, "output_format"?: "png" | "jpeg" | "webp",
                    "enable_safety_checker"?: bool, "loras"?: [...], "go_fast"?: bool, "dry_run"?: bool, ...}
    edit           the same, plus "image": http(s) URL | data:image/...;base64, URI, or "images": [1..3 of them]
                   (Edit-Plus); the size follows the (last) input unless given; "match_input_size"?: bool

Output: {"image_url": str, "cost": float, "images": [{"url", "seed", "width", "height", "content_type"}], "seed",
"width", "height", "num_inference_steps", "true_cfg_scale", "safety_checker", "has_nsfw_concepts"?, "timings",
"model": {"id", "revision"}, "notes"?, "warning"?}; a dry run answers a quote ({"dry_run": true, "cost", ...}); a
failure answers {"error": str} and the job is FAILED. A worker that could not start (a missing model, a bad variable)
keeps running and answers every job FAILED with that start-up error, instead of crash-looping.

Run ``python handler.py`` for the SDK's local test mode (reads ./test_input.json), ``python handler.py --rp_serve_api``
for its local HTTP API, and plain ``python -u handler.py`` on Runpod. ``python handler.py --check [--gpu-memory GB]``
says whether this configuration would start and fit the GPU, without loading weights (``qwen_worker.deploy_check``).
"""

from __future__ import annotations

from typing import Any

from qwen_worker.app import StartupFailure, create_worker
from qwen_worker.worker import Worker

_worker: Worker | StartupFailure | None = None


def handler(job: dict[str, Any]) -> dict[str, Any]:
    global _worker
    if _worker is None:
        _worker = create_worker()
    return _worker.handle(job)


if __name__ == "__main__":
    import sys

    if "--check" in sys.argv[1:]:
        from qwen_worker.deploy_check import main

        sys.exit(main(sys.argv[1:]))
    import runpod

    _worker = create_worker()  # load the models before the first job, not during it
    runpod.serverless.start({"handler": handler})
