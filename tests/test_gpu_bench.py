"""bench/gpu_bench.py without a GPU: its logic on the tiny models, and its FLOP formula against the issue's figures.

The tiny run goes through the worker's own PipelineRunner.generate (quality with true CFG, and fast mode with a
synthetic Lightning-layout LoRA); ``--describe`` builds the full-size models on the meta device only. The same for
``--model qwen-image-2.1`` (its card's 40 steps without CFG, and 50 steps with CFG 4 as the issue's anchor); and a
user LoRA on every job (``--user-lora slot``: written into the LoRA slot, both modes; ``--user-lora per-job``:
loaded per job, quality only, the cheaper mode). The tiny runs are subprocesses started first, two at a time, so
that they overlap the in-process ``--describe`` runs (all import diffusers).
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


def start_tiny_run(out: Path, *extra: str) -> subprocess.Popen[str]:
    command = [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--sizes", "256", "--steps-quality", "2",
               "--json", str(out), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bench") / "tiny.json"
    return start_tiny_run(out), out


@pytest.fixture(scope="module")
def tiny21_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bench-21") / "tiny21.json"
    return start_tiny_run(out, "--model", "qwen-image-2.1"), out


@pytest.fixture(scope="module")
def tiny_slot_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bench-slot") / "slot.json"
    return start_tiny_run(out, "--user-lora", "slot"), out


@pytest.fixture(scope="module")
def tiny_per_job_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bench-per-job") / "per-job.json"
    return start_tiny_run(out, "--user-lora", "per-job", "--modes", "quality"), out


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_describe_counts_parameters_and_flops_as_published(tiny_run, tiny_slot_run, gpu_bench, tmp_path):
    # The tiny runs are requested first: their subprocesses run while the meta-device models are built here.
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


NO_USER_LORA_SETTINGS = {
    "sizes", "modes", "steps_quality", "mode_specs", "fast_lora", "fast_path", "quant", "lora_rank", "warmup", "repeat",
    "text_tokens", "dtype", "seed", "argv",
}  # fmt: skip


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
    # Without --user-lora (the default) the report is what it was before that flag existed: no new setting, key,
    # column or per-run field.
    assert set(report["settings"]) == NO_USER_LORA_SETTINGS
    assert "user_lora" not in report and "slots" not in report
    assert "lora" not in header.split() and "user LoRA" not in stdout
    assert all("user_lora" not in r and "lora_step" not in r["runs"][0] for r in report["results"])
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


# ---------------------------------------------------------------------------------------------- Qwen-Image-2.1

# The issue's anchor for 2.1 (someone else's measurement): 1024^2, 50 steps, CFG 4, bf16 in 7.96 s.
ANCHOR_SECONDS = 7.96


def test_describe_qwen21_counts_its_7b_transformer_and_flops(tiny21_run, tiny_per_job_run, gpu_bench, tmp_path):
    path = tmp_path / "describe21.json"
    assert gpu_bench.main(["--describe", "--model", "qwen-image-2.1", "--json", str(path)]) == 0
    described = json.loads(path.read_text())["describe"]
    assert described["model"] == "qwen-image-2.1" and described["configs"] == "bench/configs/qwen-image-2.1"

    params = {kind: c["parameters"] for kind, c in described["components"].items()}
    assert 7.0e9 <= params["transformer"] <= 7.2e9, params  # the card's "7B": 7.115 B from the configs
    assert 8.5e9 <= params["text_encoder"] <= 9.0e9, params  # Qwen3-VL-8B with its vision tower
    assert 0.3e9 <= params["vae"] <= 0.4e9, params
    assert described["components"]["transformer"]["class"] == "QwenImage21Transformer2DModel"
    assert 0.99 <= described["formula_params_fraction"] <= 1.0
    assert 6.9e9 <= described["active_params_per_token"] <= 7.0e9  # 13 * 4096^2 * 32: single-stream, SwiGLU x3

    at_1024 = {tuple(row["size"]): row for row in described["flops"]}[(1024, 1024)]
    assert at_1024["image_tokens"] == 64 * 64  # 16x VAE, unpatched
    prefill, cached = at_1024["forward_flops_cond"], at_1024["forward_flops_cached"]
    assert 6.0e13 <= cached < prefill <= 7.5e13  # later steps skip the text tokens (KV cache)
    assert at_1024["quality_run_flops"] == pytest.approx(prefill + 39 * cached)  # the card's 40 steps, one pass
    assert 1.9 * 50 * cached <= at_1024["cfg4_run_flops"] <= 2 * 50 * prefill  # two passes per step
    anchor = described["anchor"]
    assert anchor["seconds"] == ANCHOR_SECONDS and "not measured here" in anchor["source"]
    assert anchor["implied_tflops"] == pytest.approx(at_1024["cfg4_run_flops"] / ANCHOR_SECONDS / 1e12)


def test_qwen21_flop_formula_terms(gpu_bench):
    config = json.loads((ROOT / "bench" / "configs" / "qwen-image-2.1" / "transformer_config.json").read_text())
    d, layers, n, t = 4096, 32, 4096, 100
    prefill = gpu_bench.qwen21_forward_flops(config, image_tokens=n, text_tokens=t)
    cached = gpu_bench.qwen21_forward_flops(config, image_tokens=n, text_tokens=t, cached=True)
    assert prefill["blocks_linear"] == 2 * (n + t) * 13 * d * d * layers  # q, k, v, out + SwiGLU 3 x D x 3D
    assert cached["blocks_linear"] == 2 * n * 13 * d * d * layers
    assert prefill["attention"] == 4 * (t * (t + 1) // 2 + n * (t + n)) * d * layers  # block-causal
    assert cached["attention"] == 4 * n * (t + n) * d * layers
    assert gpu_bench.qwen21_transformer_params(config) == pytest.approx(7.115e9, rel=0.001)


def test_tiny_qwen21_run_times_the_card_defaults_and_the_anchor_case(tiny21_run):
    process, out = tiny21_run
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    rows = [line.split()[0] for line in stdout.splitlines() if line.startswith(("quality ", "cfg4 "))]
    assert rows == ["quality", "cfg4"], stdout
    assert "Anchor, NOT measured here" in stdout and "7.96 s" in stdout

    report = json.loads(out.read_text())
    assert report["complete"] is True and report["model"] == "qwen-image-2.1"
    assert report["components"]["transformer"]["class"] == "QwenImage21Transformer2DModel"
    quality, cfg4 = report["results"]
    assert quality["steps_full"] == 40 and quality["true_cfg_scale"] == 1.0 and quality["forwards_per_step"] == 1
    assert cfg4["steps_full"] == 50 and cfg4["true_cfg_scale"] == 4.0 and cfg4["forwards_per_step"] == 2
    for result in (quality, cfg4):
        assert result["image_tokens"] == 16 * 16 and result["fast_mode"] == "none" and result["lora"] is None
        modes = [f["kv_cache_mode"] for f in result["runs"][0]["probe"]["forwards"]]
        assert modes[0] == "extract" and modes[-1] == "cached"  # the pipeline's KV cache, counted per forward
        assert result["flops"]["denoise"] > 0 and "EXTRAPOLATED" in result["extrapolated_full_run"]["label"]
    assert max(quality["text_tokens_seen"]) == report["settings"]["text_tokens"]


# ---------------------------------------------------------------------------------------------- user LoRA


def finished(run) -> tuple[str, dict]:
    process, out = run
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr[-3000:]
    header = next(line for line in stdout.splitlines() if line.startswith("mode"))
    assert "lora" in header.split()  # the LoRA step's column, beside other
    return stdout, json.loads(out.read_text())


def assert_lora_step_timed(result, path: str) -> dict:
    """The case ran the LoRA ``path`` on every timed job, from the warm cache, and its step is a part of other."""
    user = result["user_lora"]
    assert user["path"] == path and user["rank"] == 32
    assert user["lora_cache_timed"] == {"hits": 1, "misses": 0}  # the warm-up run filled the host cache
    assert 0 < result["median"]["lora_step_ms"] <= result["median"]["other_ms"]
    step = result["runs"][0]["lora_step"]
    assert step["ms"] == pytest.approx(step["apply_ms"] + step["remove_ms"])
    assert result["forwards"] > 0 and result["flops"]["lora"] > 0
    return step


def test_tiny_run_with_a_user_lora_in_the_slot(tiny_slot_run):
    from qwen_worker.config import Settings

    stdout, report = finished(tiny_slot_run)
    settings = report["settings"]
    assert settings["user_lora"] == "slot" and settings["user_lora_rank"] == 32
    assert settings["slot_rank"] == Settings().lora_slot_rank  # the worker's default, read from its settings
    assert report["user_lora"]["layout"].startswith("diffusers") and report["user_lora"]["modules"] == 2 * 12
    slots = report["slots"]
    # One slot copy per tree a job can run on: the plain transformer and the resident Lightning copy.
    assert slots["rank"] == settings["slot_rank"] and slots["trees"] == 2 and slots["layers"] == 2 * 14
    assert slots["bytes"] == sum(slots["bytes_per_tree"]) > 0
    assert "--user-lora slot" in stdout and f"LORA_SLOT_RANK={settings['slot_rank']}" in stdout

    quality, fast = report["results"]
    for result, tree in ((quality, "plain"), (fast, "fast (regular)")):
        step = assert_lora_step_timed(result, "slot")
        # The job ran on a slot copy, and the worker wrote the LoRA into that tree's slot.
        assert step["tree"] == "slot copy" and result["user_lora"]["tree"] == "slot copy"
        assert any(f"written into the LoRA slot of the {tree} tree" in line for line in step["log"]), step["log"]
        assert "slot" in result["runs"][0]["probe"]["at_first_forward"]["adapters"]
        assert result["user_lora"]["flops_rank"] == settings["slot_rank"]  # the slot's rank runs, not the LoRA's
    # Fast mode: the Lightning tree's slot copy, Lightning's adapter beside the slot.
    assert len(fast["runs"][0]["probe"]["at_first_forward"]["adapters"]) == 2


def test_tiny_run_with_a_user_lora_loaded_per_job(tiny_per_job_run):
    stdout, report = finished(tiny_per_job_run)
    settings = report["settings"]
    assert settings["user_lora"] == "per-job" and settings["slot_rank"] == 0 and report["slots"] is None
    assert "--user-lora per-job" in stdout
    (quality,) = report["results"]
    step = assert_lora_step_timed(quality, "per-job")
    assert step["tree"] == "plain" and len(step["adapters"]) == 1
    assert any("applied LoRAs synthetic-user-lora" in line for line in step["log"]), step["log"]
    # The tree that ran carried the user LoRA's layers: 12 projections x 2 tiny blocks.
    assert quality["runs"][0]["probe"]["at_first_forward"]["lora_layers"] == 2 * 12
    assert quality["user_lora"]["flops_rank"] == 32


@pytest.mark.parametrize(
    "flags",
    [
        ("--user-lora", "slot", "--fast-path", "today"),  # the per-job Lightning file would share the slot
        ("--user-lora", "slot", "--slot-rank", "16"),  # rank 32 does not fit: the worker would load it per job
        ("--user-lora", "per-job", "--slot-rank", "64"),  # per job builds no slot
        ("--slot-rank", "64"),  # no user LoRA
        ("--user-lora", "slot", "--warmup", "0"),  # the warm-up fills the LoRA cache
        ("--user-lora", "slot", "--model", "qwen-image-2.1"),
    ],
)
def test_user_lora_refuses_what_it_would_mislabel(gpu_bench, flags):
    with pytest.raises(SystemExit):
        gpu_bench.parse_args(["--tiny", "--device", "cpu", *flags])
