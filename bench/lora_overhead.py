#!/usr/bin/env python3
"""CPU benchmark of what a fast job and a user-LoRA job cost per job, before any denoising: `make bench-lora`.

A benchmark, not a test: it asserts nothing. It prints one table, `today` (the per-job path this worker used until
issue 12) beside `new` (what the worker does now), for

- a fast job: today, the Lightning file is read, parsed, converted and injected as peft adapters for the job, and
  unloaded after it; new, the pipeline's transformer is switched to the resident Lightning copy
  (``trees.job_tree``) and back;
- a user-LoRA job (the same LoRA as an earlier job): today, the same read/parse/convert/inject/unload; new, what
  ``trees.job_tree`` does: the prepared LoRA from a warm ``PreparedLoraCache``, ``LoraSlots.plan`` and
  ``LoraSlots.fill`` (its weights copied into the LoRA slot), the slot copy switched in and back; and, for a LoRA
  that does not fit the slot, ``loras.applied_loras`` with the warm cache (inject from memory, unload);

on a transformer of the real width (``bench/configs/transformer_config.json``: 24 heads x 128, joint width 3584, MLP
4x) with ``num_layers`` cut to ``--blocks``, in bf16 (the checkpoints' and the LoRA files' dtype), per block and
extrapolated linearly to the real 60 blocks. The LoRA files are synthetic, with the real layouts: the Lightning file
``<module>.lora_down/lora_up.weight`` + ``.alpha`` at rank 64 on the 12 attention and MLP projections of each block
(60 blocks: ~0.85 GB, the real 8-step file's size), the user LoRA diffusers' ``transformer.<module>.lora_A/B`` at
``--user-rank``. Files are read from the page cache (each is read once before timing): a cold disk makes `today`
slower still, `new` not at all.

It also prints the host time per transformer forward that peft wrappers add to a plain job, the cost of the rejected
option of keeping Lightning on the one transformer and disabling it for plain jobs: one disabled wrapper call against
its base layer's call, on a narrow layer (24 tokens) where the matmul takes microseconds and does not hide the Python
work, which does not depend on the width; then x 720 (12 wrapped projections per block x 60).

    make bench-lora                  # = .venv/bin/python bench/lora_overhead.py
    .venv/bin/python bench/lora_overhead.py --blocks 4 --repeat 7
    .venv/bin/python bench/lora_overhead.py --tiny --repeat 1   # a narrow transformer: checks the script runs only

On a GPU the slot copy moves the LoRA from host to device memory; here it is a host-to-host copy of the same bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from gpu.build import LIGHTNING_RANK, write_synthetic_lora  # noqa: E402  (bench/gpu/, beside the script)

from qwen_worker.adapters import FastModes, resident_lightning  # noqa: E402
from qwen_worker.config import Settings  # noqa: E402
from qwen_worker.lora_files import PreparedLoraCache, prepared_loras, verify_safetensors  # noqa: E402
from qwen_worker.lora_slots import build_slots  # noqa: E402
from qwen_worker.loras import applied_loras  # noqa: E402
from qwen_worker.schema import FastMode  # noqa: E402
from qwen_worker.trees import swapped_transformer  # noqa: E402

REAL_BLOCKS = 60
# Goals of issue 12.
GOAL_SWITCH_MS = 50.0
GOAL_SWITCH_FRACTION = 0.02
GOAL_CACHED_FRACTION = 0.20
GOAL_PLAIN_OVERHEAD_MS = 1.0


def real_transformer(blocks: int, dtype: torch.dtype) -> Any:
    from diffusers import QwenImageTransformer2DModel

    config = json.loads((ROOT / "bench/configs/transformer_config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config["num_layers"] = blocks
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(**config).to(dtype).eval()


def narrow_transformer() -> Any:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    ).eval()  # fmt: skip


def write_lora(path: Path, transformer: Any, rank: int, *, lightning: bool, seed: int) -> int:
    """gpu_bench's synthetic LoRA (its 12 projections of every block, Lightning's or diffusers' layout), in the
    transformer's own dtype; returns the file's bytes."""
    dtype = next(transformer.parameters()).dtype
    written = write_synthetic_lora(path, transformer, rank, torch.device("cpu"), dtype, lightning=lightning, seed=seed)
    return int(written["bytes"])


def today(pipeline: Any, path: Path) -> None:
    """The per-job path of loras.applied_loras before issue 12, call for call: check the header, load_lora_weights
    (read, parse, convert, inject), set_adapters, and unload_lora_weights after the job."""
    verify_safetensors(path, "loras[0]")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline.load_lora_weights(str(path), adapter_name="job_0", use_safetensors=True, local_files_only=True)
    pipeline.set_adapters(["job_0"], adapter_weights=[1.0])
    pipeline.unload_lora_weights()
    vars(pipeline.transformer).pop("_hf_peft_config_loaded", None)


def timed(function: Callable[[], Any], repeat: int) -> list[float]:
    function()  # untimed: first-call imports and allocations
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def forward_ms(transformer: Any, repeat: int) -> float:
    """Median ms of one forward at a tiny token count (4x4 latent patches, 8 text tokens)."""
    image_tokens, text_tokens = 16, 8
    inputs = {
        "hidden_states": torch.randn(1, image_tokens, 64),
        "encoder_hidden_states": torch.randn(1, text_tokens, transformer.config.joint_attention_dim),
        "encoder_hidden_states_mask": torch.ones(1, text_tokens, dtype=torch.long),
        "timestep": torch.tensor([0.5]),
        "img_shapes": [(1, 4, 4)],
        "return_dict": False,
    }
    with torch.inference_mode():
        for _ in range(20):
            transformer(**inputs)
        samples = []
        for _ in range(repeat):
            started = time.perf_counter()
            transformer(**inputs)
            samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def wrapper_overhead(folder: Path, calls: int = 20000) -> dict[str, float]:
    """Host time per forward that disabled peft wrappers would add to a plain job: the rejected single-tree option.

    Timed per layer, since a whole forward's noise on a shared machine is larger than the effect: one wrapped
    projection of a narrow transformer (Lightning loaded, then disabled as a plain job would have it) against its
    own base layer, ``calls`` calls each, interleaved rounds, the best round of each (the least disturbed). The
    wrapper's Python work does not depend on the layer's width.
    """
    from diffusers import QwenImagePipeline

    transformer = narrow_transformer()
    pipeline = QwenImagePipeline(transformer=transformer, scheduler=None, vae=None, text_encoder=None, tokenizer=None)
    path = folder / "narrow-lightning.safetensors"
    write_lora(path, transformer, 4, lightning=True, seed=3)
    single = resident_lightning(pipeline, {FastMode.REGULAR: path}, "narrow").copies[FastMode.REGULAR]
    single.disable_lora()
    wrapper = single.transformer_blocks[0].attn.to_q
    base = wrapper.get_base_layer()
    x = torch.randn(1, 24, base.in_features)
    best = {"base": float("inf"), "disabled": float("inf")}
    threads = torch.get_num_threads()
    # One thread: on a tiny matmul, OpenMP's hand-off between threads costs more than the work and varies with load.
    torch.set_num_threads(1)
    with torch.inference_mode():
        for _ in range(7):
            for name, layer in (("base", base), ("disabled", wrapper)):
                started = time.perf_counter()
                for _ in range(calls):
                    layer(x)
                best[name] = min(best[name], (time.perf_counter() - started) / calls * 1e6)
    torch.set_num_threads(threads)
    per_wrapper_us = best["disabled"] - best["base"]
    return {
        "base_layer_us": best["base"],
        "disabled_wrapper_us": best["disabled"],
        "per_wrapper_us": per_wrapper_us,
        "real_model_ms_per_forward": per_wrapper_us * 12 * REAL_BLOCKS / 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=2, help="transformer blocks at the real width (default 2)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case; medians are reported")
    parser.add_argument("--lightning-rank", type=int, default=LIGHTNING_RANK)
    parser.add_argument("--user-rank", type=int, default=32)
    parser.add_argument("--slot-rank", type=int, default=Settings().lora_slot_rank,
                        help="LORA_SLOT_RANK of the slot path (default: the worker's)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="a narrow transformer: checks the script only")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    from diffusers import QwenImagePipeline

    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        folder = Path(tmp)
        built = time.perf_counter()
        transformer = narrow_transformer() if args.tiny else real_transformer(args.blocks, torch.bfloat16)
        args.blocks = len(transformer.transformer_blocks)
        pipeline = QwenImagePipeline(
            transformer=transformer, scheduler=None, vae=None, text_encoder=None, tokenizer=None
        )
        lightning, user = folder / "lightning.safetensors", folder / "user.safetensors"
        sizes = {
            "lightning": write_lora(lightning, transformer, args.lightning_rank, lightning=True, seed=1),
            "user": write_lora(user, transformer, args.user_rank, lightning=False, seed=2),
        }
        for path in (lightning, user):
            path.read_bytes()  # into the page cache: both paths then read from memory
        kind = "narrow (--tiny)" if args.tiny else "real-width"
        print(f"built {args.blocks}-block {kind} transformer in {time.perf_counter() - built:.1f} s", flush=True)

        started = time.perf_counter()
        fast = resident_lightning(pipeline, {FastMode.REGULAR: lightning}, "bench")
        startup_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        slots = build_slots(pipeline, FastModes(), args.slot_rank, "bench")
        slots_ms = (time.perf_counter() - started) * 1000
        assert slots is not None
        slot_bytes = sum(
            tensor.numel() * tensor.element_size()
            for name, tensor in slots.tree_for(FastMode.NONE).named_parameters()
            if ".slot." in name
        )

        def new_fast() -> None:
            with swapped_transformer(pipeline, fast.copies[FastMode.REGULAR]):
                pass

        cache = PreparedLoraCache(max_bytes=1 << 40)

        def slot_user() -> None:
            # trees.job_tree's slot path, call for call
            plan = slots.plan(prepared_loras([(user, 1.0)], cache))
            with swapped_transformer(pipeline, slots.fill(FastMode.NONE, plan).module):
                pass

        def new_user() -> None:
            with applied_loras(pipeline, [(user, 1.0)], cache):
                pass

        def cold_user() -> None:
            with applied_loras(pipeline, [(user, 1.0)], None):
                pass

        repeat = args.repeat
        results = {
            "fast job (Lightning)": (timed(lambda: today(pipeline, lightning), repeat), timed(new_fast, repeat)),
            "user-LoRA job, repeated (LoRA slot)": (timed(lambda: today(pipeline, user), repeat),
                                                     timed(slot_user, repeat)),
            "user-LoRA job, repeated (no slot: loaded per job from memory)": (None, timed(new_user, repeat)),
            "user-LoRA job, first use (no slot, no memory cache)": (None, timed(cold_user, repeat)),
        }  # fmt: skip
        assert cache.hits >= 2 * args.repeat and cache.misses == 1
        overhead = wrapper_overhead(folder)

    scale = REAL_BLOCKS / args.blocks
    print()
    print(f"Per-job cost before denoising, ms (median of {args.repeat}); real width, {args.blocks} blocks measured, "
          f"x{scale:g} for {REAL_BLOCKS} blocks")  # fmt: skip
    header = "| job | path | per block | 60 blocks (extrapolated) | new / today |"
    print(header)
    print("|---|---|---:|---:|---:|")
    report: dict[str, Any] = {"blocks": args.blocks, "repeat": args.repeat, "file_bytes": sizes, "rows": {},
                              "slot_rank": args.slot_rank, "slot_bytes": slot_bytes, "tiny": args.tiny}  # fmt: skip
    for job, (old, new) in results.items():
        new_ms = statistics.median(new)
        old_ms = statistics.median(old) if old is not None else None
        for label, value in (("today", old_ms), ("new", new_ms)):
            if value is None:
                continue
            ratio = f"{new_ms / old_ms:.2%}" if label == "new" and old_ms else ""
            print(f"| {job} | {label} | {value / args.blocks:.3f} | {value * scale:.1f} | {ratio} |")
        report["rows"][job] = {"today_ms": old_ms, "new_ms": new_ms, "today_samples": old, "new_samples": new}
    print()
    print(f"Start-up, once: Lightning resident copy built and loaded in {startup_ms:.0f} ms for {args.blocks} blocks "
          f"(~{startup_ms * scale / 1000:.1f} s for 60); LoRA slot (rank {args.slot_rank}) built in {slots_ms:.0f} ms "
          f"(~{slots_ms * scale / 1000:.1f} s for 60), {slot_bytes / 1e6:.1f} MB (~{slot_bytes * scale / 1e9:.2f} GB "
          f"for 60); LoRA files: Lightning {sizes['lightning'] / 1e6:.1f} MB, user {sizes['user'] / 1e6:.1f} MB "
          f"for {args.blocks} blocks")  # fmt: skip
    print()
    print("Host time per forward that disabled Lightning wrappers would add to a plain job (one tree, rejected):")
    print(f"| base layer call | disabled peft wrapper call | added per wrapper | x {12 * REAL_BLOCKS} wrappers |")
    print("|---:|---:|---:|---:|")
    print(f"| {overhead['base_layer_us']:.1f} us | {overhead['disabled_wrapper_us']:.1f} us | "
          f"{overhead['per_wrapper_us']:.1f} us | {overhead['real_model_ms_per_forward']:.2f} ms per forward |")
    fast_today, fast_new = (statistics.median(x or [0.0]) * scale for x in results["fast job (Lightning)"])
    user_today, user_new = (
        statistics.median(x or [0.0]) * scale for x in results["user-LoRA job, repeated (LoRA slot)"]
    )
    print()
    print("Goals (issue 12):")
    switch_met = fast_new <= GOAL_SWITCH_MS and fast_new <= GOAL_SWITCH_FRACTION * fast_today
    print(f"- Lightning switch {fast_new:.3f} ms <= {GOAL_SWITCH_MS:g} ms and {fast_new / fast_today:.4%} <= "
          f"{GOAL_SWITCH_FRACTION:.0%} of today: {'met' if switch_met else 'NOT met'}")
    print(f"- cached user LoRA (slot) {user_new / user_today:.1%} of today <= {GOAL_CACHED_FRACTION:.0%}: "
          f"{'met' if user_new <= GOAL_CACHED_FRACTION * user_today else 'NOT met'}")
    print(f"- plain-job overhead: resident copy 0 ms (a plain job runs the untouched transformer, not a wrapper in "
          f"it); one tree with Lightning disabled would add {overhead['real_model_ms_per_forward']:.2f} ms <= "
          f"{GOAL_PLAIN_OVERHEAD_MS:g} ms per forward: "
          f"{'met' if overhead['real_model_ms_per_forward'] <= GOAL_PLAIN_OVERHEAD_MS else 'NOT met'}")
    report["wrapper_overhead"] = overhead
    report["machine"] = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                         "threads": torch.get_num_threads(), "processor": platform.processor()}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
