"""Inpainting and outpainting around the pipeline call: the mask at the image's size, the outpainting canvas, and
the paste-back that keeps every pixel outside the mask exactly the input's.

The diffusers inpaint pipelines blend latents, not pixels: the region outside the mask goes through the VAE (and,
for the edit-inpaint pipeline, a resize to ~1 MP and back), which moves it by up to ~150 levels on real weights. So
after decoding and resizing, the worker pastes the input back outside the mask. The seam is feathered *inside* the
mask (the generated pixels fade into the input over at most ``MAX_SEAM`` pixels), so that outside the mask nothing
changes at all: byte-exact in PNG.

Pure image work (Pillow and numpy): no model, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .enums import Expand

# The pipelines binarise the mask at 0.5 (VaeImageProcessor.binarize): 128 of 255 and above is repainted.
MASK_THRESHOLD = 128
# The widest feathered seam, in output pixels; narrower on small images (``seam_width``).
MAX_SEAM = 32


@dataclass(frozen=True)
class MaskedCanvas:
    """What an inpainting or outpainting job hands the pipeline: the image and its mask (mode "L", 0 = keep,
    255 = repaint), the same size. For outpainting the image is the grown canvas and the mask its new border."""

    image: Image.Image
    mask: Image.Image

    def __post_init__(self) -> None:
        if self.image.size != self.mask.size:
            raise ValueError(f"mask {self.mask.size} and image {self.image.size} differ in size")


def inpainting_canvas(image: Image.Image, mask: Image.Image) -> MaskedCanvas:
    """The input and its mask, resized to the image (a mask of another size is stretched over it) and binarised
    as the pipeline will binarise it, so the paste-back keeps exactly the pixels the pipeline kept."""
    if mask.size != image.size:
        mask = mask.resize(image.size, Image.Resampling.BILINEAR)
    return MaskedCanvas(image, _binarised(mask))


def outpainting_canvas(image: Image.Image, expand: Expand) -> MaskedCanvas:
    """The input on a canvas grown by ``expand``, and a mask that repaints only the new border.

    The border starts as the input stretched to the whole canvas: at strength 1 the pipeline replaces it with noise
    anyway, and below 1 its colours are a better start than a flat fill."""
    width, height = image.size
    grown = expand.grown(width, height)
    canvas = image.resize(grown, Image.Resampling.BICUBIC)
    canvas.paste(image, (expand.left, expand.top))
    mask = Image.new("L", grown, 255)
    mask.paste(0, (expand.left, expand.top, expand.left + width, expand.top + height))
    return MaskedCanvas(canvas, mask)


def seam_width(size: tuple[int, int]) -> int:
    """``MAX_SEAM`` pixels on a ~1 MP image, proportionally less on smaller ones (8 at 256 px), at least 1."""
    return max(1, min(MAX_SEAM, min(size) // 32))


class PasteBack:
    """Pastes the input back outside the mask into each generated image (all at the canvas's size).

    The weights (how much of the generated image each pixel takes) are computed once per job: 0 outside the mask,
    rising linearly from the mask's edge to 1 at ``seam`` pixels inside it. A mask too thin to reach 1 anywhere with
    that seam gets a narrower one, so a small repaint is never only a faded copy of the input. Only the mask's
    bounding box (and a margin) is blended; everything else is the input image itself, which keeps a small repaint
    of a large photo cheap.
    """

    def __init__(self, canvas: MaskedCanvas, seam: int | None = None) -> None:
        self.image = canvas.image.convert("RGB")
        self.box = _around(canvas.mask.getbbox(), MAX_SEAM + 1, self.image.size)
        self.original = np.asarray(self.image.crop(self.box), dtype=np.float32)
        repaint = np.asarray(canvas.mask.crop(self.box)) >= MASK_THRESHOLD
        seam = seam_width(canvas.image.size) if seam is None else seam
        weights = _feathered(repaint, seam)
        while seam > 1 and weights.size and weights.max() < 1.0:
            seam //= 2
            weights = _feathered(repaint, seam)
        self.seam = seam
        self.weights = weights[..., None]

    def __call__(self, generated: Image.Image) -> Image.Image:
        if generated.size != self.image.size:
            raise ValueError(f"generated image {generated.size} is not the canvas's size {self.image.size}")
        result = self.image.copy()
        if self.original.size == 0:
            return result
        pixels = np.asarray(generated.convert("RGB").crop(self.box), dtype=np.float32)
        # Where the weight is 0 this is original + 0 exactly: the input's own byte values.
        blended = self.original + self.weights * (pixels - self.original)
        result.paste(Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8), "RGB"), self.box[:2])
        return result


def _around(
    bounds: tuple[int, int, int, int] | None, margin: int, size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """``bounds`` grown by ``margin`` on every side, within the image; an empty box when there are no bounds.

    The margin puts keep pixels around the repaint ones, so the box's edge rows are their true neighbours."""
    if bounds is None:
        return (0, 0, 0, 0)
    left, top, right, bottom = bounds
    return max(0, left - margin), max(0, top - margin), min(size[0], right + margin), min(size[1], bottom + margin)


def _binarised(mask: Image.Image) -> Image.Image:
    lut = [0] * MASK_THRESHOLD + [255] * (256 - MASK_THRESHOLD)
    return mask.convert("L").point(lut)


def _feathered(repaint: np.ndarray, seam: int) -> np.ndarray:
    """Per-pixel weight of the generated image: the share of repaint pixels in the (2·seam+1)² window, mapped so a
    straight mask edge ramps 1/(2·seam+1), 3/(2·seam+1), ... 1 over ``seam`` pixels inside, and 0 outside the mask.

    Window sums come from an integral image, so the cost does not grow with the seam. The image's own border is
    padded with its edge pixels: a mask that touches the border (outpainting's) is not feathered against it."""
    if seam < 1 or repaint.size == 0:
        return repaint.astype(np.float32)
    side = 2 * seam + 1
    padded = np.pad(repaint.astype(np.int32), seam, mode="edge")
    integral = np.zeros((padded.shape[0] + 1, padded.shape[1] + 1), dtype=np.int32)
    integral[1:, 1:] = padded.cumsum(axis=0).cumsum(axis=1)
    window = integral[side:, side:] - integral[:-side, side:] - integral[side:, :-side] + integral[:-side, :-side]
    share = window.astype(np.float32) / (side * side)
    return np.where(repaint, np.clip(2.0 * share - 1.0, 0.0, 1.0), 0.0).astype(np.float32)
