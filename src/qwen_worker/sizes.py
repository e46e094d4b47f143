"""Output sizes: every size rule, the named presets other hosts use, and the plan of what a job renders.

- The rules: each side ``MIN_SIDE``..``MAX_SIDE`` and a multiple of ``SIDE_MULTIPLE`` (``check_dimensions``);
  a model with other limits passes its own ``SizeRules`` (``profiles.py``: Qwen-Image-2.1 takes 256-2752, x32).
- ``plan_output``: the one function the worker calls to decide what the model renders and what the caller receives.
- ``ASPECT_RATIOS``: the Qwen-Image model card's recommended resolution per aspect ratio (Replicate's
  ``optimize_for_quality``, and ``aspect_ratio`` on its own).
- ``FAL_PRESETS``: fal's ``image_size`` preset names.
- ``about_one_megapixel``: Replicate's ``optimize_for_speed``; also the size the edit pipelines pick from their input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ValidationError, preview

# Qwen-Image's own limits are looser; these keep a request within what one GPU job should take. Multiples of 16:
# the VAE downsamples by 8 and the transformer packs 2x2 latent patches.
MIN_SIDE = 256
MAX_SIDE = 2048
SIDE_MULTIPLE = 16


@dataclass(frozen=True)
class SizeRules:
    """Side limits of one model: each side ``min_side``..``max_side`` and a multiple of ``multiple``."""

    min_side: int = MIN_SIDE
    max_side: int = MAX_SIDE
    multiple: int = SIDE_MULTIPLE


DEFAULT_SIZE_RULES = SizeRules()

ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1328, 1328),
    "16:9": (1664, 928),
    "9:16": (928, 1664),
    "4:3": (1472, 1104),
    "3:4": (1104, 1472),
    "3:2": (1584, 1056),
    "2:3": (1056, 1584),
}

FAL_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}

REPLICATE_SIZE_MODES = ("optimize_for_quality", "optimize_for_speed")

ONE_MEGAPIXEL_AREA = 1024 * 1024


def about_one_megapixel(ratio: float, multiple: int = 16) -> tuple[int, int]:
    """The (width, height) of area ~1024² with ``width / height == ratio``, each a multiple of ``multiple``."""
    width = math.sqrt(ONE_MEGAPIXEL_AREA * ratio)
    height = width / ratio
    return _round_to(width, multiple), _round_to(height, multiple)


def edit_output_size(input_width: int, input_height: int) -> tuple[int, int]:
    """What Qwen-Image-Edit(-Plus) produce when no size is given: ~1 MP at the (last) input's aspect, multiples of 32.

    Mirrors diffusers' ``calculate_dimensions(1024 * 1024, ratio)`` so the size (and the cost) is known before the
    pipeline runs, and is then passed to it explicitly.
    """
    return about_one_megapixel(input_width / input_height, multiple=32)


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def check_dimensions(width: int, height: int, *, field: str, rules: SizeRules = DEFAULT_SIZE_RULES) -> None:
    """Raise ValidationError naming ``field`` unless both sides are in range and multiples of ``rules.multiple``."""
    for side_name, side in (("width", width), ("height", height)):
        # preview, not str(): str() of a JSON integer like 10**5000 raises ValueError (past 4300 digits), which
        # escaped as an internal error instead of naming the field.
        if not rules.min_side <= side <= rules.max_side:
            rule = f"{side_name} must be between {rules.min_side} and {rules.max_side} pixels, got {preview(side)}"
            raise ValidationError(field, rule)
        if side % rules.multiple:
            raise ValidationError(field, f"{side_name} must be a multiple of {rules.multiple}, got {preview(side)}")


def nearest_allowed_side(side: int, rules: SizeRules = DEFAULT_SIZE_RULES) -> int:
    """The side length closest to ``side`` that the rules allow."""
    return min(rules.max_side, max(rules.min_side, round(side / rules.multiple) * rules.multiple))


def in_range(width: int, height: int, rules: SizeRules = DEFAULT_SIZE_RULES) -> bool:
    return all(rules.min_side <= side <= rules.max_side for side in (width, height))


@dataclass(frozen=True)
class OutputPlan:
    """Sizes decided before generating: what the model renders, and what the caller receives."""

    width: int
    height: int
    delivered: tuple[int, int]


def plan_output(
    requested: tuple[int, int] | None,
    reference: tuple[int, int] | None,
    *,
    match_input_size: bool = False,
    field: str = "image",
    rules: SizeRules = DEFAULT_SIZE_RULES,
    multiple: int = 32,
) -> OutputPlan:
    """What a job renders and delivers.

    ``requested`` is the request's size (already checked), or None for an edit whose size follows ``reference``, the
    size of its (last) input image; ``field`` names that input in errors. An edit renders at about 1 MP at the
    input's aspect, as the edit pipelines do; a banner past ~4:1 at the largest size the rules allow at that aspect.
    With ``match_input_size`` the model renders near the input's own size (when the rules allow it) and the result
    is resized to the input's exact dimensions (inpainting and outpainting always plan so, ``reference`` being the
    input's or the grown canvas's size). ``multiple``: the ~1 MP size's rounding, 32 as the edit pipelines round
    (image-to-image, which renders any multiple of 16, passes 16).
    """
    if requested is not None:
        return OutputPlan(requested[0], requested[1], requested)
    if reference is None:
        raise ValueError("an output plan needs a requested size or a reference image")
    ref_width, ref_height = reference
    if match_input_size and in_range(ref_width, ref_height, rules):
        return OutputPlan(
            nearest_allowed_side(ref_width, rules), nearest_allowed_side(ref_height, rules), reference
        )
    # ~1 MP at the input's aspect, as the model does
    width, height = about_one_megapixel(ref_width / ref_height, max(multiple, rules.multiple))
    if not in_range(width, height, rules):
        width, height = _largest_at_aspect(ref_width, ref_height, field, rules)
    return OutputPlan(width, height, reference if match_input_size else (width, height))


# The most elongated output the side rules allow: the long side at MAX_SIDE, the short one at MIN_SIDE (8:1).
MAX_ASPECT = MAX_SIDE / MIN_SIDE


def _largest_at_aspect(width: int, height: int, field: str, rules: SizeRules) -> tuple[int, int]:
    """A banner-shaped input (past ~4:1, where 1 MP would need a side over MAX_SIDE): the long side at MAX_SIDE and
    the short one at the input's aspect, so text on a banner keeps its proportions. Refused only when the short side
    would fall below MIN_SIDE."""
    long_side, short_side = max(width, height), min(width, height)
    rendered_short = round(rules.max_side * short_side / long_side / rules.multiple) * rules.multiple
    if rendered_short < rules.min_side:
        limit = f"{rules.max_side / rules.min_side:g}"
        raise ValidationError(
            field,
            f"has an aspect ratio of {long_side / short_side:.1f}:1 ({width}x{height}); edits support aspect ratios "
            f"from 1:{limit} to {limit}:1 (sides {rules.min_side} to {rules.max_side} pixels): crop or pad the image",
        )
    return (rules.max_side, rendered_short) if width >= height else (rendered_short, rules.max_side)


def layered_size(reference: tuple[int, int], resolution: int, *, field: str = "image") -> tuple[int, int]:
    """The size QwenImageLayeredPipeline renders its layers at: about ``resolution`` squared pixels at the input's
    aspect, each side rounded to 32 (its ``calculate_dimensions``, mirrored so quotes and plans know it beforehand)."""
    ref_width, ref_height = reference
    ratio = ref_width / ref_height
    width = math.sqrt(resolution * resolution * ratio)
    height = width / ratio
    size = round(width / 32) * 32, round(height / 32) * 32
    if min(size) < 32:
        raise ValidationError(
            field, f"is {ref_width}x{ref_height}, too elongated for layer decomposition at resolution {resolution}"
        )
    return size
