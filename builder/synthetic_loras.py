"""Synthetic LoRA files for a Qwen-Image transformer, in the layouts people actually publish: random low-rank pairs
shaped for a given transformer's own layers. The tests write them for the tiny transformer (``BLOCK_MODULES``, small
ranks); ``bench/gpu_bench.py`` and ``bench/lora_overhead.py`` write Lightning-sized ones (``LIGHTNING_MODULES``, rank
64) for the full-width transformer. One writer for both, so a layout is spelled once.

The same low-rank pairs (A: rank x in, B: out x rank) can be written as

- diffusers/peft:  ``transformer.<module>.lora_A.weight`` / ``lora_B.weight``
- kohya:           ``lora_unet_<module with _>.lora_down.weight`` / ``lora_up.weight`` / ``.alpha``
- ComfyUI:         ``diffusion_model.<module>.lora_A.weight`` / ``lora_B.weight``
- musubi-tuner:    ``diffusion_model.<module>.lora_down.weight`` / ``lora_up.weight`` / ``.alpha``
- Lightning:       ``<module>.lora_down.weight`` / ``lora_up.weight`` / ``.alpha``
- bare:            ``<module>.lora_A.weight`` (what ``transformer.save_lora_adapter`` writes)

so a test can check that every layout produces the same image as the diffusers one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

RANK = 4
# The tests' LoRAs: the attention projections and the image MLP of each block (10), the list every test's files and
# reference images were made with (another list would draw other random values for every file).
BLOCK_MODULES = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
)
# The projections a Qwen-Image-Lightning LoRA adapts in every transformer block (12: the tests' 10 and the text MLP);
# the GPU benchmark's synthetic Lightning and user LoRAs target these, as most published Qwen-Image LoRAs do.
LIGHTNING_MODULES = (*BLOCK_MODULES, "txt_mlp.net.0.proj", "txt_mlp.net.2")

Pairs = dict[str, tuple[torch.Tensor, torch.Tensor]]


def target_modules(blocks: int = 2, modules: tuple[str, ...] = BLOCK_MODULES) -> list[str]:
    return [f"transformer_blocks.{b}.{m}" for b in range(blocks) for m in modules]


def random_pairs(
    transformer: torch.nn.Module,
    seed: int,
    *,
    rank: int = RANK,
    std: float = 0.3,
    modules: tuple[str, ...] = BLOCK_MODULES,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Pairs:
    """Non-zero A and B (normal, ``std``) for ``modules`` of every block, shaped for ``transformer``'s own layers,
    made on ``device`` in ``dtype`` (the writers save them through the CPU)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    layers = dict(transformer.named_modules())
    pairs: Pairs = {}
    for name in target_modules(len(transformer.transformer_blocks), modules):
        out_features, in_features = layers[name].weight.shape
        a = torch.randn(rank, in_features, generator=generator, device=device, dtype=dtype) * std
        b = torch.randn(out_features, rank, generator=generator, device=device, dtype=dtype) * std
        pairs[name] = (a, b)
    return pairs


def parameters(pairs: Pairs) -> int:
    return sum(a.numel() + b.numel() for a, b in pairs.values())


def shaped_pairs(hidden: int, seed: int, *, rank: int = RANK) -> Pairs:
    """Pairs for a transformer of another width (every layer hidden x hidden): a LoRA for a different model."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(rank, hidden, generator=generator), torch.randn(hidden, rank, generator=generator))
        for name in target_modules()
    }


def scaled(pairs: Pairs, factor: float) -> Pairs:
    return {name: (a, b * factor) for name, (a, b) in pairs.items()}


def write_diffusers(path: Path, pairs: Pairs, prefix: str = "transformer.") -> Path:
    tensors = {}
    for name, (a, b) in pairs.items():
        tensors[f"{prefix}{name}.lora_A.weight"] = a.cpu().contiguous()
        tensors[f"{prefix}{name}.lora_B.weight"] = b.cpu().contiguous()
    save_file(tensors, str(path))
    return path


def write_comfy(path: Path, pairs: Pairs) -> Path:
    return write_diffusers(path, pairs, prefix="diffusion_model.")


def write_bare(path: Path, pairs: Pairs) -> Path:
    return write_diffusers(path, pairs, prefix="")


def write_kohya(path: Path, pairs: Pairs, alpha: float | None = None) -> Path:
    """kohya-ss layout; ``alpha`` defaults to the rank (a LoRA scale of exactly 1)."""
    return write_down_up(path, pairs, alpha, key=lambda name: "lora_unet_" + name.replace(".", "_"))


def write_down_up(path: Path, pairs: Pairs, alpha: float | None = None, *, key=lambda name: name) -> Path:
    """``<key(module)>.lora_down.weight`` / ``lora_up.weight`` / ``.alpha``: kohya, and with dotted module names the
    musubi-tuner (``diffusion_model.`` prefix) and Qwen-Image-Lightning (no prefix) files."""
    tensors = {}
    for name, (a, b) in pairs.items():
        key_name = key(name)
        tensors[f"{key_name}.lora_down.weight"] = a.cpu().contiguous()
        tensors[f"{key_name}.lora_up.weight"] = b.cpu().contiguous()
        tensors[f"{key_name}.alpha"] = torch.tensor(float(a.shape[0] if alpha is None else alpha))
    save_file(tensors, str(path))
    return path


def write_peft_trained(folder: Path, transformer_dir: Path, seed: int, *, rank: int = RANK, alpha: int) -> Path:
    """A LoRA made the way diffusers' training scripts make one: peft ``add_adapter`` on a copy of the transformer,
    then ``QwenImagePipeline.save_lora_weights`` with the adapter metadata (which carries ``lora_alpha``)."""
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = QwenImageTransformer2DModel.from_pretrained(transformer_dir, local_files_only=True)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules(), init_lora_weights=False)
    torch.manual_seed(seed)  # init_lora_weights=False: A and B both random, so the LoRA is not a no-op
    transformer.add_adapter(config)
    QwenImagePipeline.save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=config.to_dict(),
        weight_name="peft_lora.safetensors",
    )
    return folder / "peft_lora.safetensors"


def peft_pairs(path: Path) -> Pairs:
    """Read back the A/B pairs of a ``write_peft_trained`` file (to compare it with a hand-written one)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    pairs: Pairs = {}
    for key, value in tensors.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            pairs[name] = (value, tensors[key.replace("lora_A", "lora_B")])
    return pairs


def lightning_and_style(transformer_dir: Path, folder: Path) -> dict[str, Path]:
    """What the fast-mode tests load: Lightning-layout 8-step (``eight``) and 4-step (``four``) files, as the real
    Lightning files are laid out, and a diffusers-layout user LoRA (``style``), for the tiny transformer in
    ``transformer_dir``."""
    from diffusers import QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel.from_pretrained(transformer_dir)
    return {
        "eight": write_down_up(folder / "lightning-8step.safetensors", random_pairs(transformer, seed=2)),
        "four": write_down_up(folder / "lightning-4step.safetensors", random_pairs(transformer, seed=5)),
        "style": write_diffusers(folder / "style.safetensors", random_pairs(transformer, seed=1)),
    }
