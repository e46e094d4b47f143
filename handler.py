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

The handler also takes the job shape of Runpod's ``/openai/v1`` route, ``{"openai_route": "/v1/images/generations",
"openai_input": {...}}``, and answers OpenAI's response object (openai_api.py).

Run ``python handler.py`` for the SDK's local test mode (reads ./test_input.json), ``python handler.py --rp_serve_api``
for its local HTTP API, and plain ``python -u handler.py`` on Runpod. With ``SERVE=http`` the same command starts the
HTTP server of a load-balancing endpoint instead (OpenAI's Images API and /runsync on ``PORT``; http_server.py).
``python handler.py --check [--gpu-memory GB]`` says whether this configuration would start and fit the GPU, without
loading weights (``qwen_worker.deploy_check``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qwen_worker.app import StartupFailure
    from qwen_worker.worker import Worker

_worker: Worker | StartupFailure | None = None


# The worker's modules (torch, diffusers) are imported where they are used, not here: with SERVE=http the server
# answers /ping (204, loading) while they are still being imported.
def handler(job: dict[str, Any]) -> dict[str, Any]:
    from qwen_worker.app import create_worker
    from qwen_worker.openai_api import handle_job

    global _worker
    if _worker is None:
        _worker = create_worker()
    return handle_job(_worker, job)


def main() -> None:
    import sys

    if "--check" in sys.argv[1:]:
        from qwen_worker.deploy_check import main as check

        sys.exit(check(sys.argv[1:]))

    from qwen_worker.config import ServeSettings
    from qwen_worker.errors import ConfigError

    global _worker
    try:
        serve = ServeSettings.from_env()
    except ConfigError as err:  # nothing can answer without knowing how to serve: say why and stop
        sys.exit(f"The worker cannot start: {err}")
    if serve.mode == "http":
        from qwen_worker.http_server import serve as serve_http

        serve_http(serve)
        return
    from qwen_worker.app import create_worker
    from qwen_worker.runpod_sdk import runpod

    _worker = create_worker()  # load the models before the first job, not during it
    runpod.serverless.start({"handler": handler})


if __name__ == "__main__":
    main()
