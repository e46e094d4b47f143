"""Output sizes: the named presets other hosts use, and the rules the Qwen-Image pipelines follow.

- ``ASPECT_RATIOS``: the Qwen-Image model card's recommended resolution per aspect ratio (Replicate's
  ``optimize_for_quality``, and ``aspect_ratio`` on its own).
- ``FAL_PRESETS``: fal's ``image_size`` preset names.
- ``about_one_megapixel``: Replicate's ``optimize_for_speed``; also the size the edit pipelines pick from their input.
"""

from __future__ import annotations

import math

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
