"""The small vocabulary every module shares: a loaded pipeline's task, a request's mode, fast mode, output format,
background, and the two request values other modules read (a LoRA entry, outpainting's expand).

Kept apart from the request parser (``schema.py``) so that loading, media, profiles, adapters and the LoRA slots
depend on these names only, never on how a request is parsed. What each mode does is ``modes.py``'s table.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Task(str, enum.Enum):
    """The kind of a loaded pipeline (the operator's side): text-to-image or edit. A request asks for a ``Mode``."""

    TEXT_TO_IMAGE = "text-to-image"
    EDIT = "edit"
    LAYERS = "layers"


class Mode(str, enum.Enum):
    """What a request asks for, decided once by ``parse_request`` from the fields present (``modes.MODE_RULE``).

    What each mode is (its fields, sizes, pipelines, call arguments) is its row in ``modes.MODES``.
    """

    LAYERS = "layers"
    TEXT_TO_IMAGE = "text-to-image"
    EDIT = "edit"
    IMAGE_TO_IMAGE = "image-to-image"
    INPAINTING = "inpainting"
    OUTPAINTING = "outpainting"
    CONTROLNET = "controlnet"


class OutputFormat(str, enum.Enum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"

    @property
    def mime_type(self) -> str:
        return f"image/{self.value}"

    @property
    def extension(self) -> str:
        return "jpg" if self is OutputFormat.JPEG else self.value


class FastMode(str, enum.Enum):
    """Lightning distillation: ``regular`` runs the 8-step LoRA, ``high`` the 4-step one; both without true CFG."""

    NONE = "none"
    REGULAR = "regular"
    HIGH = "high"

    @property
    def steps(self) -> int:
        return {FastMode.REGULAR: 8, FastMode.HIGH: 4}.get(self, 0)


class Background(str, enum.Enum):
    """OpenAI's ``background``: ``transparent`` keeps the alpha of a model that draws it (RGBA PNG/WebP)."""

    AUTO = "auto"
    OPAQUE = "opaque"
    TRANSPARENT = "transparent"


@dataclass(frozen=True)
class LoraRequest:
    path: str  # a local file, a path on the network volume, or an http(s) URL
    scale: float


@dataclass(frozen=True)
class Expand:
    """Outpainting: pixels added on each side of the input image."""

    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0

    def grown(self, width: int, height: int) -> tuple[int, int]:
        return width + self.left + self.right, height + self.top + self.bottom
