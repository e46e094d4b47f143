"""The parts of bench/gpu_bench.py (the command line, and the documentation of what it measures), one concern each:

    flops    the analytic FLOP model of one transformer forward, per model
    models   the benchmarked models and their modes (BENCH_MODELS)
    build    the pipeline from published configs with random weights, the prompt, the synthetic LoRA files
    probes   the matmul peak, hooks on every transformer forward (CUDA events), the worker's log lines, memory
    report   versions and device, the table, the JSON
    run      the worker's start-up (its own prepare_pipeline) and every (size, mode) case; --describe

Importing it sets what every part needs first: Hugging Face offline, and the worker's src/ and builder/ on sys.path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before any Hugging Face import: they read these once. Nothing here may download anything.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "bench" / "configs"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "builder"))
