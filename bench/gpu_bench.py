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
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import importlib.metadata
import itertools
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Before any Hugging Face import: they read these once. Nothing here may download anything.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "builder"))

import torch  # noqa: E402
from synthetic_loras import (  # noqa: E402  (builder/: the synthetic LoRA files tests write too)
    LIGHTNING_MODULES,
    parameters,
    random_pairs,
    write_diffusers,
    write_down_up,
)

QUALITY_STEPS = 50
QUALITY_CFG = 4.0
FAST_STEPS = 8  # what the worker's go_fast (FastMode.REGULAR) runs
DEFAULT_SIZES = (1024, 1328)
TINY_SIZES = (256,)
QWEN21_STEPS = 40  # Qwen-Image-2.1's card: 40 steps, no true CFG
QWEN21_NEGATIVE_PROMPT = "blurry, low quality"  # 2.1 runs true CFG only against a non-blank negative prompt
WARMUP_STEPS = 2  # quality warm-up runs this many steps: same shapes and kernels, a fraction of the time
MATMUL_N = 8192
TINY_MATMUL_N = 256
LIGHTNING_RANK = 64  # the Qwen-Image-Lightning files' rank as commonly reported (DiffSynth loads them at alpha 8/64)
TINY_LORA_RANK = 4
USER_LORA_RANK = 32  # --user-lora's synthetic LoRA (tiny runs too: it still fits the default slot)
DEFAULT_TEXT_TOKENS = 64
SEED = 0
NORMAL_STD = 0.02
GIB = 1024**3

# Words that the tiny tokenizer (BPE learnt on the pipelines' templates) encodes as one token each after a space.
PROMPT_WORDS = ("the", "color", "shape", "size", "texture", "of", "objects", "and", "background", "image")


@dataclass(frozen=True)
class ModeSpec:
    """One benchmarked way of running the model: a full run's steps and true CFG, or the worker's fast mode."""

    steps: int
    true_cfg_scale: float  # 1: no true CFG, one transformer forward per step
    negative_prompt: str | None = None  # None: the worker's own (" " under true CFG on Qwen-Image)
    fast: bool = False  # the worker's go_fast: Lightning scheduler and 8-step LoRA, CFG off


@dataclass(frozen=True)
class BenchModel:
    """What differs between the benchmarked models (BENCH_MODELS, below the functions it names)."""

    name: str  # --model
    model_id: str  # the repo whose architecture is built (random weights)
    config_dir: Path  # its published component configs
    pipeline_class: str  # diffusers
    transformer_class: str  # diffusers
    vae_class: str  # diffusers
    text_encoder_classes: tuple[str, str]  # transformers config class, model class
    text_inputs: Callable[[], tuple[dict[str, Any], Any]]  # the pipeline's tokenizer/processor kwargs, the tokenizer
    tiny_configs: Callable[[Any], dict[str, dict[str, Any]]]  # builder/tiny_models.py's configs (--tiny)
    embeddings_length: Callable[[Any, str], int]  # prompt embeddings the transformer reads for a prompt
    forward_flops: Callable[..., dict[str, float]]  # (config, image_tokens, text_tokens, lora_rank, cached)
    active_params: Callable[[dict[str, Any]], float]  # block weights per token
    formula_params: Callable[[dict[str, Any]], float]  # the weights the FLOP formula counts
    modes: dict[str, ModeSpec]
    default_sizes: tuple[int, ...]
    size_multiple: int  # the worker's size rule for the model
    max_side: int
    kv_cache: bool = False  # later steps read the text's K/V from a cache (their forwards cost less)
    anchor: dict[str, Any] | None = None  # someone else's published time, shown beside ours, labelled as theirs


# ---------------------------------------------------------------------------------------------------- environment


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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------- FLOPs


def transformer_forward_flops(
    config: dict[str, Any], image_tokens: int, text_tokens: int, lora_rank: int = 0, cached: bool = False
) -> dict[str, float]:
    """Analytic FLOPs of one QwenImageTransformer2DModel forward for one sample (see the module docstring).

    A multiply-add counts 2. ``config`` is the transformer's config (published or tiny). ``cached`` is ignored:
    Qwen-Image keeps no cache between steps (it is there for the model table's common signature)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    layers = config["num_layers"]
    ff = 4 * d  # diffusers FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate"): mult 4
    joint = config["joint_attention_dim"]
    c_in = config["in_channels"]
    c_out = config["patch_size"] ** 2 * (config.get("out_channels") or c_in)
    s = image_tokens + text_tokens
    per_token_block = 4 * d * d + 2 * d * ff  # q, k, v, out + MLP in/out, one stream's weights
    blocks = 2.0 * s * per_token_block * layers
    attention = 4.0 * s * s * d * layers
    modulation = 2.0 * 2 * (d * 6 * d) * layers
    timestep = 2.0 * (256 * d + d * d)  # sinusoidal 256 -> D -> D
    embeddings = 2.0 * image_tokens * c_in * d + 2.0 * text_tokens * joint * d + 2.0 * image_tokens * d * c_out
    norm_out = 2.0 * d * 2 * d
    lora = 2.0 * s * lora_rank * (10 * d + 2 * ff) * layers if lora_rank else 0.0
    total = blocks + attention + modulation + timestep + embeddings + norm_out + lora
    return {
        "total": total,
        "blocks_linear": blocks,
        "attention": attention,
        "modulation": modulation,
        "embeddings": embeddings + timestep + norm_out,
        "lora": lora,
    }


def active_params_per_token(config: dict[str, Any]) -> float:
    """Block weights each token goes through (one stream's q, k, v, out and MLP): 12*D^2*L."""
    return 12 * (config["num_attention_heads"] * config["attention_head_dim"]) ** 2 * config["num_layers"]


def analytic_transformer_params(config: dict[str, Any]) -> float:
    """The weight count the FLOP formula assumes (no biases or norms): a cross-check against the real module."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    ff = 4 * d
    c_out = config["patch_size"] ** 2 * (config.get("out_channels") or config["in_channels"])
    per_block = 2 * (4 * d * d + 2 * d * ff) + 2 * (d * 6 * d)
    return (
        per_block * config["num_layers"]
        + config["in_channels"] * d
        + config["joint_attention_dim"] * d
        + d * c_out
        + 256 * d
        + d * d
        + d * 2 * d
    )


def qwen21_forward_flops(
    config: dict[str, Any], image_tokens: int, text_tokens: int, lora_rank: int = 0, cached: bool = False
) -> dict[str, float]:
    """Analytic FLOPs of one QwenImage21Transformer2DModel forward for one sample, text-to-image (diffusers 0.42.1).

    The 2.1 transformer is single-stream: text and image tokens share every block's weights. Per block: q, k, v, out
    (D x D each, no biases) and a SwiGLU MLP (proj and gate D -> F, out F -> D; F = mlp_ratio*D = 3D), so a token
    goes through 13*D^2 weights per block. The VAE compresses 16x and patch_size is 1: N = (H/16)*(W/16) image
    tokens. Attention is block-causal: text tokens attend causally (T(T+1)/2 pairs), the image block to the whole
    text and to itself (N*(T+N)). With causal_condition the text is modulated from t = 0, so the pipeline
    (use_kv_cache=True, its default) prefills text+image in the first step (``cached`` False: S = T+N tokens through
    the blocks) and later steps (``cached`` True) run only the N image tokens, attending to the cached text K/V.
    Per sample and forward: txt_in (norm, C -> D -> D) on the T text embeddings, img_in (64 -> D), one shared
    modulation (D -> 4D) and norm_out (D -> D) on two rows (the timestep's and t = 0's), proj_out (D -> 64) on every
    token that went through the blocks. Norms, RoPE, SiLU/GELU, gates, residuals left out (< 1 %)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    layers = config["num_layers"]
    ff = config["mlp_ratio"] * d
    context = config["context_in_dim"]
    patch = config["patch_size"]
    c_in = config["in_channels"] * patch * patch
    c_out = patch * patch * (config.get("out_channels") or config["in_channels"])
    n, t = image_tokens, text_tokens
    through_blocks = n if cached else n + t
    pairs = n * (t + n) + (0 if cached else t * (t + 1) // 2)
    blocks = 2.0 * through_blocks * (4 * d * d + 3 * d * ff) * layers
    attention = 4.0 * pairs * d * layers  # Q.K^T and P.V, all heads
    rows = 2 if config.get("causal_condition", True) else 1  # the sample's timestep row and t = 0's
    modulation = 2.0 * rows * (d * 4 * d)  # one shared modulation for every block
    timestep = 2.0 * rows * (256 * d + d * d)
    embeddings = 2.0 * t * (context * d + d * d) + 2.0 * n * c_in * d + 2.0 * through_blocks * d * c_out
    norm_out = 2.0 * rows * d * d
    # rank-r A/B pairs on q, k, v, out (D+D each) and proj, gate, out (D+F each), for the tokens in the blocks
    lora = 2.0 * through_blocks * lora_rank * (8 * d + 3 * (d + ff)) * layers if lora_rank else 0.0
    total = blocks + attention + modulation + timestep + embeddings + norm_out + lora
    return {
        "total": total,
        "blocks_linear": blocks,
        "attention": attention,
        "modulation": modulation,
        "embeddings": embeddings + timestep + norm_out,
        "lora": lora,
    }


def qwen21_active_params_per_token(config: dict[str, Any]) -> float:
    """Block weights each token goes through: (4 + 3*mlp_ratio)*D^2*L (13*D^2*L at mlp_ratio 3)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    return (4 + 3 * config["mlp_ratio"]) * d * d * config["num_layers"]


def qwen21_transformer_params(config: dict[str, Any]) -> float:
    """The weight count qwen21_forward_flops assumes (2.1 has no biases; norms left out)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    patch = config["patch_size"]
    c_in = config["in_channels"] * patch * patch
    c_out = patch * patch * (config.get("out_channels") or config["in_channels"])
    return (
        qwen21_active_params_per_token(config)
        + config["context_in_dim"] * d + d * d  # txt_in
        + c_in * d  # img_in
        + d * 4 * d  # modulation
        + 256 * d + d * d  # timestep MLP
        + d * d  # norm_out
        + d * c_out  # proj_out
    )


# ------------------------------------------------------------------------------------------------------- building


def load_configs(model: BenchModel, tiny: bool, tokenizer: Any) -> dict[str, dict[str, Any]]:
    """The four component configs: the published ones from the model's bench/configs folder, or
    builder/tiny_models.py's tiny ones (``tokenizer`` sizes the tiny text encoder's vocabulary)."""
    if not tiny:
        return {
            name: json.loads((model.config_dir / f"{name}_config.json").read_text())
            for name in ("transformer", "vae", "text_encoder", "scheduler")
        }
    with _quiet_construction():
        return model.tiny_configs(tokenizer)


def _tiny_qwen_image_configs(tokenizer: Any) -> dict[str, dict[str, Any]]:
    import tiny_models

    return {
        "transformer": dict(tiny_models._transformer().config),
        "vae": dict(tiny_models._vae().config),
        "text_encoder": tiny_models._text_encoder(tokenizer).config.to_dict(),
        "scheduler": dict(tiny_models.SCHEDULER_CONFIG),
    }


def _tiny_qwen21_configs(tokenizer: Any) -> dict[str, dict[str, Any]]:
    import tiny_models

    return {
        "transformer": dict(tiny_models._qwen21_transformer().config),
        "vae": dict(tiny_models._qwen21_vae().config),
        "text_encoder": tiny_models._qwen21_text_encoder(tokenizer).config.to_dict(),
        "scheduler": dict(tiny_models.SCHEDULER_CONFIG),
    }


def tiny_tokenizer() -> Any:
    """builder/tiny_models.py's Qwen2 tokenizer: same template behaviour, tiny vocabulary (ids differ from the real)."""
    import tiny_models
    from transformers import Qwen2Tokenizer

    with tempfile.TemporaryDirectory() as folder:
        for name, text in tiny_models._tokenizer_files().items():
            (Path(folder) / name).write_text(text, encoding="utf-8")
        return Qwen2Tokenizer.from_pretrained(folder, local_files_only=True)


def tiny_text_inputs() -> tuple[dict[str, Any], Any]:
    """Qwen-Image's text inputs: the pipeline's ``tokenizer`` (tiny_tokenizer), and that tokenizer."""
    tokenizer = tiny_tokenizer()
    return {"tokenizer": tokenizer}, tokenizer


def tiny_qwen21_text_inputs() -> tuple[dict[str, Any], Any]:
    """Qwen-Image-2.1's text inputs: builder/tiny_models.py's Qwen3-VL processor (the same tiny tokenizer, its chat
    template and image processor), loaded as the worker loads one (qwen_worker.processor, no torchvision)."""
    import tiny_models

    from qwen_worker.processor import load_processor

    with tempfile.TemporaryDirectory() as folder:
        for name, text in tiny_models._qwen21_processor_files(tiny_models._tokenizer_files()).items():
            (Path(folder) / name).write_text(text, encoding="utf-8")
        processor = load_processor(Path(folder), "Qwen3VLProcessor")
    return {"processor": processor}, processor.tokenizer


@contextlib.contextmanager
def _quiet_construction():
    diffusers_log = logging.getLogger("diffusers")
    transformers_log = logging.getLogger("transformers")
    levels = diffusers_log.level, transformers_log.level
    diffusers_log.setLevel(logging.ERROR)
    transformers_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_log.setLevel(levels[0])
        transformers_log.setLevel(levels[1])


def build_empty(kind: str, config: dict[str, Any], dtype: torch.dtype, bench_model: BenchModel) -> torch.nn.Module:
    """The component with every parameter on the meta device (no memory), buffers computed as usual."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    with _quiet_construction(), init_empty_weights(include_buffers=False):
        if kind in ("transformer", "vae"):
            class_name = bench_model.transformer_class if kind == "transformer" else bench_model.vae_class
            model = getattr(diffusers, class_name).from_config(config)
        elif kind == "text_encoder":
            config_class, model_class = (getattr(transformers, name) for name in bench_model.text_encoder_classes)
            model = model_class._from_config(config_class.from_dict(config), dtype=dtype)
        else:
            raise ValueError(kind)
        if kind != "text_encoder":
            # diffusers' from_pretrained(torch_dtype=...) casts the whole model (floating buffers too); free on meta
            model = model.to(dtype)
    return model.eval()


def materialize(model: torch.nn.Module, device: torch.device, seed: int) -> None:
    """Allocate ``model``'s parameters on ``device`` (uninitialised) and fill them there with random values.

    Weights ~ normal(0, 0.02), biases 0, normalisation weights 1: magnitudes like a trained model's, so the run
    takes the same kernels; the values are meaningless. Buffers (RoPE inverse frequencies) keep their computed
    values: they are copied across after ``to_empty``, which would otherwise leave them uninitialised."""
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    meta_buffers = [name for name, buffer in buffers.items() if buffer.is_meta]
    if meta_buffers:
        raise RuntimeError(f"buffers left on the meta device: {meta_buffers[:5]}")
    model.to_empty(device=device)
    generator_seed = seed
    with torch.no_grad():
        for name, buffer in buffers.items():
            model.get_buffer(name).copy_(buffer)
        torch.manual_seed(generator_seed)
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()
            # Qwen-Image-2.1's zero-centred RMSNorm stores scale - 1: zero is its unit scale.
            zero_centred = "zerocenter" in type(module).__name__.lower()
            for name, parameter in module.named_parameters(recurse=False):
                if name.endswith("bias") or zero_centred:
                    parameter.zero_()
                elif is_norm:
                    parameter.fill_(1.0)
                else:
                    parameter.normal_(0.0, NORMAL_STD)
    model.requires_grad_(False)
    not_there = [name for name, p in model.named_parameters() if p.device.type != device.type]
    if not_there:
        raise RuntimeError(f"parameters not on {device}: {not_there[:5]}")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def build_pipeline(
    bench_model: BenchModel, configs: dict[str, dict[str, Any]], text_inputs: dict[str, Any],
    device: torch.device | None, dtype: torch.dtype,
) -> tuple[Any, dict[str, Any]]:
    """The model's pipeline (QwenImagePipeline, QwenImage21Pipeline) of random-weight components and the given
    tokenizer or processor (``text_inputs``). ``device`` None: leave the components on the meta device."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    components: dict[str, Any] = {}
    info: dict[str, Any] = {}
    for index, kind in enumerate(("transformer", "text_encoder", "vae")):
        started = time.perf_counter()
        model = build_empty(kind, configs[kind], dtype, bench_model)
        if device is not None:
            materialize(model, device, SEED + index)
            synchronize(device)
        components[kind] = model
        info[kind] = {
            "class": type(model).__name__,
            "parameters": count_parameters(model),
            "build_seconds": round(time.perf_counter() - started, 3),
        }
        attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if kind == "text_encoder" and attention:
            info[kind]["attn_implementation"] = attention
    components["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"])
    with _quiet_construction():
        pipeline = getattr(diffusers, bench_model.pipeline_class)(**text_inputs, **components)
    pipeline.set_progress_bar_config(disable=True)  # as the worker's load_pipeline does
    return pipeline, info


def prompt_for(pipeline: Any, text_tokens: int, embeddings_length: Callable[[Any, str], int]) -> str:
    """A prompt whose embeddings (what the transformer reads, after the pipeline drops the template's system part)
    are exactly ``text_tokens`` long with this pipeline's tokenizer (``embeddings_length``: the model's count)."""
    words: list[str] = []
    while True:
        length = embeddings_length(pipeline, " ".join(words))
        if length == text_tokens and words:
            return " ".join(words)
        if length >= text_tokens:
            raise ValueError(f"cannot build a prompt of exactly {text_tokens} embeddings (got {length}); try another")
        words.append(PROMPT_WORDS[len(words) % len(PROMPT_WORDS)])


def embeddings_length(pipeline: Any, prompt: str) -> int:
    """Qwen-Image: the prompt's tokens in the encode template, less the dropped system prefix."""
    template, drop = pipeline.prompt_template_encode, pipeline.prompt_template_encode_start_idx
    return len(pipeline.tokenizer(template.format(prompt))["input_ids"]) - drop


def qwen21_embeddings_length(pipeline: Any, prompt: str) -> int:
    """Qwen-Image-2.1 (text-to-image): the prompt's tokens in its t2i template, less its rendered system turn."""
    prompt = prompt or " "  # as the pipeline does: an empty prompt becomes a space
    tokens = pipeline.processor.tokenizer(pipeline.prompt_template_t2i.format(prompt))["input_ids"]
    return len(tokens) - pipeline._drop_idx


# -------------------------------------------------------------------------------------------------------- LoRA


def write_synthetic_lightning_lora(
    path: Path, transformer: torch.nn.Module, rank: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """A random LoRA in the Qwen-Image-Lightning file layout (bare ``<module>.lora_down.weight`` / ``lora_up.weight``
    / ``.alpha``), for the 12 projections of every block. Made on ``device``, saved through the CPU (a file must be)."""
    return write_synthetic_lora(path, transformer, rank, device, dtype, lightning=True, seed=SEED)


def write_synthetic_user_lora(
    path: Path, transformer: torch.nn.Module, rank: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """A random user LoRA in diffusers' layout (``transformer.<module>.lora_A.weight`` / ``lora_B.weight``, no
    alphas: peft's scaling 1), for the same 12 projections of every block; other random values than Lightning's."""
    return write_synthetic_lora(path, transformer, rank, device, dtype, lightning=False, seed=SEED + 1)


def write_synthetic_lora(
    path: Path, transformer: torch.nn.Module, rank: int, device: torch.device, dtype: torch.dtype, *,
    lightning: bool, seed: int,
) -> dict[str, Any]:
    """Random rank-``rank`` pairs (normal 0.02) on ``LIGHTNING_MODULES`` of every block, written in the Lightning
    layout or in diffusers' (``lightning`` False) by builder/synthetic_loras.py, the writer the tests use."""
    pairs = random_pairs(transformer, seed, rank=rank, std=NORMAL_STD, modules=LIGHTNING_MODULES, device=device,
                         dtype=dtype)
    (write_down_up if lightning else write_diffusers)(path, pairs)
    layout = "Lightning (bare lora_down/lora_up/alpha)" if lightning else "diffusers (transformer.<module>.lora_A/B)"
    return {"path": str(path), "rank": rank, "modules": len(pairs), "parameters": parameters(pairs),
            "bytes": path.stat().st_size, "layout": layout, "synthetic": True}


# ------------------------------------------------------------------------------------------------------ timing


def matmul_peak(
    device: torch.device, dtype: torch.dtype, n: int, batches: int = 7, per_batch: int = 10
) -> dict[str, Any]:
    """Median TFLOP/s of n^3 matrix products (random data) on ``device``: the yardstick for achieved TFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    synchronize(device)
    samples = []
    for _ in range(batches):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(per_batch):
                torch.mm(a, b, out=out)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000 / per_batch
        else:
            started = time.perf_counter()
            for _ in range(per_batch):
                torch.mm(a, b, out=out)
            seconds = (time.perf_counter() - started) / per_batch
        samples.append(2 * n**3 / seconds / 1e12)
    del a, b, out
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "products_per_sample": per_batch,
        "tflops_samples": [round(x, 2) for x in samples],
        "tflops_median": statistics.median(samples),
    }


class ForwardProbe:
    """Hooks on the transformer, beside the worker's own: the shapes of every forward (for the FLOP count) and, on
    CUDA, events on the GPU timeline at the call's start, around every forward and at its end."""

    def __init__(self, pipeline: Any, device: torch.device, trees: tuple[Any, ...] = ()) -> None:
        self.pipeline = pipeline
        # The pipeline's own transformer and the worker's resident Lightning copies: a fast job runs on a copy.
        self.transformers = list({id(t): t for t in (pipeline.transformer, *trees)}.values())
        self.cuda = device.type == "cuda"
        self.forwards: list[dict[str, Any]] = []
        self.state: dict[str, Any] = {}

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _elapsed_ms(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1000

    def __enter__(self) -> ForwardProbe:
        self.start = self._mark()
        self._hooks = [
            hook
            for transformer in self.transformers
            for hook in (
                transformer.register_forward_pre_hook(self._before, with_kwargs=True),
                transformer.register_forward_hook(self._after),
            )
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        self.end = self._mark()
        for hook in self._hooks:
            hook.remove()

    def _before(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if not self.forwards:
            # What the worker set up for this job, read at the first forward (host-side only, no GPU sync).
            scheduler = self.pipeline.scheduler.config
            self.state = {
                # the tree that runs: the pipeline's own transformer, or a resident Lightning copy
                "lora_layers": sum(1 for m in module.modules() if hasattr(m, "lora_A")),
                "adapters": list(getattr(module, "peft_config", None) or {}),
                "scheduler": {k: scheduler.get(k) for k in ("base_shift", "max_shift", "shift_terminal")},
            }
        self.forwards.append(
            {"image_tokens": int(hidden.shape[1]), "text_tokens": int(text.shape[1]), "batch": int(hidden.shape[0]),
             "kv_cache_mode": kwargs.get("kv_cache_mode"), "start": self._mark()}
        )

    def _after(self, *_args: Any) -> None:
        self.forwards[-1]["end"] = self._mark()

    def summary(self) -> dict[str, Any]:
        if self.cuda:
            self.end.synchronize()
        forwards = [
            {"image_tokens": f["image_tokens"], "text_tokens": f["text_tokens"], "batch": f["batch"],
             "kv_cache_mode": f["kv_cache_mode"], "ms": self._elapsed_ms(f["start"], f["end"])}
            for f in self.forwards
        ]
        out: dict[str, Any] = {"forwards": forwards, "clock": "cuda events" if self.cuda else "host perf_counter",
                               "at_first_forward": self.state}
        if self.forwards:
            out["before_first_forward_ms"] = self._elapsed_ms(self.start, self.forwards[0]["start"])
            out["denoise_ms"] = self._elapsed_ms(self.forwards[0]["start"], self.forwards[-1]["end"])
            out["after_last_forward_ms"] = self._elapsed_ms(self.forwards[-1]["end"], self.end)
            out["forward_ms_sum"] = sum(f["ms"] for f in forwards)
        return out


@dataclass(frozen=True)
class JobLoras:
    """The LoRA files every job of a case carries, written at start-up: the Lightning file loaded per job
    (``--fast-path today``, fast jobs only) and the synthetic user LoRA (``--user-lora``, every job)."""

    lightning: tuple[tuple[Path, float], ...] = ()
    user: tuple[tuple[Path, float], ...] = ()

    def for_job(self, fast_lora: bool) -> tuple[tuple[Path, float], ...]:
        """The files of one job, Lightning's first (a fast job's, when loaded per job), as the worker orders them."""
        return (*(self.lightning if fast_lora else ()), *self.user)


# The worker's loggers of the LoRA step (trees.job_tree): its INFO lines are kept in each run's lora_step.
LORA_STEP_LOGGERS = ("qwen_worker.trees", "qwen_worker.lora_slots", "qwen_worker.loras", "qwen_worker.lora_files")


@contextlib.contextmanager
def captured_log(names: tuple[str, ...]) -> Any:
    """The messages the named loggers emit in the block, INFO included (INFO stops here; warnings reach the log)."""
    lines: list[str] = []

    def capture(record: logging.LogRecord) -> bool:
        lines.append(record.getMessage())
        return record.levelno >= logging.WARNING

    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.INFO)
        logger.addFilter(capture)
    try:
        yield lines
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeFilter(capture)
            logger.setLevel(level)


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


# -------------------------------------------------------------------------------------------------------- output


def _fmt(value: float | None, spec: str = ".0f") -> str:
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
        lora_ms = f" {_fmt(m.get('lora_step_ms'), '.1f'):>7}" if user_lora else ""
        print(
            f"{name:<11} {r['size'][0]:>4}x{r['size'][1]:<4} {steps:>7} {_fmt(m['encode_prompt_ms']):>8} "
            f"{_fmt(m['denoise_ms']):>9} {_fmt(m['denoise_probe_ms']):>9} {_fmt(r['per_step_ms'], '.1f'):>8} "
            f"{_fmt(m['decode_ms']):>8} {_fmt(m['other_ms']):>7}{lora_ms} {_fmt(m['wall_ms']):>9} {full_ms:>10} "
            f"{_fmt(peak_gib, '.1f'):>8} {_fmt(r['achieved_tflops'], 'rate'):>8} {_fmt(frac, 'rate'):>7}"
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
          f"{peak['dtype']} matmul peak {_fmt(peak['tflops_median'], 'rate')} TFLOP/s ({peak['n']}^3, median of "
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


# ---------------------------------------------------------------------------------------------------- the models


QWEN_IMAGE = BenchModel(
    name="qwen-image",
    model_id="Qwen/Qwen-Image",
    config_dir=CONFIG_DIR,
    pipeline_class="QwenImagePipeline",
    transformer_class="QwenImageTransformer2DModel",
    vae_class="AutoencoderKLQwenImage",
    text_encoder_classes=("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
    text_inputs=tiny_text_inputs,
    tiny_configs=_tiny_qwen_image_configs,
    embeddings_length=embeddings_length,
    forward_flops=transformer_forward_flops,
    active_params=active_params_per_token,
    formula_params=analytic_transformer_params,
    # quality: the card's 50 steps, true CFG 4; fast: the worker's go_fast
    modes={"quality": ModeSpec(QUALITY_STEPS, QUALITY_CFG), "fast": ModeSpec(FAST_STEPS, 1.0, fast=True)},
    default_sizes=DEFAULT_SIZES,
    size_multiple=16,
    max_side=2048,
)

QWEN_IMAGE_21 = BenchModel(
    name="qwen-image-2.1",
    model_id="Qwen/Qwen-Image-2.1",
    config_dir=CONFIG_DIR / "qwen-image-2.1",
    pipeline_class="QwenImage21Pipeline",
    transformer_class="QwenImage21Transformer2DModel",
    vae_class="AutoencoderKLQwenImage21",
    text_encoder_classes=("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
    text_inputs=tiny_qwen21_text_inputs,
    tiny_configs=_tiny_qwen21_configs,
    embeddings_length=qwen21_embeddings_length,
    forward_flops=qwen21_forward_flops,
    active_params=qwen21_active_params_per_token,
    formula_params=qwen21_transformer_params,
    # quality: the card's 40 steps without CFG; cfg4: the anchor's 50 steps, true CFG 4 (2.1 runs CFG only against
    # a non-blank negative prompt). No fast mode: there is no Lightning LoRA for 2.1 (the worker refuses one).
    modes={
        "quality": ModeSpec(QWEN21_STEPS, 1.0),
        "cfg4": ModeSpec(QUALITY_STEPS, QUALITY_CFG, negative_prompt=QWEN21_NEGATIVE_PROMPT),
    },
    default_sizes=(1024, 2048),  # the anchor's size, and the card's native 2K square
    size_multiple=32,
    max_side=2752,
    kv_cache=True,
    anchor={
        "source": "vLLM-Omni, as cited in issue 18 (someone else's number: not measured here, hardware not stated)",
        "seconds": 7.96,
        "size": 1024,
        "mode": "cfg4",
        "steps": QUALITY_STEPS,
        "true_cfg_scale": QUALITY_CFG,
        "dtype": "bfloat16",
    },
)

BENCH_MODELS: dict[str, BenchModel] = {model.name: model for model in (QWEN_IMAGE, QWEN_IMAGE_21)}


def run_flops(
    bench_model: BenchModel, config: dict[str, Any], spec: ModeSpec, image_tokens: int, cond_tokens: int,
    uncond_tokens: int, steps: int, lora_rank: int = 0,
) -> tuple[float, float]:
    """Analytic transformer FLOPs of (one steady step, ``steps`` steps) in ``spec``'s mode: the first step prefills
    any cache, later steps read it."""

    def step(cached: bool) -> float:
        total = bench_model.forward_flops(config, image_tokens, cond_tokens, lora_rank, cached)["total"]
        if spec.true_cfg_scale > 1:
            total += bench_model.forward_flops(config, image_tokens, uncond_tokens, lora_rank, cached)["total"]
        return total

    first, later = step(False), step(bench_model.kv_cache)
    return later, first + later * (steps - 1)


# --------------------------------------------------------------------------------------------------------- modes


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
    print(f"  ({described}; x<steps>: FLOP per image; FLOP = 2 per multiply-add; see the module docstring)")
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


def _allocated(device: torch.device) -> int | None:
    """Bytes of tensors allocated on the GPU now (None on a CPU)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


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
    print(f"matmul peak: {_fmt(peak['tflops_median'], 'rate')} TFLOP/s ({peak['dtype']}, {peak['n']}^3)", flush=True)
    write_json(report, json_path, quiet=True)

    text_inputs, tokenizer = bench_model.text_inputs()
    configs = load_configs(bench_model, args.tiny, tokenizer)
    started = time.perf_counter()
    pipeline, info = build_pipeline(bench_model, configs, text_inputs, device, dtype)
    synchronize(device)
    report["build_seconds"] = build_seconds = time.perf_counter() - started
    report["components"] = info
    report["weights_allocated_bytes"] = _allocated(device)
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
            allocated[name] = _allocated(device)

        before_quant = linear_weight_bytes(pipeline.transformer) if args.quant != "none" else None
        allocated["read"] = _allocated(device)
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
        report["weights_allocated_bytes_after_startup"] = _allocated(device)  # with the LoRA slots, when built

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
                      f"ms, {_fmt(result['achieved_tflops'], 'rate')} TFLOP/s", flush=True)
            except Exception as err:  # one failed case (out of memory, say) must not lose the others
                result = {"mode": mode, "size": [size, size], "error": f"{type(err).__name__}: {err}"}
                print(f"  FAILED: {result['error']}", flush=True)
            report["results"].append(result)
            write_json(report, json_path, quiet=True)
    finally:
        shutil.rmtree(lora_dir, ignore_errors=True)
    report["complete"] = True
    return report


# ---------------------------------------------------------------------------------------------------------- main


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
