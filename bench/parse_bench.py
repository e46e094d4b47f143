#!/usr/bin/env python3
"""Micro-benchmark of ``parse_request`` per request (not a test; it asserts nothing about time).

Parses a few representative requests (each mode, a fal-dialect request with every alias, LoRAs, and a refused one
with a misspelt field) many times and prints the median and p90 microseconds per parse, one row per request. The
numbers go in docs/PERFORMANCE.md. Parsing does no I/O (URLs are never fetched), so this is the parser alone.

Usage: .venv/bin/python bench/parse_bench.py [-n 2000] [--repeats 7]
Compare two trees by pointing PYTHONPATH at each one's src/.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from typing import Any

from qwen_worker.errors import ValidationError
from qwen_worker.schema import parse_request

URL = "https://example.invalid/photo.png"

REQUESTS: dict[str, dict[str, Any]] = {
    "text-to-image, prompt only": {"prompt": "a red fox in snow"},
    "text-to-image, fal dialect": {
        "prompt": "a red fox in snow", "image_size": "landscape_16_9", "num_images": 2, "guidance_scale": 4,
        "acceleration": "regular", "sync_mode": True, "seed": 7, "output_format": "webp", "output_quality": 90,
        "enable_safety_checker": False, "negative_prompt": "blurry",
    },
    "edit, three images": {"prompt": "put the cat on the sofa", "images": [URL, URL, URL], "match_input_size": True},
    "image-to-image": {"prompt": "a watercolour", "image": URL, "strength": 0.6, "size": "1024*768"},
    "inpainting": {"prompt": "sunflowers", "image": URL, "mask_image": URL, "preserve_unmasked": False},
    "outpainting": {"prompt": "a wide beach", "image": URL, "expand": {"left": 256, "right": 256}},
    "layers": {"image": URL, "layers": 4, "resolution": 640, "seed": 7},
    "controlnet": {"prompt": "a glass house", "control_image": URL, "controlnet_conditioning_scale": 0.8},
    "two LoRAs": {
        "prompt": "a portrait", "loras": [{"path": "https://example.invalid/a.safetensors", "scale": 0.8},
                                          {"path": "style.safetensors", "scale": -1.5}],
    },
    "refused: misspelt field": {"prompt": "a cat", "num_inference_step": 20},
}


def time_one(raw: dict[str, Any], n: int) -> float:
    """Seconds per parse over ``n`` parses."""
    started = time.perf_counter()
    for _ in range(n):
        with contextlib.suppress(ValidationError):
            parse_request(raw)
    return (time.perf_counter() - started) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="parses per timing (default 2000)")
    parser.add_argument("--repeats", type=int, default=7, help="timings per request (default 7)")
    args = parser.parse_args()

    print(f"parse_request, µs per request ({args.repeats} timings of {args.n} parses; load {os.getloadavg()[0]:.1f})")
    print(f"{'request':<30} {'median':>8} {'p90':>8}")
    for name, raw in REQUESTS.items():
        time_one(raw, max(args.n // 10, 1))  # warm-up
        times = sorted(time_one(raw, args.n) * 1e6 for _ in range(args.repeats))
        p90 = times[min(len(times) - 1, round(0.9 * (len(times) - 1)))]
        print(f"{name:<30} {statistics.median(times):8.1f} {p90:8.1f}")


if __name__ == "__main__":
    main()
