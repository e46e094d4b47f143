"""The benchmarked models (BENCH_MODELS) and their modes: what differs between Qwen-Image and Qwen-Image-2.1."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu import CONFIG_DIR
from gpu.build import (
    _tiny_qwen21_configs,
    _tiny_qwen_image_configs,
    embeddings_length,
    qwen21_embeddings_length,
    tiny_qwen21_text_inputs,
    tiny_text_inputs,
)
from gpu.flops import (
    active_params_per_token,
    analytic_transformer_params,
    qwen21_active_params_per_token,
    qwen21_forward_flops,
    qwen21_transformer_params,
    transformer_forward_flops,
)

QUALITY_STEPS = 50


QUALITY_CFG = 4.0


FAST_STEPS = 8  # what the worker's go_fast (FastMode.REGULAR) runs


DEFAULT_SIZES = (1024, 1328)


TINY_SIZES = (256,)


QWEN21_STEPS = 40  # Qwen-Image-2.1's card: 40 steps, no true CFG


QWEN21_NEGATIVE_PROMPT = "blurry, low quality"  # 2.1 runs true CFG only against a non-blank negative prompt


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
