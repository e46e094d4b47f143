"""One row per mode: everything that differs between text-to-image, edit, image-to-image, inpainting, outpainting,
layers and ControlNet, in one table (``MODES``).

A row says which field selects the mode (the mode rule, ``MODE_RULE``, is the rows' order), the mode's own fields,
how many input images it takes, its size rule, its default output format, whether it returns alpha, the pipelines
that serve it, how its call arguments are built, how the pipeline's output is unpacked, and what a request is told
when this endpoint does not serve it. The parser (``schema.py``), the runner, the worker and the response read the
row; none of them names an individual mode. A new mode is a new row here (and its ``Mode`` value in ``enums.py``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageOps

from .enums import Mode, OutputFormat

if TYPE_CHECKING:
    from .runner import GenerationJob


class SizeRule(enum.Enum):
    """Where a mode's output size comes from."""

    DRAWN = "drawn"  # a size form, else 1024x1024: the image is drawn from text
    FOLLOWS_INPUT = "follows input"  # a size form, else the (last) input image's aspect at about 1 MP
    KEEPS_INPUT = "keeps input"  # no size form: the input's own dimensions (or the grown canvas)
    LAYER_BUCKET = "layer bucket"  # no size form: the input's aspect at about resolution x resolution pixels


@dataclass(frozen=True)
class ModeRoute:
    """One way to serve a mode: the loaded pipeline it runs on (its ``model_index.json`` class) and the diffusers
    class that runs it, built from that one with ``from_pipe`` (None: the loaded pipeline itself)."""

    source: str
    pipeline_class: str | None = None


# What a mode adds to (or takes from) the call arguments every mode shares: (arguments, job, whether the loaded
# pipeline takes several reference images).
ModeArguments = Callable[[dict[str, Any], "GenerationJob", bool], None]
# The pipeline's output object -> the images of one job.
OutputUnpacker = Callable[[Any], list[Image.Image]]


@dataclass(frozen=True)
class ModeSpec:
    mode: Mode
    # For messages: "ControlNet (requests with control_image)".
    description: str
    # The field that selects the mode; None: selected by the input images' presence alone (edit, text-to-image).
    selector: str | None
    # The mode-specific fields it accepts (canonical names; ``MODE_FIELDS`` is every mode's). A mode-specific field
    # the chosen mode does not own is refused, naming the modes that own it: none is ever silently dropped.
    owns: frozenset[str]
    # Input images: the fewest and the most (None: as many as the serving model takes).
    min_images: int
    max_images: int | None
    size_rule: SizeRule
    # What a size form would contradict, for a mode that refuses every size form.
    returns: str
    default_format: OutputFormat
    # The outputs are one image's RGBA layers: always alpha (no jpeg, no opaque background), one seed for all of
    # them, num_images 1, and the safety checker refuses the job when any layer is flagged.
    layered: bool
    # The pipelines that can serve it, in order of preference: the first whose source pipeline is loaded serves.
    routes: tuple[ModeRoute, ...]
    # Needs the ControlNet module (QWEN_IMAGE_CONTROLNET_MODEL) beside its source pipeline.
    needs_controlnet: bool
    arguments: ModeArguments
    unpack: OutputUnpacker
    not_served: str
    # The side multiple of the size it renders at (the img2img pipeline accepts multiples of 16).
    size_multiple: int = 32
    # Without a prompt the pipeline captions the input image itself (layers).
    prompt_optional: bool = False

    @property
    def refuses_size(self) -> bool:
        return self.size_rule in (SizeRule.KEEPS_INPUT, SizeRule.LAYER_BUCKET)


# Qwen-Image-Layered's model card: true CFG with the guided prediction rescaled to the conditional one's norm, and
# an English caption when the request has no prompt.
LAYERS_CFG_NORMALIZE = True
LAYERS_CAPTION_IN_ENGLISH = True


def _no_arguments(call: dict[str, Any], job: GenerationJob, multiple_images: bool) -> None:
    """Nothing beyond the shared arguments."""


def _edit_arguments(call: dict[str, Any], job: GenerationJob, multiple_images: bool) -> None:
    call["image"] = list(job.inputs) if multiple_images else job.inputs[0]


def _image_to_image_arguments(call: dict[str, Any], job: GenerationJob, multiple_images: bool) -> None:
    # The pipeline stretches its input to the output size; cropping to the output's aspect first keeps the
    # proportions when a size of another aspect is asked for.
    call["image"] = ImageOps.fit(job.inputs[0], (job.width, job.height), Image.Resampling.LANCZOS)
    call["strength"] = job.request.strength


def _inpainting_arguments(call: dict[str, Any], job: GenerationJob, multiple_images: bool) -> None:
    """Inpainting, and outpainting (inpainting a grown canvas's new border)."""
    if job.canvas is None:
        raise ValueError(f"a {job.request.mode.value} job needs its canvas")
    # White (255) is repainted: the diffusers convention, and the worker's masks follow it.
    call["image"] = job.canvas.image
    call["mask_image"] = job.canvas.mask
    call["strength"] = job.request.strength


def _layers_arguments(call: dict[str, Any], job: GenerationJob, multiple_images: bool) -> None:
    request = job.request
    # The layered pipeline sizes its output from the image and the resolution bucket: it takes no width/height.
    del call["width"], call["height"]
    call["image"] = job.inputs[0].convert("RGBA")
    call["layers"] = request.layers
    call["resolution"] = request.resolution
    call["cfg_normalize"] = LAYERS_CFG_NORMALIZE
    call["use_en_prompt"] = LAYERS_CAPTION_IN_ENGLISH
    # No prompt: None makes the pipeline caption the image with its own vision-language text encoder.
    call["prompt"] = request.effective_prompt if request.effective_prompt.strip() else None


def _controlnet_arguments(call: dict[str, Any], job: GenerationJob, multiple_images: bool) -> None:
    if job.control is None:
        raise ValueError("a ControlNet job needs its control image")
    # The caller's control image is already preprocessed (canny, depth, pose...); only its size is made to fit.
    control = job.control
    if control.size != (job.width, job.height):
        control = control.resize((job.width, job.height), Image.Resampling.BILINEAR)
    call["control_image"] = control
    call["controlnet_conditioning_scale"] = job.request.controlnet_conditioning_scale


def _images(output: Any) -> list[Image.Image]:
    return list(output.images)


def _layers_of_first(output: Any) -> list[Image.Image]:
    # The layered pipeline returns one list of RGBA layers per input image; a job decomposes one image.
    return list(output.images[0])


_INPAINT_ROUTES = (
    # A plain Qwen-Image-Edit model applies the prompt as an instruction inside the mask. The edit-inpaint pipeline
    # encodes the single-image Edit prompt template, wrong for Edit-Plus (2509/2511) weights, so with those (or no
    # edit model) the text-to-image inpaint pipeline serves, the prompt describing the new content.
    ModeRoute("QwenImageEditPipeline", "QwenImageEditInpaintPipeline"),
    ModeRoute("QwenImagePipeline", "QwenImageInpaintPipeline"),
)
_INPAINT_MODELS = (
    "it needs the text-to-image model (QWEN_IMAGE_MODEL) or a Qwen-Image-Edit model (QwenImageEditPipeline, not "
    "Edit-Plus) as QWEN_IMAGE_EDIT_MODEL"
)
_INPAINT_FIELDS = frozenset({"strength", "preserve_unmasked"})

# The rows in the mode rule's order: the first whose selector is given wins; edit and text-to-image, selected by the
# input images alone, come last. The README's "Modes" section states the rule in one sentence.
_ROWS = (
    ModeSpec(
        Mode.LAYERS,
        description="layer decomposition (requests with layers)",
        selector="layers",
        owns=frozenset({"layers", "resolution"}),
        min_images=1,
        max_images=1,
        size_rule=SizeRule.LAYER_BUCKET,
        returns="the input's aspect ratio at about resolution x resolution pixels",
        default_format=OutputFormat.PNG,
        layered=True,
        routes=(ModeRoute("QwenImageLayeredPipeline"),),
        needs_controlnet=False,
        arguments=_layers_arguments,
        unpack=_layers_of_first,
        not_served="This endpoint does not serve layer decomposition (layers): it needs a Qwen-Image-Layered model "
        "as QWEN_IMAGE_LAYERED_MODEL, and none is configured.",
        prompt_optional=True,
    ),
    ModeSpec(
        Mode.INPAINTING,
        description="inpainting (with mask_image)",
        selector="mask_image",
        owns=_INPAINT_FIELDS | {"mask_image"},
        min_images=1,
        max_images=1,
        size_rule=SizeRule.KEEPS_INPUT,
        returns="the input image's own dimensions",
        default_format=OutputFormat.PNG,
        layered=False,
        routes=_INPAINT_ROUTES,
        needs_controlnet=False,
        arguments=_inpainting_arguments,
        unpack=_images,
        not_served=f"This endpoint does not serve inpainting (mask_image): {_INPAINT_MODELS}.",
    ),
    ModeSpec(
        Mode.OUTPAINTING,
        description="outpainting (with expand)",
        selector="expand",
        owns=_INPAINT_FIELDS | {"expand"},
        min_images=1,
        max_images=1,
        size_rule=SizeRule.KEEPS_INPUT,
        returns="the input grown by expand",
        default_format=OutputFormat.PNG,
        layered=False,
        routes=_INPAINT_ROUTES,  # outpainting is inpainting a grown canvas's new border
        needs_controlnet=False,
        arguments=_inpainting_arguments,
        unpack=_images,
        not_served=f"This endpoint does not serve outpainting (expand): {_INPAINT_MODELS}.",
    ),
    ModeSpec(
        Mode.IMAGE_TO_IMAGE,
        description="image-to-image (requests with 'image' and strength)",
        selector="strength",
        owns=frozenset({"strength", "match_input_size"}),
        min_images=1,
        max_images=1,
        size_rule=SizeRule.FOLLOWS_INPUT,
        returns="",
        default_format=OutputFormat.PNG,
        layered=False,
        routes=(ModeRoute("QwenImagePipeline", "QwenImageImg2ImgPipeline"),),
        needs_controlnet=False,
        arguments=_image_to_image_arguments,
        unpack=_images,
        not_served="This endpoint does not serve image-to-image (strength): it runs on the text-to-image model "
        "and QWEN_IMAGE_MODEL is off; send the request without strength to edit the image.",
        size_multiple=16,
    ),
    ModeSpec(
        Mode.CONTROLNET,
        description="ControlNet (requests with control_image)",
        selector="control_image",
        owns=frozenset({"control_image", "controlnet_conditioning_scale"}),
        min_images=0,
        max_images=0,
        size_rule=SizeRule.DRAWN,
        returns="",
        default_format=OutputFormat.PNG,
        layered=False,
        # The ControlNet module (QWEN_IMAGE_CONTROLNET_MODEL) joins the text-to-image model's own modules.
        routes=(ModeRoute("QwenImagePipeline", "QwenImageControlNetPipeline"),),
        needs_controlnet=True,
        arguments=_controlnet_arguments,
        unpack=_images,
        not_served="This endpoint does not serve ControlNet (control_image): it needs a Qwen-Image ControlNet as "
        "QWEN_IMAGE_CONTROLNET_MODEL beside the text-to-image model (QWEN_IMAGE_MODEL).",
    ),
    ModeSpec(
        Mode.EDIT,
        description="edits (requests with 'image' or 'images')",
        selector=None,
        owns=frozenset({"match_input_size"}),
        min_images=1,
        max_images=None,
        size_rule=SizeRule.FOLLOWS_INPUT,
        returns="",
        # Runpod's edit endpoint answers jpeg; the other modes keep every pixel the pipeline (and the input) gave.
        default_format=OutputFormat.JPEG,
        layered=False,
        # Qwen-Image-2.1 edits too (1-10 references), after a dedicated edit model when one is configured.
        routes=(
            ModeRoute("QwenImageEditPlusPipeline"),
            ModeRoute("QwenImageEditPipeline"),
            ModeRoute("QwenImage21Pipeline"),
        ),
        needs_controlnet=False,
        arguments=_edit_arguments,
        unpack=_images,
        not_served="This endpoint does not serve image editing (no QWEN_IMAGE_EDIT_MODEL is configured); send a "
        "request without 'image' for text-to-image.",
    ),
    ModeSpec(
        Mode.TEXT_TO_IMAGE,
        description="text-to-image",
        selector=None,
        owns=frozenset(),
        min_images=0,
        max_images=0,
        size_rule=SizeRule.DRAWN,
        returns="",
        default_format=OutputFormat.PNG,
        layered=False,
        routes=(ModeRoute("QwenImagePipeline"), ModeRoute("QwenImage21Pipeline")),
        needs_controlnet=False,
        arguments=_no_arguments,
        unpack=_images,
        not_served="This endpoint does not serve text-to-image (QWEN_IMAGE_MODEL is off); send an 'image' to "
        "edit it.",
    ),
)

MODES: Mapping[Mode, ModeSpec] = MappingProxyType({row.mode: row for row in _ROWS})

# The mode rule, first match wins: (the field that selects the mode, its row).
MODE_RULE: tuple[tuple[str, ModeSpec], ...] = tuple((row.selector, row) for row in _ROWS if row.selector is not None)

# Every mode-specific field, and the modes that own it, in the rule's order.
MODE_FIELDS: Mapping[str, tuple[ModeSpec, ...]] = MappingProxyType(
    {name: tuple(row for row in _ROWS if name in row.owns) for row in _ROWS for name in sorted(row.owns)}
)

# A value that asks for nothing is no mode's field: ``match_input_size: false`` is accepted in every mode.
NEUTRAL_VALUES: Mapping[str, object] = MappingProxyType({"match_input_size": False})


def image_mode(image_count: int) -> ModeSpec:
    """The row of a request no selector picked: an edit with input images, else text-to-image."""
    for row in _ROWS:
        if row.selector is None and (row.min_images <= image_count) and (row.max_images != 0 or not image_count):
            return row
    raise AssertionError("the table has a row for requests with and without images")


def spec(mode: Mode) -> ModeSpec:
    return MODES[mode]
