"""Building the full-size (or tiny) pipeline from published configs with random weights on the device, the prompt of
an exact length, and the synthetic LoRA files (written by builder/synthetic_loras.py)."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from synthetic_loras import LIGHTNING_MODULES, parameters, random_pairs, write_diffusers, write_down_up

from gpu.probes import synchronize

if TYPE_CHECKING:
    from gpu.models import BenchModel


LIGHTNING_RANK = 64  # the Qwen-Image-Lightning files' rank as commonly reported (DiffSynth loads them at alpha 8/64)


TINY_LORA_RANK = 4


USER_LORA_RANK = 32  # --user-lora's synthetic LoRA (tiny runs too: it still fits the default slot)


SEED = 0


NORMAL_STD = 0.02


# Words that the tiny tokenizer (BPE learnt on the pipelines' templates) encodes as one token each after a space.
PROMPT_WORDS = ("the", "color", "shape", "size", "texture", "of", "objects", "and", "background", "image")


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
