"""bench/gpu_bench.py without a GPU: its logic on the tiny models, and its FLOP formula against the issue's figures.

The tiny run goes through the worker's own PipelineRunner.generate (quality with true CFG, and fast mode with a
synthetic Lightning-layout LoRA); ``--describe`` builds the full-size models on the meta device only. The tiny run
is a subprocess started first so that it overlaps the in-process ``--describe`` (both import diffusers).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_bench.py"

# The issue's floor facts: one transformer forward at 1024^2 ~ 7e13 FLOP; 50 steps x 2 (CFG) ~ 7e15 FLOP.
ISSUE_FORWARD_FLOPS = 7e13
ISSUE_QUALITY_RUN_FLOPS = 7e15
TOLERANCE = 0.30


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bench") / "tiny.json"
    command = [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--sizes", "256", "--steps-quality", "2",
               "--json", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return process, out


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_describe_counts_parameters_and_flops_as_published(tiny_run, gpu_bench, tmp_path):
    # tiny_run is requested first: its subprocess runs while the meta-device models are built here.
    path = tmp_path / "describe.json"
    assert gpu_bench.main(["--describe", "--json", str(path)]) == 0
    described = json.loads(path.read_text())["describe"]

    params = {kind: c["parameters"] for kind, c in described["components"].items()}
    assert 19e9 <= params["transformer"] <= 22e9, params  # ~20.4 B
    assert 8e9 <= params["text_encoder"] <= 9e9, params  # Qwen2.5-VL-7B with its vision tower: ~8.3 B
    assert 0.10e9 <= params["vae"] <= 0.16e9, params  # ~0.13 B
    # The FLOP formula's weights are the transformer's weights (biases and norms aside).
    assert 0.99 <= described["formula_params_fraction"] <= 1.0
    assert 6.5e9 <= described["active_params_per_token"] <= 7.1e9  # the issue's ~6.8 B active per token

    rows = {tuple(row["size"]): row for row in described["flops"]}
    at_1024 = rows[(1024, 1024)]
    assert at_1024["image_tokens"] == 4096
    assert abs(at_1024["forward_flops_cond"] / ISSUE_FORWARD_FLOPS - 1) <= TOLERANCE, at_1024["forward_flops_cond"]
    assert abs(at_1024["fast_step_flops"] / ISSUE_FORWARD_FLOPS - 1) <= TOLERANCE
    assert abs(at_1024["quality_run_flops"] / ISSUE_QUALITY_RUN_FLOPS - 1) <= TOLERANCE, at_1024["quality_run_flops"]
    # Two forwards per quality step; the negative prompt (" ") is short, so a step is a little under 2 forwards.
    assert at_1024["forward_flops_cond"] < at_1024["quality_step_flops"] <= 2 * at_1024["forward_flops_cond"]
    at_1328 = rows[(1328, 1328)]
    assert at_1328["image_tokens"] == 83 * 83
    assert at_1328["forward_flops_cond"] > 1.7 * at_1024["forward_flops_cond"]  # more tokens, quadratic attention


def test_flop_formula_terms(gpu_bench):
    config = json.loads((ROOT / "bench" / "configs" / "transformer_config.json").read_text())
    flops = gpu_bench.transformer_forward_flops(config, image_tokens=4096, text_tokens=0)
    d, layers = 3072, 60
    assert flops["blocks_linear"] == 2 * 4096 * 12 * d * d * layers
    assert flops["attention"] == 4 * 4096**2 * d * layers
    assert flops["lora"] == 0
    with_lora = gpu_bench.transformer_forward_flops(config, image_tokens=4096, text_tokens=0, lora_rank=64)
    assert 0.01 < with_lora["lora"] / flops["total"] < 0.05  # a rank-64 LoRA adds a few percent


def test_tiny_run_times_the_worker_path_and_writes_json(tiny_run):
    process, out = tiny_run
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]

    # One table, with a row per mode.
    header = next(line for line in stdout.splitlines() if line.startswith("mode"))
    for column in ("encode", "denoise", "den.GPU", "decode", "peak GiB", "TFLOP/s", "% peak"):
        assert column in header
    rows = [line.split()[0] for line in stdout.splitlines() if line.startswith(("quality ", "fast "))]
    assert rows == ["quality", "fast"], stdout
    assert "EXTRAPOLATED" in stdout  # 2 of 50 quality steps were timed
    assert "measured with: torch" in stdout

    report = json.loads(out.read_text())
    assert report["complete"] is True and report["tiny"] is True
    for key in ("torch", "diffusers", "transformers", "peft", "python"):
        assert report["versions"][key]
    assert report["matmul_peak"]["tflops_median"] > 0
    assert report["components"]["transformer"]["class"] == "QwenImageTransformer2DModel"

    quality, fast = report["results"]
    assert quality["mode"] == "quality" and quality["size"] == [256, 256]
    assert quality["steps_timed"] == 2 and quality["steps_full"] == 50
    assert quality["true_cfg_scale"] == 4.0
    assert quality["forwards"] == 4 and quality["forwards_per_step"] == 2  # true CFG: cond + uncond per step
    assert quality["image_tokens"] == 16 * 16
    assert max(quality["text_tokens_seen"]) == report["settings"]["text_tokens"]  # the prompt was built to length
    assert quality["extrapolated_full_run"]["steps"] == 50
    assert "EXTRAPOLATED" in quality["extrapolated_full_run"]["label"]

    assert fast["mode"] == "fast" and fast["fast_mode"] == "regular"  # the worker's go_fast path
    assert fast["steps_timed"] == 8 and fast["forwards"] == 8 and fast["true_cfg_scale"] == 1.0
    assert "extrapolated_full_run" not in fast
    assert fast["lora"]["rank"] == report["settings"]["lora_rank"] and fast["flops"]["lora"] > 0
    at_first = fast["runs"][0]["probe"]["at_first_forward"]
    # The synthetic Lightning LoRA was applied by the worker (12 projections x 2 tiny blocks; not 48: the warm-up
    # run's adapter was removed after its job), with the Lightning scheduler swapped in.
    assert at_first["lora_layers"] == 2 * 12
    assert at_first["scheduler"]["shift_terminal"] is None
    assert quality["runs"][0]["probe"]["at_first_forward"]["lora_layers"] == 0
    assert quality["runs"][0]["probe"]["at_first_forward"]["scheduler"]["shift_terminal"] == 0.02

    for result in (quality, fast):
        run = result["runs"][0]
        assert set(run["worker_stages_ms"]) == {"encode_prompt", "denoise", "decode"}  # the worker's _StageClock
        assert result["flops"]["denoise"] > 0 and result["achieved_tflops"] > 0
        assert result["median"]["wall_ms"] >= result["median"]["denoise_ms"] > 0
