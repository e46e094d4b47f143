"""Loading the Qwen2-VL processor of an edit pipeline without torchvision.

Qwen-Image-Edit pipelines take a ``processor`` (tokenizer + image processor) from the model's ``processor/`` folder
to feed the conditioning image to the Qwen2.5-VL text encoder. In transformers 5.x ``Qwen2VLProcessor`` also insists
on its video processor, and every video processor needs torchvision, which has no CPU wheel matching our pinned torch
and must not be installed. Loading the stock class therefore fails, although these pipelines never process video.

``ImageOnlyQwen2VLProcessor`` is the stock processor minus the video processor; it reads the same files and
ignores ``video_preprocessor_config.json``. Its image processor comes from ``AutoImageProcessor``, which picks the
torch-based ``Qwen2VLImageProcessor`` where torchvision is installed and the PIL-based ``Qwen2VLImageProcessorPil``
where it is not. Both apply the same ``smart_resize`` rule and return the same ``pixel_values`` / ``image_grid_thw``
shapes (so the same number of image tokens); pixel values differ only by their bicubic implementations. So the
pipelines behave the same with or without torchvision.
"""

from __future__ import annotations

from pathlib import Path

from transformers import Qwen2VLProcessor


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` with its image processor and tokenizer only (no video processor, so no torchvision)."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        # ProcessorMixin derives the sub-processors it loads, checks and saves from this list (by default from
        # __init__'s parameter names, which include video_processor). The video_processor=None that
        # Qwen2VLProcessor.__init__ still passes along is dropped because it is not listed here.
        return ["image_processor", "tokenizer"]


def load_processor(folder: Path) -> ImageOnlyQwen2VLProcessor:
    """Load the processor in ``folder`` (a pipeline's ``processor/``) from local files only."""
    return ImageOnlyQwen2VLProcessor.from_pretrained(str(folder), local_files_only=True)
