"""Write folders laid out like the real model repositories whose weight files have the real headers and no data.

    python builder/real_size_models.py OUT_DIR

Each ``*.safetensors`` file holds the published checkpoint's tensor names, dtypes and shapes in its header and is
then extended, sparsely, to the length the real file has: a 41 GB transformer takes a few hundred KB of disk. What
reads only headers (the memory plan, ``qwen_worker/memory_plan.py``) sees the real byte counts; anything that reads
the data finds zeros. Nothing can be loaded from them, and nothing here touches the network.

The shapes come from building each component on the meta device from its published config (``bench/configs/``: its
README says where each config comes from and which published parameter counts it reproduces), so they are exact for
those configs. The real repositories' tensor *names* may differ where a library renamed modules since (the text
encoders' ``model.language_model.*``); names do not change the byte counts.

Folders (under OUT_DIR): ``qwen-image`` (also what Qwen-Image-2512 is: the same classes and shapes), ``qwen-image-edit``
(Qwen-Image-Edit; Edit-2509/2511 have the same components), ``qwen-image-layered``, ``qwen-image-2.1``,
``qwen-image-controlnet`` (InstantX's 5-block ControlNet-Union), ``safety-checker``
(CompVis/stable-diffusion-safety-checker, stored in float32) and ``lightning-8step.safetensors`` (the Lightning
8-step LoRA: rank 64 on the 12 projections of each of the 60 blocks, ~0.85 GB as published).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "bench" / "configs"
SHARD_BYTES = 5 * 1000**3  # the real repos shard at ~5 GB (diffusers' and transformers' save_pretrained default)

SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}

# The 12 projections of each block the Lightning LoRAs (lightx2v/Qwen-Image-Lightning) adapt, at rank 64: the same
# list bench/gpu_bench.py writes its synthetic Lightning file for; 60 blocks x 7.08 M = 425 M parameters, 0.85 GB.
LIGHTNING_MODULES = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
)
LIGHTNING_RANK = 64

# CompVis/stable-diffusion-safety-checker: CLIP ViT-L/14's vision tower and a 768-wide projection, stored in float32.
SAFETY_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "patch_size": 14, "image_size": 224}


@contextmanager
def _quiet() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    levels = [each.level for each in loggers]
    for each in loggers:
        each.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for each, level in zip(loggers, levels, strict=True):
            each.setLevel(level)


def _config(name: str, folder: str = "") -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CONFIGS / folder / name).read_text())
    return data


def _empty(build: Any) -> torch.nn.Module:
    from accelerate import init_empty_weights

    with _quiet(), init_empty_weights(include_buffers=False):
        module: torch.nn.Module = build()
    return module


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """What save_pretrained would write: the state dict, persistent buffers included, tied tensors once."""
    seen: set[int] = set()
    shapes = {}
    for name, tensor in module.state_dict().items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        shapes[name] = tuple(tensor.shape)
    return shapes


def write_sparse_safetensors(path: Path, tensors: Mapping[str, tuple[str, tuple[int, ...]]]) -> int:
    """A safetensors file whose header lists ``tensors`` (name -> (dtype, shape)) and whose data is a hole of the
    right length. Returns the file's length."""
    sizes = {"BF16": 2, "F16": 2, "F32": 4, "I64": 8, "F8_E4M3": 1, "I8": 1}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(tensors):
        dtype, shape = tensors[name]
        count = 1
        for side in shape:
            count *= side
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + count * sizes[dtype]]}
        offset += count * sizes[dtype]
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw)
        handle.truncate(8 + len(raw) + offset)
    return 8 + len(raw) + offset


def write_component(folder: Path, stem: str, shapes: Mapping[str, tuple[int, ...]], dtype: str,
                    config: Mapping[str, Any]) -> None:
    """``folder/config.json`` and the weights, sharded as the real repos are past SHARD_BYTES (with an index)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    element = {"BF16": 2, "F32": 4}[dtype]
    shards: list[dict[str, tuple[str, tuple[int, ...]]]] = [{}]
    filled = 0
    for name, shape in shapes.items():
        size = element * int(torch.Size(shape).numel())
        if filled and filled + size > SHARD_BYTES:
            shards.append({})
            filled = 0
        shards[-1][name] = (dtype, shape)
        filled += size
    if len(shards) == 1:
        write_sparse_safetensors(folder / f"{stem}.safetensors", shards[0])
        return
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, start=1):
        file_name = f"{stem}-{number:05d}-of-{len(shards):05d}.safetensors"
        write_sparse_safetensors(folder / file_name, shard)
        total += sum(element * int(torch.Size(shape).numel()) for _dtype, shape in shard.values())
        weight_map.update(dict.fromkeys(shard, file_name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def qwen_image_transformer(layered: bool = False) -> torch.nn.Module:
    from diffusers import QwenImageTransformer2DModel

    config = _config("transformer_config.json")
    if layered:  # Qwen-Image-Layered: Qwen-Image's transformer with its two switches (builder/tiny_models.py)
        config = {**config, "use_layer3d_rope": True, "use_additional_t_cond": True}
    return _empty(lambda: QwenImageTransformer2DModel.from_config(config))


def _diffusers_component(class_name: str, config: Mapping[str, Any], **overrides: Any) -> torch.nn.Module:
    import diffusers

    return _empty(lambda: getattr(diffusers, class_name).from_config({**config, **overrides}))


def _text_encoder(folder: str = "") -> torch.nn.Module:
    import transformers

    config = _config("text_encoder_config.json", folder)
    config_class, model_class = (
        (transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration)
        if folder
        else (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration)
    )
    return _empty(lambda: model_class._from_config(config_class.from_dict(config), dtype=torch.bfloat16))


def _write_pipeline(folder: Path, pipeline_class: str, parts: dict[str, tuple[str, str, torch.nn.Module, str]]) -> None:
    index: dict[str, Any] = {"_class_name": pipeline_class, "_diffusers_version": "0.42.1"}
    for name, (library, class_name, module, stem) in parts.items():
        index[name] = [library, class_name]
        config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
        write_component(folder / name, stem, _shapes(module), "BF16", {"_class_name": class_name, **config})
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def build_all(out_dir: Path) -> dict[str, Path]:
    """Write every folder under ``out_dir``; returns name -> path (the tiny_models.build_all shape)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    transformer = qwen_image_transformer()
    text_encoder = _text_encoder()
    vae_config = _config("vae_config.json")
    vae = _diffusers_component("AutoencoderKLQwenImage", vae_config)
    te = ("transformers", "Qwen2_5_VLForConditionalGeneration", text_encoder, "model")
    qwen_image = {
        "transformer": ("diffusers", "QwenImageTransformer2DModel", transformer, "diffusion_pytorch_model"),
        "text_encoder": te,
        "vae": ("diffusers", "AutoencoderKLQwenImage", vae, "diffusion_pytorch_model"),
    }
    paths = {name: out_dir / name for name in (
        "qwen-image", "qwen-image-edit", "qwen-image-layered", "qwen-image-2.1", "qwen-image-controlnet",
        "safety-checker",
    )}
    _write_pipeline(paths["qwen-image"], "QwenImagePipeline", qwen_image)
    _write_pipeline(paths["qwen-image-edit"], "QwenImageEditPipeline", qwen_image)
    layered = {
        **qwen_image,
        "transformer": ("diffusers", "QwenImageTransformer2DModel", qwen_image_transformer(layered=True),
                        "diffusion_pytorch_model"),
        "vae": ("diffusers", "AutoencoderKLQwenImage",
                _diffusers_component("AutoencoderKLQwenImage", vae_config, input_channels=4),
                "diffusion_pytorch_model"),
    }
    _write_pipeline(paths["qwen-image-layered"], "QwenImageLayeredPipeline", layered)
    v21 = "qwen-image-2.1"
    _write_pipeline(paths[v21], "QwenImage21Pipeline", {
        "transformer": ("diffusers", "QwenImage21Transformer2DModel", _diffusers_component(
            "QwenImage21Transformer2DModel", _config("transformer_config.json", v21)), "diffusion_pytorch_model"),
        "text_encoder": ("transformers", "Qwen3VLForConditionalGeneration", _text_encoder(v21), "model"),
        "vae": ("diffusers", "AutoencoderKLQwenImage21",
                _diffusers_component("AutoencoderKLQwenImage21", _config("vae_config.json", v21)),
                "diffusion_pytorch_model"),
    })
    # InstantX/Qwen-Image-ControlNet-Union: the transformer's widths, 5 blocks.
    accepted = ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim", "num_attention_heads",
                "joint_attention_dim", "axes_dims_rope")
    controlnet_config = {key: transformer.config[key] for key in accepted} | {"num_layers": 5}
    controlnet = _diffusers_component("QwenImageControlNetModel", controlnet_config, extra_condition_channels=4)
    write_component(paths["qwen-image-controlnet"], "diffusion_pytorch_model", _shapes(controlnet), "BF16",
                    {"_class_name": "QwenImageControlNetModel", **controlnet.config})
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    clip = CLIPConfig(vision_config=SAFETY_VISION, projection_dim=768)
    checker = _empty(lambda: StableDiffusionSafetyChecker(clip))
    write_component(paths["safety-checker"], "model", _shapes(checker), "F32", clip.to_dict())
    lightning = out_dir / "lightning-8step.safetensors"
    layers = {name: tuple(shape) for name, shape in _shapes(transformer).items()}
    lora: dict[str, tuple[str, tuple[int, ...]]] = {}
    for block in range(transformer.config["num_layers"]):
        for module in LIGHTNING_MODULES:
            name = f"transformer_blocks.{block}.{module}"
            out_features, in_features = layers[f"{name}.weight"]
            lora[f"{name}.lora_down.weight"] = ("BF16", (LIGHTNING_RANK, in_features))
            lora[f"{name}.lora_up.weight"] = ("BF16", (out_features, LIGHTNING_RANK))
    write_sparse_safetensors(lightning, lora)
    paths["lightning-8step"] = lightning
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    for name, path in build_all(args.out_dir).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
