"""Safety checker folders that flag on purpose, made from the tiny never-flagging one of builder/tiny_models.py.

    write_sensitive_checker(tiny, dst, flagged=img_a, clean=img_b)   flags img_a (and look-alikes), not img_b
    write_flag_everything_checker(tiny, dst)                         flags every image
    write_separating_checker(tiny, dst, flagged=[...], clean=[...])  for near-identical images (tiny pipeline outputs)

Each copies the checker folder and rewrites only tensors in its ``model.safetensors``; the result loads as any
checker folder does (``StableDiffusionSafetyChecker.from_pretrained`` / ``qwen_worker.safety.SafetyChecker.load``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor

WEIGHTS = "model.safetensors"
# The smallest gap between the two images' similarities to the flagging concept that write_sensitive_checker
# accepts, so that the threshold it puts half-way between them survives bf16 rounding (about 0.01 here).
MIN_MARGIN = 0.1


def clip_embeddings(folder: Path, images: list[Image.Image]) -> torch.Tensor:
    """The checker's image embeddings (float32, unnormalised), computed with the stock model and processor."""
    model = StableDiffusionSafetyChecker.from_pretrained(folder, local_files_only=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    pixels = processor(images=images, return_tensors="pt").pixel_values
    with torch.inference_mode():
        return model.visual_projection(model.vision_model(pixels)[1])


def write_sensitive_checker(src: Path, dst: Path, flagged: Image.Image, clean: Image.Image) -> Path:
    """Copy the checker in ``src`` to ``dst``, made to flag ``flagged`` and not ``clean``; return ``dst``.

    Concept 0 becomes ``flagged``'s own embedding (similarity 1 to it) and its threshold the midpoint between 1 and
    ``clean``'s similarity to it; the other concepts keep the tiny checker's unreachable thresholds. Deterministic:
    the same images give the same folder.
    """
    embeds = torch.nn.functional.normalize(clip_embeddings(src, [flagged, clean]))
    clean_similarity = float(embeds[1] @ embeds[0])
    if 1.0 - clean_similarity < 2 * MIN_MARGIN:
        raise ValueError(f"the images look alike to this checker (cosine {clean_similarity:.3f}); pick others")

    def update(tensors: dict[str, torch.Tensor]) -> None:
        tensors["concept_embeds"][0] = embeds[0].to(tensors["concept_embeds"].dtype)
        tensors["concept_embeds_weights"][0] = (1.0 + clean_similarity) / 2

    return _rewrite(src, dst, update)


def write_flag_everything_checker(src: Path, dst: Path) -> Path:
    """Copy the checker in ``src`` to ``dst``, made to flag every image (thresholds below any cosine); return it."""

    def update(tensors: dict[str, torch.Tensor]) -> None:
        tensors["concept_embeds_weights"].fill_(-2.0)

    return _rewrite(src, dst, update)


def write_separating_checker(src: Path, dst: Path, flagged: list[Image.Image], clean: list[Image.Image]) -> Path:
    """Like ``write_sensitive_checker``, for images the checker sees as nearly identical.

    The tiny pipelines' outputs are all near-flat grey; the tiny CLIP gives them cosines above 0.999, closer than the
    checker's 3-decimal rounding. So the direction every image shares is removed from ``visual_projection`` (leaving
    what tells them apart), concept 0 points at the flagged images' mean embedding, and its threshold sits midway
    between the least similar flagged and the most similar clean image. Only those tensors change.
    """
    model = StableDiffusionSafetyChecker.from_pretrained(src, local_files_only=True).eval()
    processor = AutoImageProcessor.from_pretrained(src, local_files_only=True)
    pixels = processor(images=[*flagged, *clean], return_tensors="pt").pixel_values
    with torch.inference_mode():
        pooled = model.vision_model(pixels)[1]
    common = torch.nn.functional.normalize(pooled.mean(dim=0), dim=0)
    projection = model.visual_projection.weight.detach() @ (torch.eye(common.numel()) - torch.outer(common, common))
    embeds = torch.nn.functional.normalize(pooled @ projection.T)
    concept = torch.nn.functional.normalize(embeds[: len(flagged)].mean(dim=0), dim=0)
    similarities = embeds @ concept
    lowest_flagged, highest_clean = float(similarities[: len(flagged)].min()), float(similarities[len(flagged):].max())
    if lowest_flagged - highest_clean < 2 * MIN_MARGIN:
        raise ValueError(f"cannot separate the images (flagged >= {lowest_flagged:.3f}, clean <= {highest_clean:.3f})")

    def update(tensors: dict[str, torch.Tensor]) -> None:
        tensors["visual_projection.weight"] = projection.to(tensors["visual_projection.weight"].dtype).contiguous()
        tensors["concept_embeds"][0] = concept.to(tensors["concept_embeds"].dtype)
        tensors["concept_embeds_weights"][0] = (lowest_flagged + highest_clean) / 2

    return _rewrite(src, dst, update)


def _rewrite(src: Path, dst: Path, update) -> Path:
    shutil.copytree(src, dst)
    tensors = {name: tensor.clone() for name, tensor in load_file(dst / WEIGHTS).items()}
    update(tensors)
    save_file(tensors, dst / WEIGHTS, metadata={"format": "pt"})
    return dst
