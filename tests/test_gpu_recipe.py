"""The GPU recipe (bench/gpu_recipe.py, docs/PERFORMANCE.md "GPU recipe") rehearsed with ``--tiny`` on the CPU, so the
one command a lent GPU runs first cannot rot: every step runs and passes, and each leaves its log and report in the
output folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_recipe_runs_every_step_into_its_output_folder(tiny_models, tmp_path):
    out = tmp_path / "out"
    models = tiny_models["qwen-image"].parent
    command = [sys.executable, "bench/gpu_recipe.py", "--tiny", "--out", str(out), "--models", str(models)]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((out / "recipe.json").read_text())
    assert record["complete"] and record["tiny"]
    assert {"env", "check", "step_bench", "gpu_bench"} <= set(record["steps"])  # check: handler.py --check
    for name, step in record["steps"].items():
        assert step["rc"] == 0, (name, (out / step["log"]).read_text()[-2000:])
        assert (out / step["log"]).stat().st_size > 0
    step = json.loads((out / "step_bench.json").read_text())
    assert [row["mode"] for row in step["results"]] == ["text-to-image"] and "error" not in step["results"][0]
    bench = json.loads((out / "gpu_bench.json").read_text())
    assert bench["complete"] and bench["results"] and all("error" not in row for row in bench["results"])
