"""The report: versions and device, the table on stdout, the JSON."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from gpu import ROOT
from gpu.models import BENCH_MODELS, QWEN_IMAGE

GIB = 1024**3


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    import diffusers
    import transformers

    names = ("peft", "accelerate", "huggingface_hub", "safetensors", "tokenizers", "numpy")
    found = {name: _version(name) for name in names}
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        # the modules actually imported (carried wheels shadow what is installed; their paths say which won)
        "diffusers": diffusers.__version__,
        "diffusers_path": str(Path(diffusers.__file__).parent),
        "transformers": transformers.__version__,
        "transformers_path": str(Path(transformers.__file__).parent),
        **found,
        "peft_path": _module_dir("peft"),
    }


def _module_dir(name: str) -> str | None:
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None
    return str(Path(module.__file__).parent)


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "host": platform.node(), "cpu_count": os.cpu_count()}
    if device.type != "cuda":
        info["name"] = platform.processor() or platform.machine()
        return info
    props = torch.cuda.get_device_properties(device)
    info.update(
        name=props.name,
        total_memory_bytes=props.total_memory,
        multiprocessors=props.multi_processor_count,
        capability=f"{props.major}.{props.minor}",
        sdpa={
            name: getattr(torch.backends.cuda, f"{name}_sdp_enabled", lambda: None)()
            for name in ("flash", "mem_efficient", "cudnn", "math")
        },
        diffusers_attention_backend=os.environ.get("DIFFUSERS_ATTN_BACKEND", "native (default)"),
    )
    try:
        query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit"
        out = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
        fields = [field.strip() for field in line.split(",")]
        if len(fields) == 5:
            info.update(nvidia_smi_name=fields[0], driver=fields[1], memory_total=fields[2], max_sm_clock=fields[3],
                        power_limit=fields[4])
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    return info


def git_state() -> dict[str, Any]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": None, "dirty": None}


def fmt(value: float | None, spec: str = ".0f") -> str:
    if value is None:
        return "-"
    if spec == "rate":  # TFLOP/s and percentages: a tiny CPU run gives values far below 1
        return format(value, ".1f") if abs(value) >= 10 else format(value, ".3g")
    return format(value, spec)


def print_table(report: dict[str, Any]) -> None:
    model = BENCH_MODELS[report.get("model", QWEN_IMAGE.name)]
    peak = report["matmul_peak"]
    user_lora = report["settings"].get("user_lora")  # absent: no user LoRA, and no 'lora' column
    lora_header = f" {'lora':>7}" if user_lora else ""
    header = (
        f"{'mode':<11} {'size':>9} {'steps':>7} {'encode':>8} {'denoise':>9} {'den.GPU':>9} {'ms/step':>8} "
        f"{'decode':>8} {'other':>7}{lora_header} {'total':>9} {'full run':>10} {'peak GiB':>8} {'TFLOP/s':>8} "
        f"{'% peak':>7}"
    )
    print()
    print(header)
    print("-" * len(header))
    extrapolated = False
    for r in report["results"]:
        if "error" in r:
            print(f"{r['mode']:<11} {r['size'][0]:>4}x{r['size'][1]:<4} FAILED: {r['error'][:150]}")
            continue
        m = r["median"]
        steps = f"{r['steps_timed']}/{r['steps_full']}"
        full = r.get("extrapolated_full_run")
        full_ms = f"{full['wall_ms']:.0f}*" if full else f"{m['wall_ms']:.0f}"
        extrapolated |= bool(full)
        peak_gib = m["peak_allocated_bytes"] / GIB if m["peak_allocated_bytes"] is not None else None
        frac = r["fraction_of_matmul_peak"] * 100 if r["fraction_of_matmul_peak"] is not None else None
        name = r["mode"] + ("-nolora" if model.modes[r["mode"]].fast and not r["lora"] else "")
        lora_ms = f" {fmt(m.get('lora_step_ms'), '.1f'):>7}" if user_lora else ""
        print(
            f"{name:<11} {r['size'][0]:>4}x{r['size'][1]:<4} {steps:>7} {fmt(m['encode_prompt_ms']):>8} "
            f"{fmt(m['denoise_ms']):>9} {fmt(m['denoise_probe_ms']):>9} {fmt(r['per_step_ms'], '.1f'):>8} "
            f"{fmt(m['decode_ms']):>8} {fmt(m['other_ms']):>7}{lora_ms} {fmt(m['wall_ms']):>9} {full_ms:>10} "
            f"{fmt(peak_gib, '.1f'):>8} {fmt(r['achieved_tflops'], 'rate'):>8} {fmt(frac, 'rate'):>7}"
        )
    print()
    print("ms; medians of", report["settings"]["repeat"], "run(s) after", report["settings"]["warmup"], "warm-up(s). "
          "encode/denoise/decode: the worker's own _StageClock (host clock); den.GPU: first to last transformer "
          "forward on the GPU timeline"
          + (" (CUDA events)" if report["device"]["type"] == "cuda" else " (host clock here)")
          + "; other: LoRA load/unload, scheduler swap, the rest of generate()"
          + (f"; lora: of other, the runner's user-LoRA step (--user-lora {user_lora}: "
             f"{'copied into the LoRA slot' if user_lora == 'slot' else 'loaded and removed per job'}, "
             f"rank {report['settings']['user_lora_rank']}, slot rank {report['settings']['slot_rank']})."
             if user_lora else "."))
    print(f"TFLOP/s: analytic transformer FLOPs of every forward that ran / den.GPU; % peak: of the measured "
          f"{peak['dtype']} matmul peak {fmt(peak['tflops_median'], 'rate')} TFLOP/s ({peak['n']}^3, median of "
          f"{len(peak['tflops_samples'])}x{peak['products_per_sample']}).")
    if extrapolated:
        print("* full run EXTRAPOLATED from the timed steps' per-step time, not measured.")
    print(f"measured with: {report['measured_with']}")
    anchor = report.get("anchor")
    ours = next((r for r in report["results"] if anchor and "error" not in r and r["mode"] == anchor["mode"]
                 and r["size"][0] == anchor["size"]), None)
    if anchor:
        print(f"Anchor, NOT measured here: {anchor['source']}: {anchor['seconds']} s for {anchor['size']}^2, "
              f"{anchor['steps']} steps, CFG {anchor['true_cfg_scale']:g}, {anchor['dtype']}"
              + (f"; this run's {anchor['mode']} at that size: {_full_run_ms(ours) / 1000:.2f} s" if ours else ""))
    if report.get("tiny"):
        print("TINY random models on", report["device"]["type"],
              f"- these numbers say nothing about {model.model_id}'s speed.")
    for note in report["notes"]:
        print("note:", note)


def _full_run_ms(result: dict[str, Any]) -> float:
    """The case's full-run wall time: measured, or extrapolated when fewer steps were timed."""
    full = result.get("extrapolated_full_run")
    return full["wall_ms"] if full else result["median"]["wall_ms"]


def measured_with(ver: dict[str, Any], dev: dict[str, Any]) -> str:
    gpu = dev.get("name", dev["type"])
    extra = f", driver {dev['driver']}" if dev.get("driver") else ""
    cuda = f", CUDA {ver['torch_cuda']}" if ver.get("torch_cuda") and dev["type"] == "cuda" else ""
    return (
        f"torch {ver['torch']}, diffusers {ver['diffusers']}, transformers {ver['transformers']}, peft {ver['peft']}, "
        f"accelerate {ver['accelerate']}, python {ver['python']} on {gpu}{extra}{cuda}"
    )


def write_json(report: dict[str, Any], path: Path, quiet: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".partial")
    staging.write_text(json.dumps(report, indent=2, default=str) + "\n")
    staging.replace(path)
    if not quiet:
        print(f"JSON: {path}")
