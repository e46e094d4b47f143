"""The request and the result, declared as pydantic models. ``RequestInput`` is what ``schema.parse_request``
validates every job's input with (strict types, forbidden extras, aliases, ranges) and what
``schema/request.schema.json`` is generated from (``make schema``), so the published JSON Schema and the validator
are one object; ``schema/result.schema.json`` comes from the result models.

JSON null means "absent" for every field (the parser drops nulls before validating). Rules that are not per field run
in ``schema.py`` as named steps after validation: aliases agreeing, one size form, the mode rule and a mode's own
fields (``modes.py``), fast mode's fixed steps, strength -> steps, the choices (case-insensitive) and per-model rules
(2.1's sizes and 10 references, card defaults); the descriptions say where they apply. tests/test_contract.py probes
every declared range, choice and type against ``parse_request`` and checks the README's parameter table against the
schema in every column; real results and quotes are validated against the result models.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

from .enums import Background, FastMode, OutputFormat
from .profiles import MAX_EDIT_IMAGES
from .sizes import ASPECT_RATIOS, FAL_PRESETS, REPLICATE_SIZE_MODES

SEED_LIMIT = 2**32
MAX_STEPS = 100
MIN_CFG, MAX_CFG = 1.0, 20.0
MAX_NUM_IMAGES = 4
MAX_LORAS = 3
MIN_LORA_SCALE, MAX_LORA_SCALE = -4.0, 4.0
# Stops absurd payloads early; the text encoder's window is far smaller, see runner.MAX_PROMPT_TOKENS.
MAX_PROMPT_CHARS = 10_000
MAX_URL_CHARS = 28_000_000  # a data URI of MAX_IMAGE_BYTES (20 MB) in base64
MAX_EXPAND = 1024  # pixels added on one side when outpainting
MIN_LAYERS, MAX_LAYERS = 2, 10  # layer decomposition: the layers asked for (Qwen-Image-Layered's card: 3-10 work best)
MIN_CONTROL_SCALE, MAX_CONTROL_SCALE = 0.0, 2.0  # controlnet_conditioning_scale
LAYER_RESOLUTIONS = (640, 1024)  # the only two buckets QwenImageLayeredPipeline accepts; the card advises 640
EXPAND_SIDES = ("left", "right", "top", "bottom")

# Qwen-Image-2.1 takes up to 10 reference images; other edit models MAX_EDIT_IMAGES (the runner refuses the rest).
MAX_REFERENCE_IMAGES = 10
MAX_LORA_PATH_CHARS = 4096

_STRICT = ConfigDict(extra="forbid", strict=True)



def _not_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("blank", "must not be empty")
    return value


NotBlank = AfterValidator(_not_blank)

ImageReference = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_URL_CHARS,
        description="an http(s) URL, a data:image/...;base64, URI, or bare base64 (PNG, JPEG, WebP, GIF, BMP, TIFF)",
    ),
    NotBlank,
]
CfgScale = Annotated[float, Field(ge=MIN_CFG, le=MAX_CFG, description="true CFG scale; 1 turns true CFG off")]
ImageCount = Annotated[int, Field(ge=1, le=MAX_NUM_IMAGES, description="images per job; image i uses seed + i")]
LoraScale = Annotated[float, Field(ge=MIN_LORA_SCALE, le=MAX_LORA_SCALE)]
Side = Annotated[int, Field(ge=0, le=MAX_EXPAND)]


def _choice_of(*values: str | int) -> WithJsonSchema:
    """One of these values, as JSON Schema's enum: the lists the parser uses, so none is written twice."""
    return WithJsonSchema({"type": "integer" if isinstance(values[0], int) else "string", "enum": list(values)})


AspectRatioName = Annotated[str, _choice_of(*ASPECT_RATIOS)]
ImageSizeName = Annotated[str, _choice_of(*FAL_PRESETS, *REPLICATE_SIZE_MODES)]
OutputFormatName = Annotated[str, _choice_of(*(f.value for f in OutputFormat), "jpg")]
BackgroundName = Annotated[str, _choice_of(*(b.value for b in Background))]
FastModeName = Annotated[str, _choice_of(*(m.value for m in FastMode))]
LayerResolution = Annotated[int, _choice_of(*LAYER_RESOLUTIONS)]


class LoraEntry(BaseModel):
    model_config = _STRICT
    path: Annotated[str, Field(min_length=1, max_length=MAX_LORA_PATH_CHARS), NotBlank] = Field(
        description="a local .safetensors file, a path on the network volume, or an https:// URL"
    )
    scale: LoraScale = 1.0


class ExpandSides(BaseModel):
    """Outpainting: pixels to add on each side (absent = 0; at least one above 0)."""

    model_config = _STRICT
    left: Side = 0
    right: Side = 0
    top: Side = 0
    bottom: Side = 0


class ImageSizeObject(BaseModel):
    model_config = _STRICT
    width: int
    height: int


class RequestInput(BaseModel):
    """A job's ``input``. An unknown field fails the request naming it; aliases of one field must agree; one size
    form at most. A mode's own fields (strength, mask_image, expand, layers, control_image...) are refused in
    another mode, naming the field and the mode it belongs to."""

    # Python's re, as schema.parse_size's: Rust's regex disagrees on what \s and \d match.
    model_config = ConfigDict(
        extra="forbid", strict=True, regex_engine="python-re", title="Qwen-Image worker request (the job's input)"
    )

    prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None = Field(
        None, description="required, non-empty; optional with layers (the model then captions the image)"
    )
    negative_prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] = ""
    size: Annotated[str, Field(pattern=r"^\s*\d{1,6}\s*\*\s*\d{1,6}\s*$")] | None = Field(
        None, description='"W*H"; each side 256-2048, multiple of 16 (2.1: 256-2752, multiple of 32)'
    )
    width: int | None = Field(None, description="with height; the same rule as size")
    height: int | None = Field(None, description="with width; the same rule as size")
    aspect_ratio: AspectRatioName | None = None
    image_size: ImageSizeName | ImageSizeObject | None = Field(
        None, description="fal's presets or {width, height}; Replicate's modes (with aspect_ratio)"
    )
    seed: Annotated[int, Field(ge=-1, le=SEED_LIMIT - 1)] = Field(-1, description="-1: random")
    num_inference_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = Field(
        None, description="default: DEFAULT_STEPS, else the model card's (50; 40 for Edit-Plus and 2.1)"
    )
    true_cfg_scale: CfgScale | None = Field(
        None, description="default: DEFAULT_TRUE_CFG_SCALE, else the model card's (4; 1 for 2.1)"
    )
    guidance: CfgScale | None = Field(None, description="alias of true_cfg_scale")
    guidance_scale: CfgScale | None = Field(None, description="alias of true_cfg_scale")
    num_images: ImageCount = 1
    n: ImageCount | None = Field(None, description="alias of num_images")
    enable_safety_checker: bool = True
    disable_safety_checker: bool | None = Field(None, description="the inverse of enable_safety_checker")
    image: ImageReference | None = None
    images: Annotated[list[ImageReference], Field(min_length=1, max_length=MAX_REFERENCE_IMAGES)] | None = Field(
        None, description=f"1-{MAX_EDIT_IMAGES} references for Edit-Plus models, 1-{MAX_REFERENCE_IMAGES} for 2.1"
    )
    output_format: OutputFormatName | None = Field(
        None, description="default: jpeg for edits, else png (also with background transparent)"
    )
    output_quality: Annotated[int, Field(ge=1, le=100)] | None = Field(None, description="jpeg and webp only")
    background: BackgroundName = Background.AUTO.value
    match_input_size: bool = False
    strength: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(
        None, description="selects image-to-image; inpainting and outpainting default to 1"
    )
    mask_image: ImageReference | None = Field(None, description="selects inpainting; white = repaint")
    mask: ImageReference | None = Field(None, description="alias of mask_image")
    mask_url: ImageReference | None = Field(None, description="alias of mask_image")
    expand: ExpandSides | None = Field(None, description="selects outpainting")
    preserve_unmasked: bool = True
    loras: Annotated[list[LoraEntry], Field(max_length=MAX_LORAS)] = []
    lora_weights: Annotated[str, Field(min_length=1, max_length=MAX_LORA_PATH_CHARS), NotBlank] | None = Field(
        None, description="Replicate's single LoRA, as one loras entry"
    )
    lora_scale: LoraScale | None = Field(None, description="with lora_weights only")
    go_fast: bool = False
    acceleration: FastModeName = FastMode.NONE.value
    enhance_prompt: bool = False
    prompt_extend: bool | None = Field(None, description="alias of enhance_prompt")
    sync_mode: bool = False
    watermark: bool = Field(False, description="only false is supported")
    dry_run: bool = False
    control_image: ImageReference | None = Field(None, description="selects ControlNet: a preprocessed control image")
    controlnet_conditioning_scale: Annotated[float, Field(ge=MIN_CONTROL_SCALE, le=MAX_CONTROL_SCALE)] = 1.0
    layers: Annotated[int, Field(ge=MIN_LAYERS, le=MAX_LAYERS)] | None = Field(
        None, description="selects layer decomposition: how many RGBA layers"
    )
    resolution: LayerResolution = LAYER_RESOLUTIONS[0]


class ResultImage(BaseModel):
    model_config = _STRICT
    url: str
    seed: int
    width: int
    height: int
    content_type: str


class ResultModel(BaseModel):
    model_config = _STRICT
    id: str
    revision: str | None
    license: str | None = None


class JobResult(BaseModel):
    """A completed job's output (a failed job is Runpod's {"status": "FAILED", "error": "<string>"})."""

    model_config = ConfigDict(extra="forbid", strict=True, title="Qwen-Image worker result (the job's output)")
    image_url: str
    cost: float
    images: list[ResultImage]
    seed: int
    width: int
    height: int
    num_inference_steps: int
    true_cfg_scale: float
    safety_checker: str
    timings: dict[str, float]
    model: ResultModel
    has_nsfw_concepts: list[bool] | None = None
    prompt: str | None = Field(None, description="the prompt used, with enhance_prompt")
    acceleration: str | None = None
    notes: list[str] | None = Field(None, description="what the worker changed or ignored")
    warning: str | None = None


class DryRunQuote(BaseModel):
    """A dry run's output: the job quoted, nothing generated."""

    model_config = ConfigDict(extra="forbid", strict=True, title="Qwen-Image worker dry-run quote")
    dry_run: Literal[True]
    task: str
    cost: float
    width: int
    height: int
    num_images: int
    seed: int
    seeds: list[int]
    num_inference_steps: int
    true_cfg_scale: float
    output_format: str
    prompt: str
    strength: float | None = None
    layers: int | None = None
    resolution: int | None = None
    notes: list[str] | None = None


def request_schema() -> dict[str, Any]:
    return RequestInput.model_json_schema()


def result_schema() -> dict[str, Any]:
    schema = JobResult.model_json_schema()
    quote = DryRunQuote.model_json_schema()
    definitions = {**schema.pop("$defs", {}), **quote.pop("$defs", {})}
    return {
        "title": "Qwen-Image worker output: a result or a dry-run quote",
        "oneOf": [{"$ref": "#/$defs/JobResult"}, {"$ref": "#/$defs/DryRunQuote"}],
        "$defs": {**definitions, "JobResult": schema, "DryRunQuote": quote},
    }


def dumps(schema: dict[str, Any]) -> str:
    """The committed form: stable key order, two-space indent, a final newline."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
