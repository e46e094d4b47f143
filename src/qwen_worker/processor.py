"""Loading the Qwen2-VL / Qwen3-VL processors of the pipelines without torchvision.

Qwen-Image-Edit pipelines take a ``processor`` (tokenizer + image processor) from the model's ``processor/`` folder
to feed the conditioning image to the Qwen2.5-VL text encoder; Qwen-Image-2.1 takes a Qwen3-VL one for its prompt
and reference images alike. In transformers 5.x ``Qwen2VLProcessor`` and ``Qwen3VLProcessor`` also insist on their
video processor, and every video processor needs torchvision, which has no CPU wheel matching our pinned torch and
must not be installed. Loading the stock classes therefore fails, although these pipelines never process video.

``ImageOnlyQwen2VLProcessor`` and ``ImageOnlyQwen3VLProcessor`` are the stock processors minus the video processor;
they read the same files (the chat template included, which Qwen-Image-2.1 renders to count the system tokens it
drops) and ignore ``video_preprocessor_config.json``. Their image processor comes from ``AutoImageProcessor``, which
picks the torch-based ``Qwen2VLImageProcessor`` where torchvision is installed and the PIL-based
``Qwen2VLImageProcessorPil`` where it is not. Both apply the same ``smart_resize`` rule and return the same
``pixel_values`` / ``image_grid_thw`` shapes (so the same number of image tokens); pixel values differ only by their
bicubic implementations. So the pipelines behave the same with or without torchvision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import Qwen2VLProcessor, Qwen3VLProcessor

from .errors import ConfigError


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` with its image processor and tokenizer only (no video processor, so no torchvision)."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        # ProcessorMixin derives the sub-processors it loads, checks and saves from this list (by default from
        # __init__'s parameter names, which include video_processor). The video_processor=None that
        # Qwen2VLProcessor.__init__ still passes along is dropped because it is not listed here.
        return ["image_processor", "tokenizer"]


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` with its image processor and tokenizer only, as ``ImageOnlyQwen2VLProcessor``."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]


# model_index.json's processor class -> the class that loads those files without torchvision.
IMAGE_ONLY_PROCESSORS: dict[str, type[Any]] = {
    "Qwen2VLProcessor": ImageOnlyQwen2VLProcessor,
    "Qwen3VLProcessor": ImageOnlyQwen3VLProcessor,
}


def load_processor(folder: Path, class_name: str = "Qwen2VLProcessor") -> Any:
    """Load the processor in ``folder`` (a pipeline's ``processor/``) from local files only.

    ``class_name`` is the stock class ``model_index.json`` names for it."""
    processor_class = IMAGE_ONLY_PROCESSORS.get(class_name)
    if processor_class is None:
        raise ConfigError(
            f"{folder} holds a {class_name}; this worker loads only " + ", ".join(IMAGE_ONLY_PROCESSORS) + " processors"
        )
    processor = processor_class.from_pretrained(str(folder), local_files_only=True)
    if class_name == "Qwen3VLProcessor" and not processor.chat_template:
        # Qwen-Image-2.1 renders the template to count the system tokens it drops; without one it cannot start.
        raise ConfigError(f"{folder} has no chat template (chat_template.jinja or chat_template.json)")
    return processor
