#!/usr/bin/env python3
"""Cold start before the weights: process start to ready on the tiny pipelines, beside the floor.

A benchmark, not a test. Each measurement is a fresh process (``--repeat`` times, medians):

- **floor**: ``python -c`` importing what a job needs: torch and diffusers' Qwen-Image classes (the pipeline, its
  transformer and VAE, transformers' Qwen2.5-VL), which pull in some optional packages themselves;
- **worker**: what ``python handler.py`` does before its first job, split into *imports* (``import handler``,
  the runpod SDK and ``qwen_worker.app``, as ``handler.main()`` does), *construction* (``create_worker()``: the
  tiny pipelines loaded through the worker's ``load_pipeline``, the modes built) and *warm-up* (the first
  text-to-image job, 2 steps; compiled endpoints warm up inside construction);
- the packages the worker has imported when ready that the floor does not import, with ``-X importtime``'s own
  time of each (what the endpoint may not need at start-up);
- dtype conversions while loading: every ``_to_copy``/``copy_`` between floating dtypes dispatched during
  ``create_worker()`` (a ``TorchDispatchMode``), with the elements converted: 0 expected (bf16 checkpoints load as
  bf16 on a GPU, the tiny float32 ones as float32 on a CPU).

    .venv/bin/python bench/cold_start.py --repeat 3 --json /tmp/cold.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

FLOOR = (
    "import torch\n"
    "from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel\n"
    "from transformers import Qwen2_5_VLForConditionalGeneration\n"
)

# Run in the child: stage times from the interpreter's start, the modules loaded, the dtype conversions.
WORKER = r"""
import json, sys, time
started = time.perf_counter()
import handler  # noqa: F401  (its own imports: the module the image's CMD runs)
from qwen_worker.runpod_sdk import runpod  # noqa: F401  (what handler.main() imports before loading, on the queue path)
from qwen_worker.app import create_worker
imported = time.perf_counter()
import torch
from torch.utils._python_dispatch import TorchDispatchMode

conversions = []
class Conversions(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        source = args[0] if args else None
        target = kwargs.get("dtype") if name == "_to_copy" else (args[0].dtype if name == "copy_" else None)
        if name == "copy_" and len(args) > 1:
            source = args[1]
        if target is not None and isinstance(source, torch.Tensor) and source.dtype != target \
                and source.dtype.is_floating_point and target.is_floating_point:
            conversions.append((str(source.dtype), str(target), source.numel()))
        return func(*args, **kwargs)

with Conversions():
    worker = create_worker()
constructed = time.perf_counter()
answer = worker.handle({"id": "warm-up", "input": {"prompt": "a lighthouse", "num_inference_steps": 2, "seed": 1}})
warmed = time.perf_counter()
assert "error" not in answer, answer
print("COLD-START " + json.dumps({
    "imports": imported - started, "construction": constructed - imported, "warm_up": warmed - constructed,
    "modules": sorted({name.split(".")[0] for name in sys.modules}),
    "conversions": conversions,
}))
"""


def run(code: str, env: dict[str, str], importtime: bool = False) -> tuple[float, str, str]:
    command = [sys.executable, *(["-X", "importtime"] if importtime else []), "-c", code]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return wall, done.stdout, done.stderr


def self_times(stderr: str) -> dict[str, float]:
    """-X importtime's own (self) microseconds, summed per top-level package."""
    totals: dict[str, float] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, _cumulative, name = line.split(":", 1)[1].split("|")
        top = name.strip().split(".")[0]
        totals[top] = totals.get(top, 0.0) + int(own) / 1e6
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models/tiny", help="the tiny model folders")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="the worker's source (to compare versions)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{args.src}:{ROOT}",
           "QWEN_IMAGE_MODEL": str(args.models / "qwen-image"), "SAFETY_CHECKER": "off",
           "SAFETY_CHECKER_MODEL": "none", "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    for name in ("RUNPOD_WEBHOOK_GET_JOB", "RUNPOD_WEBHOOK_PING", "BUCKET_NAME", "QWEN_IMAGE_EDIT_MODEL"):
        env.pop(name, None)
    floors, workers = [], []
    for _ in range(args.repeat):  # interleaved: the machine's load drifts alike for both
        floors.append(run(FLOOR, env)[0])
        wall, stdout, _ = run(WORKER, env)
        line = next(text for text in stdout.splitlines() if text.startswith("COLD-START "))
        workers.append({"wall": wall, **json.loads(line.removeprefix("COLD-START "))})
    _, floor_out, floor_err = run(FLOOR + "import sys; print('MODULES ' + ' '.join(sorted({n.split('.')[0] for n in "
                                  "sys.modules})))", env, importtime=True)  # fmt: skip
    floor_modules = set(next(t for t in floor_out.splitlines() if t.startswith("MODULES ")).split()[1:])
    _, _, worker_err = run(WORKER, env, importtime=True)
    own = self_times(worker_err)
    extra = sorted(set(workers[-1]["modules"]) - floor_modules, key=lambda name: -own.get(name, 0.0))
    median = {key: statistics.median(w[key] for w in workers) for key in ("wall", "imports", "construction", "warm_up")}
    floor = statistics.median(floors)
    report: dict[str, Any] = {
        "floor_seconds": floor, "floor_samples": floors, "worker": median, "worker_samples": workers,
        "imports_over_floor": median["imports"] / floor,
        "extra_packages": {name: round(own.get(name, 0.0), 4) for name in extra},
        "conversions": workers[-1]["conversions"],
    }  # fmt: skip
    for sample in report["worker_samples"]:
        sample.pop("modules")
    print(f"Cold start on the tiny pipelines, median of {args.repeat} fresh processes, seconds:")
    print("| floor (import torch + Qwen-Image classes) | worker: imports | construction | warm-up (first job) | "
          "process wall | imports / floor |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {floor:.2f} | {median['imports']:.2f} | {median['construction']:.2f} | {median['warm_up']:.2f} | "
          f"{median['wall']:.2f} | {median['imports'] / floor:.2f}x |")
    print()
    print("Packages imported by the ready worker and not by the floor (-X importtime, own time, s):")
    print("  " + ", ".join(f"{name} {seconds:.3f}" for name, seconds in report["extra_packages"].items()))
    print()
    conversions = report["conversions"]
    print(f"dtype conversions while loading: {len(conversions)} "
          f"({sum(n for *_, n in conversions)} elements)" + (f": {conversions[:5]}" if conversions else ""))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
