"""bench/lora_overhead.py (`make bench-lora`) runs: on a narrow transformer (``--tiny``), every row it reports.

Its numbers mean nothing at that width; the point is that the benchmark still calls the worker's current API (a
renamed function once left it broken with nothing to notice).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from qwen_worker.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_the_lora_benchmark_runs_and_reports_every_path(tmp_path):
    report_path = tmp_path / "bench-lora.json"
    command = [sys.executable, "bench/lora_overhead.py", "--tiny", "--repeat", "1", "--json", str(report_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    rows = report["rows"]
    assert rows["fast job (Lightning)"]["today_ms"] > 0 and rows["fast job (Lightning)"]["new_ms"] > 0
    assert rows["user-LoRA job, repeated (LoRA slot)"]["today_ms"] > 0
    assert rows["user-LoRA job, repeated (LoRA slot)"]["new_ms"] > 0
    assert report["slot_rank"] == Settings().lora_slot_rank and report["slot_bytes"] > 0 and report["tiny"] is True
    assert "cached user LoRA (slot)" in done.stdout and "Lightning switch" in done.stdout
