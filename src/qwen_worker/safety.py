"""The safety checker: the diffusers ecosystem's own ``StableDiffusionSafetyChecker`` and its CLIP image processor.

The model is ``CompVis/stable-diffusion-safety-checker`` (or any folder laid out as that repo is: ``config.json``,
the weights and the CLIP ``preprocessor_config.json`` at the folder's root). It is loaded once, offline, on the
pipeline's device; ``check`` answers one flag per image (True = flagged) and nothing else. Which images are checked,
and what a flag means for a job, is the worker's business, not this module's.

How a flag is computed: the checker embeds the image with a CLIP ViT-L/14 vision tower and compares the embedding
(cosine similarity) with 17 fixed "concept" embeddings and 3 "special care" ones, each with its own threshold
(``concept_embeds_weights``, ``special_care_embeds_weights``); an image is flagged when any concept's similarity
exceeds its threshold, thresholds being lowered by 0.01 when a special-care concept matched. ``check`` runs the
checker's own ``forward`` for this, so the flags are exactly those a Stable Diffusion pipeline would compute. That
``forward`` also blacks out flagged images and logs "A black image will be returned instead": ``check`` hands it a
throw-away placeholder array instead of the images, and that one warning from that one logger is filtered out,
because nothing here is ever blacked out: what becomes of a flagged image is the caller's decision.

Coverage: CLIP's preprocessor sees only an image's centre square, so ``check`` classifies a non-square image as
overlapping squares covering it end to end (3 for 16:9) and flags the image when any of them is flagged.

What the checker costs (parameters, GPU memory, time per image) is stated once, in the README's "Safety checker"
section.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import PIL.Image
import torch

if TYPE_CHECKING:  # imported where a checker is loaded: an endpoint with SAFETY_CHECKER=off never needs them
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers.image_processing_utils import BaseImageProcessor

from .errors import ConfigError

log = logging.getLogger(__name__)

# diffusers' StableDiffusionSafetyChecker logs through this logger.
_STOCK_CHECKER_LOGGER = "diffusers.pipelines.stable_diffusion.safety_checker"
_BLACK_IMAGE_WARNING = "Potential NSFW content was detected"
# What from_pretrained reads. Checked first: without config.json, from_pretrained silently builds a default CLIP
# config and only fails later, on mismatched weights, with a confusing message.
_LAYOUT = {
    "config.json": ("config.json",),
    "weights (model.safetensors or pytorch_model.bin)": (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ),
    "preprocessor_config.json": ("preprocessor_config.json",),
}


class _DropBlackImageWarning(logging.Filter):
    """Drops the stock checker's "a black image will be returned instead" warning: here none ever is."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_BLACK_IMAGE_WARNING)


class SafetyChecker:
    """A loaded ``StableDiffusionSafetyChecker`` with its CLIP image processor. Build it with ``load``."""

    def __init__(
        self,
        model: StableDiffusionSafetyChecker,
        processor: BaseImageProcessor,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    @classmethod
    def load(cls, folder: Path, device: torch.device, dtype: torch.dtype) -> SafetyChecker:
        """Load the checker in ``folder`` (offline) onto ``device`` in ``dtype``, or raise ConfigError."""
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import AutoImageProcessor

        folder = Path(folder)
        started = time.perf_counter()
        try:
            _check_layout(folder)
            # With output_loading_info=True, from_pretrained returns (model, info) rather than the model alone.
            model, info = cast(
                "tuple[StableDiffusionSafetyChecker, dict[str, list[Any]]]",
                StableDiffusionSafetyChecker.from_pretrained(
                    folder, local_files_only=True, dtype=dtype, output_loading_info=True
                ),
            )
            # transformers only warns about weights missing from the checkpoint and leaves them random: a checker
            # with random weights would pass or flag at random, so it is refused.
            if info["missing_keys"] or info["mismatched_keys"]:
                missing = sorted(info["missing_keys"]) + [str(k) for k in info["mismatched_keys"]]
                raise ValueError(f"its weights lack or mismatch {len(missing)} tensors, e.g. {missing[:3]}")
            processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
            # transformers wraps PreTrainedModel.to in a decorator whose stub loses the signature.
            model = model.to(device).eval()  # type: ignore[arg-type]
        except Exception as err:  # any failure here means the worker cannot start as configured
            raise ConfigError(
                f"The safety checker in {folder} could not be loaded on {device}: {err}. SAFETY_CHECKER_MODEL must "
                "name a folder or repo laid out as CompVis/stable-diffusion-safety-checker is (config.json, the "
                "weights and the CLIP preprocessor_config.json at its root); or set SAFETY_CHECKER=off to run "
                "without a safety checker."
            ) from err

        stock_logger = logging.getLogger(_STOCK_CHECKER_LOGGER)
        if not any(isinstance(f, _DropBlackImageWarning) for f in stock_logger.filters):
            stock_logger.addFilter(_DropBlackImageWarning())

        checker = cls(model, processor, device, dtype)
        log.info(
            "safety checker loaded from %s on %s (%s) in %.1f s: %.3g MB of parameters",
            folder,
            device,
            str(dtype).removeprefix("torch."),
            time.perf_counter() - started,
            checker.parameter_bytes / 1e6,
        )
        return checker

    def check(self, images: Sequence[PIL.Image.Image]) -> list[bool]:
        """One flag per image, in order: True where the checker flags any part of it. One forward for all.

        The CLIP preprocessor sees only the centre square of an image; for a 16:9 result that leaves the sides
        unchecked. So each non-square image is classified as squares covering it end to end (``covering_squares``),
        and flagged when any of them is.
        """
        if not images:
            return []
        crops: list[PIL.Image.Image] = []
        owners: list[int] = []
        for index, image in enumerate(images):
            for box in covering_squares(image.width, image.height):
                crops.append(image.crop(box))
                owners.append(index)
        pixels = self.processor(images=crops, return_tensors="pt").pixel_values
        # forward(clip_input, images) blacks out the flagged entries of `images` in place and returns them with
        # the flags; a placeholder of one byte per crop takes that, and the images themselves are never touched.
        placeholder = np.zeros((len(crops), 1), dtype=np.uint8)
        with torch.inference_mode():
            _, crop_flags = self.model(clip_input=pixels.to(self.device, self.dtype), images=placeholder)
        flags = [False] * len(images)
        for owner, flagged in zip(owners, crop_flags, strict=True):
            flags[owner] = flags[owner] or bool(flagged)
        return flags


def covering_squares(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Square crop boxes that together cover the whole image: the stock centre square, plus squares evenly spaced
    from one end of the long side to the other (ceil(aspect) of them, overlapping). One box for a square image."""
    side, long_side = min(width, height), max(width, height)
    spans = math.ceil(long_side / side)
    offsets = {(long_side - side) // 2}  # the centre square: exactly what the stock preprocessor looks at
    if spans > 1:
        offsets.update(round(i * (long_side - side) / (spans - 1)) for i in range(spans))
    if width >= height:
        return [(offset, 0, offset + side, side) for offset in sorted(offsets)]
    return [(0, offset, side, offset + side) for offset in sorted(offsets)]


def _check_layout(folder: Path) -> None:
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    missing = [what for what, names in _LAYOUT.items() if not any((folder / name).is_file() for name in names)]
    if missing:
        raise ValueError(f"{folder} has no {', no '.join(missing)}")
