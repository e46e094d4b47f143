#!/usr/bin/env python3
"""The first GPU run, as one command: everything issue 25 asks of a lent GPU, into one output folder, as it goes.

    python3 bench/gpu_recipe.py --out "$OUT"              # on the GPU machine (docs/PERFORMANCE.md, "GPU recipe")
    .venv/bin/python bench/gpu_recipe.py --tiny --out /tmp/recipe   # the rehearsal on a CPU (tests/test_gpu_recipe.py)

Steps, each with its own time limit, its log written to ``OUT/<step>.log`` while it runs and its outcome added to
``OUT/recipe.json`` when it ends (a step that fails or runs out of time is recorded and the next one runs):

0. ``wheels``: when diffusers cannot be imported and ``.whl/`` holds wheels (the lent machines have torch,
   transformers, peft and accelerate but no diffusers), they are installed with ``pip --target`` into
   ``OUT/../site`` (``--site``) and put on PYTHONPATH for the steps below. ``env``: versions, ``nvidia-smi``.
1. ``models``: the tiny pipelines (``builder/tiny_models.py``), which the step benchmark builds its cut models on,
   when ``--models`` does not hold them already.
2. ``check``: the memory-plan check, ``python handler.py --check``, where handler.py has one (left out otherwise), on
   the tiny pipelines (the lent machines hold no real weights): the planner against this GPU's free memory.
3. ``step_bench``: ``bench/step_bench.py`` on the device, every mode, with CUDA's own sync detection
   (``--cuda-sync-debug``: ``torch.cuda.set_sync_debug_mode("warn")``).
4. ``gpu_bench``: ``bench/gpu_bench.py`` quality (50 steps, CFG 4) and fast (8 steps, Lightning) at 1024².

``--tiny`` runs the same steps on the tiny models on the CPU with small settings: it checks the recipe, not the GPU.
The limits add up to under 10 minutes (``--budget``); each step gets what is left, up to its own share.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BUDGET_SECONDS = 560  # a device call's 600 s, less the start and the copy back


def steps(args: argparse.Namespace, python: str) -> list[tuple[str, list[str], int, dict[str, str]]]:
    """(name, command, its share of the budget in seconds, environment added for it)."""
    out, tiny = args.out, args.tiny
    models = args.models
    step = [python, "bench/step_bench.py", "--models", str(models), "--json", str(out / "step_bench.json")]
    gpu = [python, "bench/gpu_bench.py", "--sizes", "1024", "--modes", "quality", "fast", "--json",
           str(out / "gpu_bench.json")]  # fmt: skip
    if tiny:
        step += ["--tiny", "--modes", "text-to-image"]
        gpu = [python, "bench/gpu_bench.py", "--tiny", "--device", "cpu", "--sizes", "256", "--steps-quality", "2",
               "--json", str(out / "gpu_bench.json")]  # fmt: skip
    else:
        step += ["--device", "cuda", "--cuda-sync-debug"]
    plan: list[tuple[str, list[str], int, dict[str, str]]] = [("env", [python, "-c", ENV_PROBE], 30, {})]
    if not (models / "qwen-image" / "model_index.json").is_file():
        plan.append(("models", [python, "builder/tiny_models.py", str(models)], 120, {}))
    if "--check" in (ROOT / "handler.py").read_text():  # the memory-plan check, where the deploy work has landed
        # On the tiny pipelines: the lent machines hold no real weights. It checks that the planner runs against
        # this GPU's free memory; a real configuration's check needs its weights (docs/PERFORMANCE.md).
        tiny = {"QWEN_IMAGE_MODEL": str(models / "qwen-image"),
                "QWEN_IMAGE_EDIT_MODEL": str(models / "qwen-image-edit"),
                "SAFETY_CHECKER": "off", "SAFETY_CHECKER_MODEL": "none"}  # fmt: skip
        plan.append(("check", [python, "handler.py", "--check"], 60, tiny))
    plan += [("step_bench", step, 200, {}), ("gpu_bench", gpu, 330, {})]
    return plan


ENV_PROBE = """
import importlib, platform, shutil, subprocess
print("python", platform.python_version())
for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "torchao"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
    except ImportError as err:
        print(name, "NOT IMPORTABLE", err)
import torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
print("cuda", torch.cuda.is_available(), torch.version.cuda, gpu)
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
"""


def install_wheels(args: argparse.Namespace, env: dict[str, str], record: dict[str, Any]) -> None:
    """Carried wheels (``.whl/``) into ``--site`` when diffusers is missing: the lent machines have none."""
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if importlib.util.find_spec("diffusers") is not None or not wheels:
        record["wheels"] = {"skipped": "diffusers importable" if wheels else "no .whl/ folder"}
        return
    started = time.perf_counter()
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(args.site), *map(str, wheels)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    (args.out / "wheels.log").write_text(done.stdout + done.stderr)
    record["wheels"] = {"rc": done.returncode, "seconds": round(time.perf_counter() - started, 1),
                        "wheels": [w.name for w in wheels]}  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.site), env.get("PYTHONPATH", "")]))


def run_step(name: str, command: list[str], limit: int, env: dict[str, str], out: Path) -> dict[str, Any]:
    """Run one step with its output going to OUT/<name>.log as it comes (a cut-off run keeps what it wrote)."""
    started = time.perf_counter()
    log_path = out / f"{name}.log"
    print(f"[{name}] {' '.join(command)} (limit {limit} s)", flush=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc: int | str = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            rc = "timed out"
    seconds = round(time.perf_counter() - started, 1)
    print(f"[{name}] {rc} in {seconds} s; log {log_path}", flush=True)
    return {"command": command, "rc": rc, "seconds": seconds, "limit": limit, "log": log_path.name}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "recipe-out")))
    parser.add_argument("--tiny", action="store_true", help="the rehearsal: tiny models on the CPU, small settings")
    parser.add_argument("--models", type=Path, default=None, help="the tiny model folders (built when missing)")
    parser.add_argument("--site", type=Path, default=None, help="where carried wheels are installed")
    parser.add_argument("--budget", type=int, default=BUDGET_SECONDS, help="seconds for all steps together")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.models is None:  # models/tiny where the checkout has it (a symlink that may not travel), else built here
        local = ROOT / "models/tiny"
        built = args.out.resolve().parent / "tiny-models"
        args.models = local if (local / "qwen-image" / "model_index.json").is_file() else built
    args.site = args.site or args.out.resolve().parent / "site"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH", "")]))
    if args.tiny:
        env["CUDA_VISIBLE_DEVICES"] = ""
    deadline = time.monotonic() + args.budget
    record: dict[str, Any] = {"tiny": args.tiny, "budget_seconds": args.budget, "steps": {}, "complete": False}
    install_wheels(args, env, record)
    python = sys.executable if shutil.which(sys.executable) else "python3"
    for name, command, share, extra in steps(args, python):
        left = int(deadline - time.monotonic())
        if left < 10:
            record["steps"][name] = {"rc": "not run: the budget is spent"}
            continue
        record["steps"][name] = run_step(name, command, min(share, left), {**env, **extra}, args.out)
        (args.out / "recipe.json").write_text(json.dumps(record, indent=2))
    record["complete"] = True
    (args.out / "recipe.json").write_text(json.dumps(record, indent=2))
    failed = [name for name, step in record["steps"].items() if step.get("rc") != 0]
    print(f"recipe done: {len(record['steps']) - len(failed)} of {len(record['steps'])} steps passed"
          + (f"; not passed: {', '.join(failed)}" if failed else ""), flush=True)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
