"""The runs: the worker's start-up (its own prepare_pipeline) and each (size, mode) case through its PipelineRunner;
and --describe (parameters and FLOPs only)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import shutil
import statistics
import sys
import tempfile
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpu import ROOT
from gpu.build import (
    LIGHTNING_RANK,
    SEED,
    TINY_LORA_RANK,
    build_pipeline,
    load_configs,
    prompt_for,
    write_synthetic_lightning_lora,
    write_synthetic_user_lora,
)
from gpu.flops import run_flops
from gpu.models import BENCH_MODELS, TINY_SIZES, BenchModel, ModeSpec
from gpu.probes import (
    LORA_STEP_LOGGERS,
    MATMUL_N,
    TINY_MATMUL_N,
    ForwardProbe,
    allocated_bytes,
    captured_log,
    matmul_peak,
    synchronize,
)
from gpu.report import device_info, fmt, git_state, measured_with, versions, write_json

WARMUP_STEPS = 2  # quality warm-up runs this many steps: same shapes and kernels, a fraction of the time


def _ensure_runpod_importable() -> str | None:
    """The worker's LoRA module imports the runpod SDK's SSRF-safe downloader at import time; the lent GPU machine
    has no runpod (and its dependency tree is large). The bench only ever loads LoRAs from local files, so a stub
    that refuses downloads stands in for it there. Returns a note when the stub was installed."""
    try:
        import runpod.serverless.utils.rp_ssrf  # noqa: F401

        return None
    except ImportError:
        pass

    class SSRFError(Exception):
        pass

    def _refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("gpu_bench: the runpod SDK is not installed here; LoRAs can only be local files")

    names = ("runpod", "runpod.serverless", "runpod.serverless.utils", "runpod.serverless.utils.rp_ssrf")
    modules = {name: sys.modules.get(name) or types.ModuleType(name) for name in names}
    modules["runpod.serverless.utils.rp_ssrf"].SSRFError = SSRFError
    modules["runpod.serverless.utils.rp_ssrf"].safe_get = _refuse
    modules["runpod.serverless.utils.rp_ssrf"].iter_content_capped = _refuse
    for parent, child in itertools.pairwise(names):
        setattr(modules[parent], child.rsplit(".", 1)[1], modules[child])
    sys.modules.update(modules)
    return "runpod SDK not installed: a stub of runpod.serverless.utils.rp_ssrf was used (URL LoRA downloads only)"


@dataclass(frozen=True)
class JobLoras:
    """The LoRA files every job of a case carries, written at start-up: the Lightning file loaded per job
    (``--fast-path today``, fast jobs only) and the synthetic user LoRA (``--user-lora``, every job)."""

    lightning: tuple[tuple[Path, float], ...] = ()
    user: tuple[tuple[Path, float], ...] = ()

    def for_job(self, fast_lora: bool) -> tuple[tuple[Path, float], ...]:
        """The files of one job, Lightning's first (a fast job's, when loaded per job), as the worker orders them."""
        return (*(self.lightning if fast_lora else ()), *self.user)


def request_for(spec: ModeSpec, size: int, steps: int, prompt: str, fast_lora: bool, warmup: bool) -> dict[str, Any]:
    """The job's input: ``steps`` timed steps of ``spec``'s mode (warm-ups run fewer), or the worker's go_fast."""
    raw: dict[str, Any] = {"prompt": prompt, "width": size, "height": size, "seed": SEED}
    if not spec.fast:
        raw.update(num_inference_steps=min(steps, WARMUP_STEPS) if warmup else steps,
                   true_cfg_scale=spec.true_cfg_scale)
        if spec.negative_prompt is not None:
            raw["negative_prompt"] = spec.negative_prompt
    elif fast_lora:
        raw.update(go_fast=True)  # the worker's fast mode: Lightning scheduler + LoRA, 8 steps, no CFG
    else:
        raw.update(num_inference_steps=spec.steps, true_cfg_scale=1.0)
    return raw


def one_run(
    runner: Any, raw: dict[str, Any], size: int, device: torch.device, pipeline: Any,
    job_loras: tuple[tuple[Path, float], ...] = (), user_lora: bool = False,
) -> dict[str, Any]:
    from qwen_worker.profiles import request_rules
    from qwen_worker.runner import GenerationJob
    from qwen_worker.schema import Mode, parse_request

    # parsed against the served model's rules (its sizes, its CFG rule), as the worker parses a job
    request = parse_request(raw, request_rules(runner.profile_for(Mode.TEXT_TO_IMAGE)))
    runner.check_request(request)
    job = GenerationJob(request=request, width=size, height=size, loras=job_loras)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    loaded = runner.served(request.mode).loaded
    # A job runs on the pipeline's own tree, a resident Lightning copy or, with user LoRAs, a LoRA slot copy.
    trees = (*loaded.fast.copies.values(), *(loaded.slots.transformers() if loaded.slots is not None else ()))
    with ForwardProbe(pipeline, device, trees) as probe, warnings.catch_warnings(), \
            captured_log(LORA_STEP_LOGGERS) as lines:
        warnings.simplefilter("ignore", RuntimeWarning)  # random weights: NaNs in the decoded image are expected
        generation = runner.generate(job)
    synchronize(device)
    wall_ms = (time.perf_counter() - started) * 1000
    stages = dict(generation.timings_ms)
    run = {
        "steps": generation.num_inference_steps,
        "true_cfg_scale": generation.true_cfg_scale,
        "fast_mode": request.fast_mode.value,
        "worker_stages_ms": stages,
        "wall_ms": wall_ms,
        "other_ms": wall_ms - sum(stages.get(k, 0.0) for k in ("encode_prompt", "denoise", "decode")),
        "probe": probe.summary(),
        "images": len(generation.images),
    }
    if user_lora:
        # The worker's own stage clock timed the LoRA step (the runner synchronises the device around it here).
        step = generation.lora_step
        run["lora_step"] = None if step is None else {
            "ms": step.apply_ms + step.remove_ms,
            "apply_ms": step.apply_ms,
            "remove_ms": step.remove_ms,
            "tree": step.tree,
            "adapters": run["probe"]["at_first_forward"].get("adapters", []),  # on the tree that ran
            "log": lines,
        }
    if device.type == "cuda":
        run["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        run["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return run


def run_case(
    runner: Any, mode: str, size: int, args: argparse.Namespace, prompt: str, transformer_config: dict[str, Any],
    pipeline: Any, device: torch.device, matmul_tflops: float, lora_rank: int, bench_model: BenchModel,
    job_loras: JobLoras = JobLoras(),
) -> dict[str, Any]:
    spec = bench_model.modes[mode]
    fast_lora = spec.fast and args.fast_lora == "synthetic"
    timed_steps = min(args.steps_quality or spec.steps, spec.steps)

    def raw(warmup: bool) -> dict[str, Any]:
        return request_for(spec, size, timed_steps, prompt, fast_lora, warmup=warmup)

    # --fast-path today: the Lightning file is loaded and removed per job, as the worker did before issue 12;
    # --user-lora: every job, warm-ups included, carries the synthetic user LoRA (after Lightning's, when per job)
    per_job = job_loras.for_job(fast_lora)
    user = bool(job_loras.user)
    for _ in range(args.warmup):
        one_run(runner, raw(warmup=True), size, device, pipeline, per_job, user)
    cache = runner.lora_cache
    cache_before = (cache.hits, cache.misses) if cache is not None else (0, 0)
    runs = [one_run(runner, raw(warmup=False), size, device, pipeline, per_job, user)
            for _ in range(args.repeat)]
    first = runs[0]
    steps = first["steps"]
    full_steps = spec.steps
    lightning_rank = lora_rank if fast_lora and args.fast_path != "fused" else 0  # fused: no LoRA matmuls
    rank = lightning_rank  # of the LoRA matmuls in each forward
    user_lora: dict[str, Any] | None = None
    if args.user_lora != "none":
        for run in runs:
            if (run["lora_step"]["tree"] == "slot copy") != (args.user_lora == "slot"):
                raise RuntimeError(f"--user-lora {args.user_lora}, but the job ran on the {run['lora_step']['tree']} "
                                   f"tree; the worker logged: {run['lora_step']['log']}")
        # The LoRA matmuls that run: the slot's rank on every block layer, whatever the LoRA's own rank; per job,
        # the LoRA's rank. Beside Lightning's on a fast job (not fused), on the same projections.
        flops_rank = args.slot_rank if args.user_lora == "slot" else args.user_lora_rank
        rank += flops_rank
        user_lora = {
            "path": args.user_lora,
            "rank": args.user_lora_rank,
            "slot_rank": args.slot_rank,
            "flops_rank": flops_rank,
            "tree": first["lora_step"]["tree"],
            "apply_ms": statistics.median(r["lora_step"]["apply_ms"] for r in runs),
            "remove_ms": statistics.median(r["lora_step"]["remove_ms"] for r in runs),
            # Every timed job's LoRA files came from the warm host cache (the warm-up run filled it).
            "lora_cache_timed": {"hits": cache.hits - cache_before[0], "misses": cache.misses - cache_before[1]}
            if cache is not None else None,
        }
    forwards = first["probe"]["forwards"]
    counted = [
        bench_model.forward_flops(transformer_config, f["image_tokens"], f["text_tokens"], rank,
                                  f.get("kv_cache_mode") == "cached")
        for f in forwards
    ]
    flops_forwards = [c["total"] * f["batch"] for c, f in zip(counted, forwards, strict=True)]
    denoise_flops = sum(flops_forwards)
    lora_flops = sum(c["lora"] * f["batch"] for c, f in zip(counted, forwards, strict=True))

    def median(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    med = {
        "encode_prompt_ms": median([r["worker_stages_ms"].get("encode_prompt") for r in runs]),
        "denoise_ms": median([r["worker_stages_ms"].get("denoise") for r in runs]),
        "decode_ms": median([r["worker_stages_ms"].get("decode") for r in runs]),
        "other_ms": median([r["other_ms"] for r in runs]),
        "wall_ms": median([r["wall_ms"] for r in runs]),
        "denoise_probe_ms": median([r["probe"].get("denoise_ms") for r in runs]),
        "forward_ms_sum": median([r["probe"].get("forward_ms_sum") for r in runs]),
        "peak_allocated_bytes": median([r.get("peak_allocated_bytes") for r in runs]),
    }
    if user_lora is not None:
        med["lora_step_ms"] = median([r["lora_step"]["ms"] for r in runs])  # a part of other_ms
    # Achieved rate over the denoise span on the GPU timeline (CUDA) or the host clock (CPU).
    denoise_ms = med["denoise_probe_ms"] or med["denoise_ms"]
    achieved = denoise_flops / (denoise_ms / 1000) / 1e12 if denoise_ms else None
    forward_rate = denoise_flops / (med["forward_ms_sum"] / 1000) / 1e12 if med["forward_ms_sum"] else None
    text_tokens = sorted({f["text_tokens"] for f in forwards})
    result: dict[str, Any] = {
        "mode": mode,
        "size": [size, size],
        "fast_mode": first["fast_mode"],
        "fast_path": args.fast_path if fast_lora else None,
        "quant": args.quant,
        "lora": {"rank": lightning_rank, "synthetic": True} if fast_lora else None,
        "true_cfg_scale": first["true_cfg_scale"],
        "steps_timed": steps,
        "steps_full": full_steps,
        "forwards": len(forwards),
        "forwards_per_step": len(forwards) / steps if steps else None,
        "image_tokens": forwards[0]["image_tokens"] if forwards else None,
        "text_tokens_seen": text_tokens,
        "flops": {"denoise": denoise_flops, "per_step": denoise_flops / steps if steps else None, "lora": lora_flops},
        "median": med,
        "per_step_ms": denoise_ms / steps if denoise_ms and steps else None,
        "achieved_tflops": achieved,
        "achieved_tflops_forwards_only": forward_rate,
        "fraction_of_matmul_peak": achieved / matmul_tflops if achieved and matmul_tflops else None,
        "warmup_runs": args.warmup,
        "runs": runs,
    }
    if user_lora is not None:
        result["user_lora"] = user_lora
    if steps < full_steps and denoise_ms:
        # Extrapolated, not measured: per-step time of the steps that ran, times the full step count. FLOPs: the
        # first step (which prefills 2.1's cache) once, the later steps' mean for the rest.
        est_denoise = denoise_ms / steps * full_steps
        per_step = max(1, len(forwards) // steps)
        first_step = sum(flops_forwards[:per_step])
        later = (denoise_flops - first_step) / (steps - 1) if steps > 1 else first_step
        result["extrapolated_full_run"] = {
            "label": f"EXTRAPOLATED from {steps} timed steps to {full_steps} (not measured)",
            "steps": full_steps,
            "denoise_ms": est_denoise,
            "wall_ms": med["wall_ms"] - denoise_ms + est_denoise,
            "flops": first_step + later * (full_steps - 1),
        }
    return result


def describe(args: argparse.Namespace) -> dict[str, Any]:
    """Parameter counts of the components built on the meta device, and the analytic FLOPs per forward, per step
    and per image (a full run) at each size, for each of the model's modes."""
    bench_model = BENCH_MODELS[args.model]
    text_inputs, tokenizer = bench_model.text_inputs()
    configs = load_configs(bench_model, args.tiny, tokenizer)
    pipeline, info = build_pipeline(bench_model, configs, text_inputs, None, torch.bfloat16)
    cfg = configs["transformer"]
    modes = bench_model.modes
    negatives = {
        mode: bench_model.embeddings_length(pipeline, spec.negative_prompt or " ")
        for mode, spec in modes.items() if spec.true_cfg_scale > 1
    }
    negative = next(iter(negatives.values()), 0)
    sizes = args.sizes or (TINY_SIZES if args.tiny else bench_model.default_sizes)
    rank = args.lora_rank or (TINY_LORA_RANK if args.tiny else LIGHTNING_RANK)
    rows = []
    for size in sizes:
        # one token per 16x16 pixels: Qwen-Image's 8x VAE with 2x2 patches, 2.1's 16x VAE unpatched
        image_tokens = (size // 16) * (size // 16)
        cond = bench_model.forward_flops(cfg, image_tokens, args.text_tokens)
        row: dict[str, Any] = {
            "size": [size, size],
            "image_tokens": image_tokens,
            "text_tokens_cond": args.text_tokens,
            "text_tokens_uncond": negative,
            "forward_flops_cond": cond["total"],
            "forward_breakdown_cond": cond,
        }
        if bench_model.kv_cache:
            cached = bench_model.forward_flops(cfg, image_tokens, args.text_tokens, cached=True)
            row["forward_flops_cached"] = cached["total"]
            row["forward_breakdown_cached"] = cached
        for mode, spec in modes.items():
            uncond = negatives.get(mode, negative)
            step, run = run_flops(bench_model, cfg, spec, image_tokens, args.text_tokens, uncond, spec.steps)
            row[f"{mode}_step_flops"] = step
            row[f"{mode}_run_flops"] = run  # per image
            if spec.fast:
                row[f"{mode}_step_flops_with_lora"] = run_flops(
                    bench_model, cfg, spec, image_tokens, args.text_tokens, uncond, 1, rank
                )[0]
        rows.append(row)
    analytic = bench_model.formula_params(cfg)
    counted = info["transformer"]["parameters"]
    anchor = bench_model.anchor
    report = {
        "describe": {
            "model": bench_model.name,
            "tiny": args.tiny,
            "configs": "builder/tiny_models.py" if args.tiny else str(bench_model.config_dir.relative_to(ROOT)),
            "components": {k: {"class": v["class"], "parameters": v["parameters"]} for k, v in info.items()},
            "active_params_per_token": bench_model.active_params(cfg),
            "formula_params": analytic,
            "formula_params_fraction": analytic / counted,
            "lora_rank": rank,
            "modes": {mode: {"steps": spec.steps, "true_cfg_scale": spec.true_cfg_scale, "fast": spec.fast}
                      for mode, spec in modes.items()},
            "kv_cache": bench_model.kv_cache,
            "flops": rows,
        },
        "versions": versions(),
    }
    print(f"{bench_model.model_id}: components built on the meta device (no weights, no memory) from",
          report["describe"]["configs"])
    for kind, v in info.items():
        print(f"  {kind:<13} {v['class']:<38} {v['parameters'] / 1e9:8.3f} B parameters")
    print(f"  transformer weights per token: {report['describe']['active_params_per_token'] / 1e9:.2f} B; "
          f"the FLOP formula's weights cover {analytic / counted * 100:.2f} % of the counted parameters")
    print(f"Analytic transformer FLOPs (prompt embeddings: {args.text_tokens} tokens; negative: {negative}):")
    header = f"  {'size':>9} {'img tok':>8} {'fwd (cond)':>11}"
    if bench_model.kv_cache:
        header += f" {'fwd cached':>11}"
    for mode in modes:
        header += f" {mode + '/step':>13}"
        if modes[mode].fast:
            header += f" {mode + '+LoRA r' + str(rank):>14}"
    for mode, spec in modes.items():
        header += f" {mode + ' x' + str(spec.steps):>12}"
    print(header)
    for row in rows:
        line = f"  {row['size'][0]:>4}x{row['size'][1]:<4} {row['image_tokens']:>8} {row['forward_flops_cond']:>11.3e}"
        if bench_model.kv_cache:
            line += f" {row['forward_flops_cached']:>11.3e}"
        for mode in modes:
            line += f" {row[mode + '_step_flops']:>13.3e}"
            if modes[mode].fast:
                line += f" {row[mode + '_step_flops_with_lora']:>14.3e}"
        for mode in modes:
            line += f" {row[mode + '_run_flops']:>12.3e}"
        print(line)
    described = ", ".join(
        f"{mode}: {spec.steps} steps, " + ("the worker's go_fast (Lightning LoRA)" if spec.fast else
                                           f"true CFG {spec.true_cfg_scale:g}" if spec.true_cfg_scale > 1 else
                                           "no CFG")
        for mode, spec in modes.items()
    )
    print(f"  ({described}; x<steps>: FLOP per image; FLOP = 2 per multiply-add; see bench/gpu_bench.py's docstring)")
    if bench_model.kv_cache:
        print("  (the first step of a run is the 'fwd (cond)' prefill of text + image; later steps run only the "
              "image tokens against the cached text K/V, 'fwd cached', as the pipeline's use_kv_cache=True does)")
    at = next((row for row in rows if anchor and row["size"][0] == anchor["size"]), None)
    if anchor and at:
        flops = at[anchor["mode"] + "_run_flops"]
        implied = flops / anchor["seconds"] / 1e12
        report["describe"]["anchor"] = {**anchor, "flops": flops, "implied_tflops": implied}
        print(f"Anchor, NOT measured here: {anchor['source']}: {anchor['seconds']} s for {anchor['size']}^2, "
              f"{anchor['steps']} steps, CFG {anchor['true_cfg_scale']:g}, {anchor['dtype']}. At this count that run "
              f"is {flops:.3e} FLOP, so their time implies {implied:.0f} TFLOP/s sustained.")
    return report


def _user_lora_note(args: argparse.Namespace, report: dict[str, Any]) -> str:
    """What --user-lora ran, for the notes: the LoRA, the path, the slot's memory, the host cache."""
    lora = report["user_lora"]
    text = (f"user LoRA (--user-lora {args.user_lora}): a SYNTHETIC diffusers-layout LoRA (rank {lora['rank']}, "
            f"{lora['modules']} projections, {lora['bytes'] / 1e6:.1f} MB) on every job, ")
    slots = report["slots"]
    if slots is not None:
        text += (f"written into the LoRA slot (the worker's default, LORA_SLOT_RANK={slots['rank']}: rank "
                 f"{slots['rank']} on all {slots['layers']} block linear layers of each of {slots['trees']} tree(s), "
                 f"{slots['bytes'] / 1e6:.1f} MB of slot weights in all, built at start-up in "
                 f"{slots['build_seconds']:.1f} s)")
    else:
        text += ("loaded and removed per job by loras.applied_loras (the worker with LORA_SLOT_RANK=0, or a LoRA that "
                 "does not fit the slot)")
    cache_bytes = report["settings"]["lora_memory_cache_bytes"]
    text += (f"; the prepared-LoRA host cache (PreparedLoraCache, {cache_bytes / 1e9:g} GB, the worker's default) is "
             "filled by the warm-up run, so no timed job reads a file (lora_cache_timed in each result); the LoRA "
             "step (trees.job_tree: apply + remove, device synchronised around each) is the table's 'lora' "
             "column, a part of 'other'")
    if args.fast_path == "today":
        text += "; with --fast-path today the Lightning file comes from that cache too"
    return text


def bench(args: argparse.Namespace, json_path: Path) -> dict[str, Any]:
    """Build, time every (size, mode) case and return the report; the JSON is rewritten after each case, so a run
    cut short (a device call's time limit) still leaves the cases it finished."""
    notes: list[str] = []
    stub = _ensure_runpod_importable()  # before the worker's modules are imported
    if stub:
        notes.append(stub)
    from qwen_worker.acceleration import AccelerationSettings
    from qwen_worker.config import Settings
    from qwen_worker.loading import LightningFiles, ReadPipeline, prepare_pipeline
    from qwen_worker.lora_files import PreparedLoraCache
    from qwen_worker.lora_slots import SLOT_ADAPTER
    from qwen_worker.models import ResolvedModel
    from qwen_worker.quantization import check_quantization, linear_weight_bytes
    from qwen_worker.runner import PipelineRunner

    bench_model = BENCH_MODELS[args.model]
    device = torch.device(args.device)
    if args.dtype == "auto":  # the worker's own choice (loading.dtype_for): bf16 on CUDA, float32 on a CPU
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    if args.tiny:
        notes.append(f"tiny models (builder/tiny_models.py configs): a logic check, not a measurement of "
                     f"{bench_model.model_id}")
    notes.append("tokenizer: builder/tiny_models.py's (token ids differ from the real text encoder's; the template, "
                 "dropped prefix and sequence lengths behave the same, and the lengths seen are recorded per forward)")
    notes.append("weights: random (normal 0.02, zero biases, unit norms) made on the device; load_pipeline's "
                 "from_pretrained is not timed (there are no checkpoint files)")

    check_quantization(args.quant, device)  # fp8 below compute capability 8.9: stop before building 28 B parameters
    dev = device_info(device)
    ver = versions()
    lora_rank = args.lora_rank or (TINY_LORA_RANK if args.tiny else LIGHTNING_RANK)
    report: dict[str, Any] = {
        "schema": "qwen-worker gpu_bench 1",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "complete": False,
        "model": bench_model.name,
        "tiny": args.tiny,
        "device": dev,
        "versions": ver,
        "measured_with": measured_with(ver, dev),
        "git": git_state(),
        "settings": {
            "sizes": args.sizes, "modes": args.modes, "steps_quality": args.steps_quality,
            "mode_specs": {mode: {"steps": spec.steps, "true_cfg_scale": spec.true_cfg_scale, "fast": spec.fast,
                                  "negative_prompt": spec.negative_prompt}
                           for mode, spec in bench_model.modes.items()},
            "fast_lora": args.fast_lora, "fast_path": args.fast_path, "quant": args.quant,
            "lora_rank": lora_rank, "warmup": args.warmup,
            "repeat": args.repeat, "text_tokens": args.text_tokens, "dtype": str(dtype).removeprefix("torch."),
            "seed": SEED, "argv": sys.argv[1:],
        },
        "matmul_peak": None,
        "components": None,
        "build_seconds": None,
        "weights_allocated_bytes": None,
        "lora": None,
        "results": [],
        "anchor": bench_model.anchor,
        "notes": notes,
    }
    if args.user_lora != "none":  # absent otherwise: a run without a user LoRA reports exactly what it did before
        report["settings"].update(user_lora=args.user_lora, user_lora_rank=args.user_lora_rank,
                                  slot_rank=args.slot_rank,
                                  lora_memory_cache_bytes=Settings().lora_memory_cache_bytes)
        report["user_lora"] = None
        report["slots"] = None
    print(f"device: {dev.get('name')} | {report['measured_with']}", flush=True)

    peak = matmul_peak(device, dtype, TINY_MATMUL_N if args.tiny else MATMUL_N)
    report["matmul_peak"] = peak
    print(f"matmul peak: {fmt(peak['tflops_median'], 'rate')} TFLOP/s ({peak['dtype']}, {peak['n']}^3)", flush=True)
    write_json(report, json_path, quiet=True)

    text_inputs, tokenizer = bench_model.text_inputs()
    configs = load_configs(bench_model, args.tiny, tokenizer)
    started = time.perf_counter()
    pipeline, info = build_pipeline(bench_model, configs, text_inputs, device, dtype)
    synchronize(device)
    report["build_seconds"] = build_seconds = time.perf_counter() - started
    report["components"] = info
    report["weights_allocated_bytes"] = allocated_bytes(device)
    print(f"built transformer {info['transformer']['parameters'] / 1e9:.3f} B, text encoder "
          f"{info['text_encoder']['parameters'] / 1e9:.3f} B, VAE {info['vae']['parameters'] / 1e9:.3f} B parameters "
          f"on {device} in {build_seconds:.1f} s", flush=True)

    lora_dir = Path(tempfile.mkdtemp(prefix="gpu-bench-lora-"))
    try:
        lightning = LightningFiles()
        if any(bench_model.modes[mode].fast for mode in args.modes) and args.fast_lora == "synthetic":
            lora_path = lora_dir / "synthetic-lightning-8step.safetensors"
            report["lora"] = write_synthetic_lightning_lora(lora_path, pipeline.transformer, lora_rank, device, dtype)
            lightning = LightningFiles(eight_step=lora_path)
            how = {
                "resident": "read once and kept resident on a weight-sharing copy of the transformer (the default)",
                "fused": "fused into the transformer once (LIGHTNING_FUSE=true; quality mode then runs on the fused "
                "weights, which only a benchmark may do)",
                "today": "loaded and removed per job (the worker's path before issue 12)",
            }[args.fast_path]
            notes.append(f"fast mode: a SYNTHETIC Lightning-layout LoRA (rank {lora_rank}, random weights, "
                         f"{report['lora']['bytes'] / 1e6:.0f} MB), {how}")

        user_files: tuple[tuple[Path, float], ...] = ()
        if args.user_lora != "none":
            user_path = lora_dir / "synthetic-user-lora.safetensors"
            report["user_lora"] = write_synthetic_user_lora(user_path, pipeline.transformer, args.user_lora_rank,
                                                            device, dtype)
            user_files = ((user_path, 1.0),)

        model = ResolvedModel(
            model_id=f"synthetic {bench_model.model_id} (random weights)",
            path=bench_model.config_dir,
            revision=None,
            source="bench/gpu_bench.py",
            pipeline_class=bench_model.pipeline_class,
        )
        # The worker's own preparing step (loading.prepare_pipeline: fuse, quantize, resident copies, LoRA slots,
        # in its order); --fast-path today prepares no Lightning copy, its file goes with every fast job instead.
        today = lightning.eight_step is not None and args.fast_path == "today"
        fuse = lightning.eight_step is not None and args.fast_path == "fused"
        prepared_lightning = LightningFiles() if today else dataclasses.replace(lightning, fuse=fuse)
        slot_rank = args.slot_rank if args.user_lora == "slot" else 0
        allocated: dict[str, int | None] = {}

        def after_step(name: str) -> None:
            synchronize(device)  # the step's device work counts in its own time
            allocated[name] = allocated_bytes(device)

        before_quant = linear_weight_bytes(pipeline.transformer) if args.quant != "none" else None
        allocated["read"] = allocated_bytes(device)
        loaded = prepare_pipeline(ReadPipeline(model, pipeline, device), prepared_lightning,
                                  AccelerationSettings(quant=args.quant), slot_rank, after_step=after_step)
        if before_quant is not None:
            report["quant_linear_weight_bytes"] = {"before": before_quant,
                                                   "after": linear_weight_bytes(pipeline.transformer)}
        # The runner checks a fast job against the configured files (as it does LIGHTNING_LORA's).
        loaded.lightning = lightning
        job_loras = JobLoras(lightning=((lightning.eight_step, 1.0),) if today and lightning.eight_step else (),
                             user=user_files)
        slots = loaded.slots
        if args.user_lora == "slot":
            if slots is None:
                raise RuntimeError("build_slots built no LoRA slot (the transformer names no repeated blocks)")
            per_tree = [
                sum(p.numel() * p.element_size() for name, p in tree.named_parameters() if f".{SLOT_ADAPTER}." in name)
                for tree in slots.transformers()
            ]
            before_slots, after_slots = allocated["resident_copies"], allocated["slots"]
            report["slots"] = {
                "rank": slots.rank, "layers": len(slots.shapes), "trees": len(per_tree),
                "bytes": sum(per_tree), "bytes_per_tree": per_tree,
                "build_seconds": loaded.startup_seconds["slots"],
                "allocated_bytes_added": after_slots - before_slots
                if after_slots is not None and before_slots is not None else None,
            }
        report["startup_seconds"] = sum(loaded.startup_seconds.values())
        slot_text = (f", LoRA slots rank {args.slot_rank} x {report['slots']['trees']} tree(s) "
                     f"{report['slots']['bytes'] / 1e6:.1f} MB" if slots is not None else "")
        print(f"start-up work (--fast-path {args.fast_path}, --quant {args.quant}{slot_text}): "
              f"{report['startup_seconds']:.1f} s", flush=True)
        report["weights_allocated_bytes_after_startup"] = allocated_bytes(device)  # with the LoRA slots, when built

        if args.user_lora == "none":
            runner = PipelineRunner([loaded], device)
        else:
            # The worker's host cache of prepared LoRAs, at its default size: the warm-up run fills it. The runner's
            # stage clock times the LoRA step, the device synchronised on both sides of apply and remove.
            cache = PreparedLoraCache(Settings().lora_memory_cache_bytes)
            runner = PipelineRunner([loaded], device, lora_cache=cache, synchronize=lambda: synchronize(device))
            notes.append(_user_lora_note(args, report))
        prompt = prompt_for(pipeline, args.text_tokens, bench_model.embeddings_length)

        for size, mode in itertools.product(args.sizes, args.modes):
            print(f"running {mode} at {size}x{size} ...", flush=True)
            try:
                result = run_case(runner, mode, size, args, prompt, configs["transformer"], pipeline, device,
                                  peak["tflops_median"], lora_rank, bench_model, job_loras)
                print(f"  wall {result['median']['wall_ms']:.0f} ms, denoise {result['median']['denoise_ms']:.0f} "
                      f"ms, {fmt(result['achieved_tflops'], 'rate')} TFLOP/s", flush=True)
            except Exception as err:  # one failed case (out of memory, say) must not lose the others
                result = {"mode": mode, "size": [size, size], "error": f"{type(err).__name__}: {err}"}
                print(f"  FAILED: {result['error']}", flush=True)
            report["results"].append(result)
            write_json(report, json_path, quiet=True)
    finally:
        shutil.rmtree(lora_dir, ignore_errors=True)
    report["complete"] = True
    return report
