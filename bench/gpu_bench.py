#!/usr/bin/env python3
"""GPU benchmark of the worker's own generate path on full-size Qwen-Image with random bf16 weights.

What it does (a benchmark, not a test: it asserts nothing about time):

1. Measures a bf16 matmul peak on the GPU (8192^3 products, median of several batches) as the yardstick.
2. Builds the full-size transformer (QwenImageTransformer2DModel, ~20.4 B parameters), VAE (AutoencoderKLQwenImage,
   ~0.13 B) and text encoder (Qwen2.5-VL-7B, ~8.3 B) from the published configs in ``bench/configs/``. Parameters are
   created on the meta device (accelerate's ``init_empty_weights``; buffers and RoPE tables, a few KB, are computed
   as usual), allocated uninitialised on the GPU with ``to_empty`` and filled there: normal(0, 0.02) weights, zero
   biases, norm weights one. Nothing is downloaded and no weight is ever initialised on, or copied from, the CPU.
3. Assembles a ``QwenImagePipeline`` from them, the real scheduler config and the tiny tokenizer of
   ``builder/tiny_models.py`` (its token ids differ from Qwen2.5-VL's, but the template, the dropped prefix and the
   sequence lengths behave the same: the prompt is built to give exactly ``--text-tokens`` prompt embeddings, and
   the lengths the transformer really saw are recorded), wraps it in the worker's own ``LoadedPipeline`` /
   ``PipelineRunner`` (a synthetic ``ResolvedModel``) and times ``PipelineRunner.generate(GenerationJob(...))``:
   the worker's path, not a copy of it, with its own per-stage clock (``_StageClock``: encode_prompt, denoise,
   decode) reported as the worker reports it.
4. Modes: ``quality`` (50 steps, true CFG 4: two transformer forwards per step) and ``fast`` (the worker's go_fast:
   the Lightning scheduler and an 8-step LoRA applied per job, CFG off). The Lightning LoRA cannot be downloaded here,
   so a synthetic one with the real layout (``<module>.lora_down/lora_up.weight`` + ``.alpha`` on the 12 attention
   and MLP projections of every block, rank ``--lora-rank``) is written to a temporary file and loaded by the
   worker exactly as a real one would be (``--fast-lora none`` runs 8 steps without CFG and without any LoRA).
   ``--fast-path`` picks how: ``resident`` (default: read once onto a weight-sharing copy of the transformer, the
   worker's default), ``fused`` (LIGHTNING_FUSE: merged into the weights once) or ``today`` (loaded and removed per
   job, the worker's path before issue 12). ``--quant int8|fp8`` quantizes the transformer as TRANSFORMER_QUANT does,
   through the worker's own preparing step (``loading.prepare_pipeline``: fuse, quantize, resident copy, in its order).
   ``--user-lora slot|per-job`` adds a user LoRA to every job of every mode: a synthetic one in diffusers' layout
   (``transformer.<module>.lora_A/B.weight``, rank ``--user-lora-rank``, on the same 12 projections), written once
   and served from the worker's prepared-LoRA host cache (``PreparedLoraCache``, filled by the warm-up run). ``slot``
   builds the LoRA slots at start-up in the worker's preparing step (after quantization and the resident copies,
   rank ``--slot-rank``, default the worker's LORA_SLOT_RANK) and the runner copies the LoRA into
   the slot of the tree the job runs on (a fast job: the Lightning copy's slot copy); ``per-job`` builds none and the
   runner loads and removes it per job (``loras.applied_loras``, as with LORA_SLOT_RANK=0). The runner's LoRA step
   (``trees.job_tree``), timed by the worker's own stage clock (``runner._StageClock.lora_step``, the device
   synchronised around apply and remove through the runner's ``synchronize``), is reported as ``lora``, a part of
   ``other``; the JSON records the path, the ranks, the slots' bytes and the tree each job ran on.
5. Reports, per mode and size: the worker's stage times, the denoise span on the GPU timeline (CUDA events in
   transformer hooks: the worker's clock is a host clock and may end before the GPU has finished), other time
   (LoRA load/unload, scheduler swap), peak GPU memory (``torch.cuda.max_memory_allocated``), the analytic FLOPs of
   every transformer forward that ran, achieved TFLOP/s and its fraction of the matmul peak. One table on stdout,
   everything (raw runs included) in JSON, with the versions of torch, diffusers, transformers, peft, the GPU, its
   driver and CUDA.

Analytic FLOPs of one transformer forward (``transformer_forward_flops``), for N image tokens ((H/16)*(W/16)) and T
text tokens (the prompt embeddings), S = N + T, D = heads*head_dim = 3072, L = 60 blocks, F = 4*D (the MLP width):

    blocks      2*S*(4*D^2 + 2*D*F)*L      each token goes through its stream's q, k, v, out and MLP projections
                                           (image and text streams have their own weights of the same shapes)
    attention   4*S^2*D*L                  Q.K^T and P.V over the joint image+text sequence, all heads
    modulation  2*2*(D*6D)*L               img_mod/txt_mod act once per sample, not per token
    embeddings  2*N*64*D + 2*T*3584*D + 2*N*D*64 + timestep MLP + norm_out
    LoRA        2*S*r*(10*D + 2*F)*L       rank-r A/B pairs on the 12 projections per block: Lightning's in fast
                                           mode, plus --user-lora's (a LoRA slot runs its own rank, whatever the
                                           LoRA's; its pairs on img_mod/txt_mod act once per sample, left out)

Element-wise work (norms, RoPE, GELU, softmax, modulation, residuals) and biases are left out (< 1 %). At 1024^2
(N = 4096) this is ~7e13 FLOP per forward, the issue's figure (~6.8 B parameters act per token: 12*D^2*L).

``--model qwen-image-2.1`` builds Qwen-Image-2.1 instead (QwenImage21Transformer2DModel 7.1 B, Qwen3-VL 8.8 B,
AutoencoderKLQwenImage21 0.34 B from ``bench/configs/qwen-image-2.1/``; the tiny Qwen3-VL processor of
builder/tiny_models.py) and times its card's defaults (``quality``: 40 steps, no CFG) and ``cfg4`` (50 steps, true
CFG 4, the settings of the issue's anchor, vLLM-Omni's 7.96 s at 1024^2: someone else's number, printed beside ours
and labelled so). Its FLOP formula is ``qwen21_forward_flops`` (single-stream blocks, 13*D^2*L weights per token,
block-causal attention, the pipeline's KV cache of the text after the first step). What differs per model is one
entry of BENCH_MODELS (configs, classes, text inputs, FLOP formula, modes, sizes, anchor).

Usage (on a CUDA machine; see docs/PERFORMANCE.md, "GPU", for carrying diffusers to the lent machine):

    python bench/gpu_bench.py                                   # quality + fast at 1024^2 and 1328^2
    python bench/gpu_bench.py --steps-quality 10 --repeat 2     # time 10 quality steps, extrapolate to 50
    python bench/gpu_bench.py --sizes 1024 --modes fast --json out.json
    python bench/gpu_bench.py --sizes 1024 --modes fast --fast-path today    # the per-job Lightning load, to compare
    python bench/gpu_bench.py --sizes 1024 --quant fp8           # TRANSFORMER_QUANT=fp8 (compute capability 8.9+)
    python bench/gpu_bench.py --sizes 1024 --steps-quality 10 --user-lora slot     # a user LoRA in the LoRA slot
    python bench/gpu_bench.py --sizes 1024 --steps-quality 10 --user-lora per-job  # the same LoRA loaded per job
    python bench/gpu_bench.py --describe                        # parameter counts and FLOPs only, no GPU
    python bench/gpu_bench.py --tiny --device cpu --sizes 256 --steps-quality 2   # logic check on a CPU
    python bench/gpu_bench.py --model qwen-image-2.1            # 2.1: quality + cfg4 at 1024^2 and 2048^2
    python bench/gpu_bench.py --model qwen-image-2.1 --describe # its parameters, FLOPs per forward and per image

This file is the command line; the parts live in ``bench/gpu/``, one concern per module (its ``__init__`` lists them).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the gpu package, also when loaded by file path

import gpu  # noqa: E402,F401  (first: it sets the offline switches and sys.path before any Hugging Face import)
import torch  # noqa: E402
from gpu.build import LIGHTNING_RANK, TINY_LORA_RANK, USER_LORA_RANK  # noqa: E402
from gpu.flops import (  # noqa: E402,F401  (the FLOP model, read from here by tests/test_gpu_bench.py)
    qwen21_forward_flops,
    qwen21_transformer_params,
    transformer_forward_flops,
)
from gpu.models import BENCH_MODELS, QWEN_IMAGE, TINY_SIZES  # noqa: E402
from gpu.report import print_table, write_json  # noqa: E402
from gpu.run import bench, describe  # noqa: E402

DEFAULT_TEXT_TOKENS = 64


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.replace(",", " ").split()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from qwen_worker.config import Settings

    default_slot_rank = Settings().lora_slot_rank  # LORA_SLOT_RANK's default: the worker's own, never a copy
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=tuple(BENCH_MODELS), default=QWEN_IMAGE.name,
                        help="the architecture to build from its bench/configs folder (default qwen-image)")
    parser.add_argument("--sizes", nargs="+", type=_int_list,
                        help="square sides, e.g. 1024 1328 (qwen-image's default; qwen-image-2.1: 1024 2048) or "
                        "1024,1328")
    parser.add_argument("--modes", nargs="+", default=None,
                        help="qwen-image: quality and/or fast; qwen-image-2.1: quality (40 steps, no CFG) and/or "
                        "cfg4 (50 steps, CFG 4, the anchor's settings); default all of the model's; commas allowed")
    parser.add_argument("--steps-quality", type=int, default=None,
                        help="steps to time in the modes other than fast (default: the mode's full run, 50 or 40); "
                        "fewer are extrapolated to the full run, clearly labelled")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed runs per case first (quality warm-ups run 2 steps)")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per case (medians reported)")
    parser.add_argument("--json", type=Path, default=None,
                        help="write the report here (default $TMPDIR/qwen-bench/gpu_bench.json)")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu with --tiny")
    parser.add_argument("--tiny", action="store_true", help="builder/tiny_models.py's tiny configs: a logic check")
    parser.add_argument("--describe", action="store_true",
                        help="build the models on the meta device only: parameter counts and FLOPs per step, no GPU")
    parser.add_argument("--fast-lora", choices=("synthetic", "none"), default="synthetic",
                        help="fast mode with a synthetic Lightning-layout LoRA (the worker's go_fast), "
                        "or 8 plain steps")
    parser.add_argument("--fast-path", choices=("resident", "fused", "today"), default="resident",
                        help="how fast mode gets its Lightning LoRA: resident copy (default), fused once "
                        "(LIGHTNING_FUSE), or loaded per job (the path before issue 12)")
    parser.add_argument("--quant", choices=("none", "int8", "fp8"), default="none",
                        help="TRANSFORMER_QUANT: torchao int8 weight-only or fp8 (compute capability 8.9+)")
    parser.add_argument("--lora-rank", type=int, default=None,
                        help=f"synthetic LoRA rank (default {LIGHTNING_RANK}; tiny {TINY_LORA_RANK})")
    parser.add_argument("--user-lora", choices=("none", "slot", "per-job"), default="none",
                        help="every job also carries a synthetic user LoRA (diffusers layout): written into the "
                        "LoRA slot built at start-up (slot, the worker's default), or loaded and removed per job "
                        "(per-job, LORA_SLOT_RANK=0); none (default): no user LoRA")
    parser.add_argument("--user-lora-rank", type=int, default=USER_LORA_RANK,
                        help=f"the synthetic user LoRA's rank (default {USER_LORA_RANK})")
    parser.add_argument("--slot-rank", type=int, default=None,
                        help=f"LORA_SLOT_RANK with --user-lora slot (default the worker's, {default_slot_rank})")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                        help="weights and matmul-peak dtype (auto: bf16 on CUDA, float32 on a CPU, as the worker)")
    parser.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS,
                        help=f"prompt embeddings the transformer reads (default {DEFAULT_TEXT_TOKENS})")
    args = parser.parse_args(argv)
    bench_model = BENCH_MODELS[args.model]
    args.sizes = [size for group in args.sizes for size in group] if args.sizes else None
    modes = [m for group in (args.modes or bench_model.modes) for m in group.replace(",", " ").split()]
    unknown = [m for m in modes if m not in bench_model.modes]
    if unknown:
        parser.error(f"unknown mode(s) {unknown} for {args.model}: choose from {', '.join(bench_model.modes)}")
    args.modes = modes
    if (args.steps_quality is not None and args.steps_quality < 1) or args.warmup < 0 or args.repeat < 1:
        parser.error("--steps-quality and --repeat must be >= 1, --warmup >= 0")
    if args.describe:
        return args
    if not args.sizes:
        args.sizes = list(TINY_SIZES if args.tiny else bench_model.default_sizes)
    low, high, multiple = 256, bench_model.max_side, bench_model.size_multiple
    for size in args.sizes:
        if size % multiple or not low <= size <= high:
            parser.error(f"size {size}: {args.model} sides must be multiples of {multiple} from {low} to {high} "
                         "(the worker's rule)")
    if args.user_lora == "none":
        if args.slot_rank is not None or args.user_lora_rank != USER_LORA_RANK:
            parser.error("--slot-rank and --user-lora-rank need --user-lora slot or per-job")
    elif args.model != QWEN_IMAGE.name:
        parser.error(f"--user-lora is wired for {QWEN_IMAGE.name} only (its synthetic LoRA targets that model's "
                     "block projections)")
    elif args.warmup < 1:
        parser.error("--user-lora needs --warmup >= 1: the warm-up run fills the prepared-LoRA cache, as a worker's "
                     "first job with that LoRA does")
    elif args.user_lora_rank < 1:
        parser.error("--user-lora-rank must be >= 1")
    elif args.user_lora == "per-job":
        if args.slot_rank is not None:
            parser.error("--slot-rank needs --user-lora slot (per-job is the worker with LORA_SLOT_RANK=0)")
        args.slot_rank = 0
    else:
        args.slot_rank = default_slot_rank if args.slot_rank is None else args.slot_rank
        if args.fast_path == "today":
            parser.error("--user-lora slot with --fast-path today: the per-job Lightning file and the user LoRA "
                         "would share the slot; time the slot with --fast-path resident or fused")
        if not 1 <= args.user_lora_rank <= args.slot_rank:
            parser.error(f"--user-lora slot: the LoRA's rank {args.user_lora_rank} must fit the slot's "
                         f"(--slot-rank {args.slot_rank}), or the worker loads it per job")
    if args.device.startswith("cpu") and not args.tiny:
        parser.error("--device cpu is allowed only with --tiny (the full-size models need a GPU)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device is visible: run on the lent GPU, or use --tiny --device cpu / --describe here")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    name = "gpu_bench_describe.json" if args.describe else "gpu_bench.json"
    default = Path(tempfile.gettempdir()) / "qwen-bench" / name
    json_path = args.json or default
    if args.describe:
        report = describe(args)
    else:
        report = bench(args, json_path)
        print_table(report)
    write_json(report, json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
