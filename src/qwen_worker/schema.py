"""The request a job carries, parsed once into a typed ``Request``.

This is the only module that knows input field names, including the other hosts' dialects (fal, Replicate,
DashScope, Oxen/eachlabs). The README's parameter table documents every field, alias, default and rule
(tests/test_docs.py holds the two in step); size rules live in ``sizes.py``.

Types are strict: an integer must be a JSON integer (not "12", 1.0 or true) and a boolean a JSON boolean; strings must
be valid Unicode (an unpaired surrogate escape such as "\\ud800" is refused). A field the worker does not know fails
the request, naming it, so that a typo never passes silently. Aliases of one field must agree when several are given;
two size forms at once are refused.
"""

from __future__ import annotations

import difflib
import enum
import math
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, overload

# Re-exported: callers that parse requests read these names here too; the modules below the parser import enums.py.
from .enums import Background as Background
from .enums import Expand as Expand
from .enums import FastMode as FastMode
from .enums import LoraRequest as LoraRequest
from .enums import Mode as Mode
from .enums import OutputFormat as OutputFormat
from .enums import Task as Task
from .errors import ValidationError, json_type, preview
from .modes import MODE_FIELDS, MODE_RULE, NEUTRAL_VALUES, ModeSpec, SizeRule, image_mode
from .profiles import DEFAULT_PROFILE, request_rules
from .profiles import MAX_EDIT_IMAGES as MAX_EDIT_IMAGES
from .profiles import GenerationDefaults as GenerationDefaults
from .sizes import (
    DEFAULT_SIZE_RULES,
    FAL_PRESETS,
    REPLICATE_SIZE_MODES,
    SizeRules,
    about_one_megapixel,
    check_dimensions,
)

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

_SIZE_PATTERN = re.compile(r"^\s*(\d{1,6})\s*\*\s*(\d{1,6})\s*$")

# The Qwen-Image model card's "positive magic", appended when enhance_prompt is on.
MAGIC_SUFFIX_EN = ", Ultra HD, 4K, cinematic composition."
MAGIC_SUFFIX_ZH = ", 超清，4K，电影级构图."


@dataclass(frozen=True)
class Request:
    """A validated job. ``width``/``height`` are None when the size follows the (last) input image."""

    mode: Mode
    prompt: str  # as sent; see ``effective_prompt`` for what the model reads
    negative_prompt: str
    width: int | None
    height: int | None
    seed: int
    num_inference_steps: int
    true_cfg_scale: float
    enable_safety_checker: bool
    output_format: OutputFormat
    image_urls: tuple[str, ...] = ()
    background: Background = Background.AUTO
    num_images: int = 1
    output_quality: int | None = None
    match_input_size: bool = False
    loras: tuple[LoraRequest, ...] = ()
    fast_mode: FastMode = FastMode.NONE
    enhance_prompt: bool = False
    sync_mode: bool = False
    dry_run: bool = False
    strength: float | None = None  # image-to-image, inpainting and outpainting: how much of the input is re-noised
    mask_url: str | None = None  # inpainting
    expand: Expand | None = None  # outpainting
    preserve_unmasked: bool = True  # inpainting and outpainting: paste the input back outside the mask
    layers: int | None = None  # layer decomposition: how many RGBA layers to return
    resolution: int | None = None  # layer decomposition: the pipeline's size bucket (640 or 1024)
    control_url: str | None = None  # ControlNet: the preprocessed control image
    controlnet_conditioning_scale: float = 1.0  # ControlNet: how strongly the control image steers
    notes: tuple[str, ...] = ()  # what the worker changed or ignored, reported back in the result

    @property
    def denoising_steps(self) -> int:
        """The steps the pipeline really runs: with a strength, only the last part of the schedule."""
        if self.strength is None:
            return self.num_inference_steps
        return denoising_steps(self.num_inference_steps, self.strength)

    @property
    def num_outputs(self) -> int:
        """The images a job delivers (and is priced for): one per layer when decomposing, else num_images."""
        return self.layers if self.layers is not None else self.num_images

    @property
    def seeds(self) -> list[int]:
        return [(self.seed + index) % SEED_LIMIT for index in range(self.num_images)]

    @property
    def effective_prompt(self) -> str:
        # A layers request without a prompt stays empty: the pipeline then captions the image itself.
        if not self.enhance_prompt or not self.prompt.strip():
            return self.prompt
        return self.prompt.rstrip() + (MAGIC_SUFFIX_ZH if mostly_cjk(self.prompt) else MAGIC_SUFFIX_EN)


_CARD_RULES = request_rules(DEFAULT_PROFILE)

_ALIASES: dict[str, tuple[str, ...]] = {
    "true_cfg_scale": ("true_cfg_scale", "guidance", "guidance_scale"),
    "num_images": ("num_images", "n"),
    "enhance_prompt": ("enhance_prompt", "prompt_extend"),
    "mask_image": ("mask_image", "mask", "mask_url"),
}
_FIELDS = frozenset(
    {
        "prompt", "negative_prompt", "size", "width", "height", "aspect_ratio", "image_size", "seed",
        "num_inference_steps", "enable_safety_checker", "disable_safety_checker", "image", "images",
        "output_format", "output_quality", "match_input_size", "loras", "lora_weights", "lora_scale", "go_fast",
        "acceleration", "sync_mode", "watermark", "dry_run", "background", "strength", "expand", "preserve_unmasked",
        "layers", "resolution", "control_image", "controlnet_conditioning_scale",
    }
    | {alias for names in _ALIASES.values() for alias in names}
)


def parse_request(
    raw: Any, defaults: GenerationDefaults | Callable[[Mode], GenerationDefaults] | None = None
) -> Request:
    """Validate a job's ``input`` and return the typed request, or raise ``ValidationError`` naming the field.

    ``defaults`` may be a function of the mode: the model that serves a request (and so its rules) depends on it.
    None: Qwen-Image's card (``profiles.DEFAULT_PROFILE``)."""
    if defaults is None:
        defaults = _CARD_RULES
    if not isinstance(raw, Mapping):
        raise ValidationError("input", f"must be a JSON object, got {json_type(raw)}")
    _reject_unknown_fields(raw)
    fields = _Fields(raw)
    notes: list[str] = []

    # The mode first (it decides which model serves the request, and so its rules), from the images' presence and
    # count alone; the images themselves are validated against that model's rules below.
    spec = _mode(fields, _image_count(fields))
    mode = spec.mode
    _refuse_fields_of_other_modes(fields, spec)
    rules = defaults(mode) if callable(defaults) else defaults
    image_urls = _image_urls(fields, rules.max_images)
    if spec.refuses_size:
        _refuse_size_forms(fields, spec)
    layers, resolution = _layers(fields, spec)
    width, height = _size(fields, rules, default=(1024, 1024) if spec.size_rule is SizeRule.DRAWN else None)
    match_input_size = fields.boolean("match_input_size", default=False)
    if match_input_size and width is not None:
        raise ValidationError("match_input_size", "cannot be combined with an explicit size")
    preserve_unmasked = fields.boolean("preserve_unmasked", default=None)

    fast_mode = _fast_mode(fields)
    steps = fields.integer("num_inference_steps", default=None, low=1, high=MAX_STEPS)
    cfg = fields.aliased_number("true_cfg_scale", default=None, low=MIN_CFG, high=MAX_CFG)
    if fast_mode is not FastMode.NONE:
        # Lightning LoRAs are distilled for an exact step count without CFG; other values would only spoil them.
        if steps is not None and steps != fast_mode.steps:
            notes.append(
                f"fast mode ({fast_mode.value}) runs {fast_mode.steps} steps; num_inference_steps {steps} ignored"
            )
        if cfg is not None and cfg != 1.0:
            notes.append(f"fast mode ({fast_mode.value}) runs without true CFG; true_cfg_scale {cfg:g} ignored")
        steps, cfg = fast_mode.steps, 1.0

    steps = steps if steps is not None else rules.num_inference_steps
    strength = _strength(fields, spec)
    if strength is not None:
        # The pipelines run only the last strength x steps of the schedule; none at all is refused here, never
        # left to the pipeline's ValueError.
        steps_run, total = denoising_steps(steps, strength), steps
        if steps_run < 1:
            raise ValidationError(
                "strength",
                f"{strength:g} leaves no denoising step at {total} steps: use a strength of at least {1 / total:.3g}",
            )
        if steps_run < total:
            notes.append(f"strength {strength:g} runs the last {steps_run} of {total} steps")

    background = _background(fields.optional("background"), rules)
    # The mode's default format (``modes.py``); a transparent result needs a format with alpha: PNG unless WebP is
    # asked for.
    default_format = OutputFormat.PNG if background is Background.TRANSPARENT else spec.default_format
    output_format = _output_format(fields.optional("output_format"), default_format)
    if spec.layered and output_format is OutputFormat.JPEG:
        raise ValidationError("output_format", "jpeg has no alpha channel, which layers need: use png or webp")
    if spec.layered and background is Background.OPAQUE:
        raise ValidationError("background", "opaque cannot be used with layers: each layer is a transparent RGBA image")
    if background is Background.TRANSPARENT and output_format is OutputFormat.JPEG:
        raise ValidationError("output_format", "jpeg has no alpha channel: use png or webp with background transparent")
    output_quality = fields.integer("output_quality", default=None, low=1, high=100)
    if output_quality is not None and output_format is OutputFormat.PNG:
        raise ValidationError("output_quality", "applies to jpeg and webp only (png is lossless)")

    if fields.boolean("watermark", default=False):
        raise ValidationError("watermark", "true is not supported: this worker never watermarks images")

    negative_prompt = fields.string("negative_prompt", default="")
    true_cfg_scale = cfg if cfg is not None else rules.true_cfg_scale
    if rules.cfg_needs_negative_prompt and true_cfg_scale > 1.0:
        # Qwen-Image-2.1 runs true CFG only against an explicit negative prompt (its pipeline's rule), and each
        # step then runs the transformer twice.
        if negative_prompt.strip():
            notes.append(
                f"true CFG (true_cfg_scale {true_cfg_scale:g}) runs the model twice per step: it doubles the cost"
            )
        else:
            notes.append(
                f"true_cfg_scale {true_cfg_scale:g} ignored: this model runs true CFG only with a negative_prompt"
            )
            true_cfg_scale = 1.0

    num_images = fields.aliased_integer("num_images", default=1, low=1, high=MAX_NUM_IMAGES)
    if spec.layered and num_images != 1:
        raise ValidationError(
            _given_name(fields, "num_images") or "num_images",
            "must be 1 with layers: a job decomposes its image once (the layers count sets how many images return)",
        )
    control_scale = fields.number(
        "controlnet_conditioning_scale", default=None, low=MIN_CONTROL_SCALE, high=MAX_CONTROL_SCALE
    )

    # Layer decomposition may go without a prompt: the pipeline then captions the input image itself.
    prompt = (
        fields.string("prompt", default="")
        if spec.prompt_optional
        else fields.string("prompt", required=True, non_empty=True)
    )

    return Request(
        mode=mode,
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        seed=_seed(fields.integer("seed", default=-1)),
        num_inference_steps=steps,
        true_cfg_scale=true_cfg_scale,
        enable_safety_checker=_safety_checker(fields),
        output_format=output_format,
        image_urls=image_urls,
        background=background,
        num_images=num_images,
        output_quality=output_quality,
        match_input_size=match_input_size,
        loras=_loras(fields),
        fast_mode=fast_mode,
        enhance_prompt=fields.aliased_boolean("enhance_prompt", default=False),
        sync_mode=fields.boolean("sync_mode", default=False),
        dry_run=fields.boolean("dry_run", default=False),
        strength=strength,
        # A field the mode does not own was refused above: each is read only where it was given.
        mask_url=fields.aliased_url("mask_image"),
        expand=_expand(fields) if fields.optional("expand") is not None else None,
        preserve_unmasked=preserve_unmasked if preserve_unmasked is not None else True,
        layers=layers,
        resolution=resolution,
        control_url=(
            fields.string("control_image", non_empty=True, max_chars=MAX_URL_CHARS)
            if fields.optional("control_image") is not None
            else None
        ),
        controlnet_conditioning_scale=control_scale if control_scale is not None else 1.0,
        notes=tuple(notes),
    )


def denoising_steps(num_inference_steps: int, strength: float) -> int:
    """The steps a diffusers image-to-image or inpaint pipeline runs at ``strength``: its ``get_timesteps``, mirrored
    (the same float arithmetic), so the count is known, and a strength that leaves none refused, before any work."""
    init_timestep = min(num_inference_steps * strength, num_inference_steps)
    t_start = int(max(num_inference_steps - init_timestep, 0))
    return num_inference_steps - t_start


def parse_size(value: Any, rules: SizeRules = DEFAULT_SIZE_RULES) -> tuple[int, int]:
    """Parse Runpod's "W*H" size string; Runpod's own wording for a malformed value is kept verbatim."""
    if not isinstance(value, str):
        raise ValidationError(
            "size", f'format must be width*height (a string such as "1024*1024"), got {json_type(value)}'
        )
    match = _SIZE_PATTERN.match(value)
    if not match:
        raise ValidationError("size", f'format must be width*height (e.g. "1024*1024"), got {preview(value)}')
    width, height = int(match.group(1)), int(match.group(2))
    check_dimensions(width, height, field="size", rules=rules)
    return width, height


def mostly_cjk(text: str) -> bool:
    letters = [c for c in text if not c.isspace() and c.isalnum()]
    cjk = sum(1 for c in letters if "\u3040" <= c <= "\u9fff" or "\uac00" <= c <= "\ud7af" or "\uf900" <= c <= "\ufaff")
    return bool(letters) and cjk * 2 > len(letters)


def _size(fields: _Fields, rules: GenerationDefaults, default: tuple[int, int] | None) -> tuple[int | None, int | None]:
    """One size form at most: size | width+height | aspect_ratio | image_size.

    Replicate's image_size modes may take an aspect_ratio beside them."""
    size, width, height = fields.optional("size"), fields.optional("width"), fields.optional("height")
    aspect, image_size = fields.optional("aspect_ratio"), fields.optional("image_size")
    forms = _size_forms(fields)
    if len(forms) > 1:
        raise ValidationError(
            forms[1].split("/")[0], f"cannot be combined with {forms[0]}: give the size in one form only"
        )
    if size is not None:
        return parse_size(size, rules.sizes)
    if width is not None or height is not None:
        w = fields.integer("width", default=None)
        h = fields.integer("height", default=None)
        if w is None or h is None:
            raise ValidationError("width" if w is None else "height", "is required when the other side is given")
        check_dimensions(w, h, field="width/height", rules=rules.sizes)
        return w, h
    if image_size is not None:
        return _image_size(image_size, aspect, rules)
    if aspect is not None:
        return _aspect_ratio(aspect, rules.aspect_ratios)
    return default if default is not None else (None, None)


def _size_forms(fields: _Fields) -> list[str]:
    """The size forms a request gives, in the order the README lists them."""
    image_size = fields.optional("image_size")
    replicate_mode = isinstance(image_size, str) and image_size in REPLICATE_SIZE_MODES
    return [
        name
        for name, present in (
            ("size", fields.optional("size") is not None),
            ("width/height", fields.optional("width") is not None or fields.optional("height") is not None),
            ("aspect_ratio", fields.optional("aspect_ratio") is not None and not replicate_mode),
            ("image_size", image_size is not None),
        )
        if present
    ]


def _image_count(fields: _Fields) -> int:
    """How many input images the request gives (0, 1 or the length of ``images``), before they are validated."""
    images = fields.optional("images")
    if fields.optional("image") is not None:
        return 1
    if isinstance(images, list):
        return len(images)
    return 0 if images is None else 1


def _mode(fields: _Fields, image_count: int) -> ModeSpec:
    """The mode rule (``modes.MODE_RULE``: the first selector given wins, else the input images decide), and the
    mode's input-image count checked, naming what would serve the request."""
    selected = next(((name, row) for name, row in MODE_RULE if _given_name(fields, name) is not None), None)
    if selected is None:
        return image_mode(image_count)
    name, spec = selected
    given = _given_name(fields, name) or name
    if spec.max_images == 0 and image_count:
        raise ValidationError(
            "image" if fields.optional("image") is not None else "images",
            f"cannot be combined with {given}: {spec.mode.value} draws from text and takes no input image",
        )
    if image_count < spec.min_images:
        raise ValidationError(given, f"needs the input image ('image') for {spec.mode.value}")
    if spec.max_images == 1 and image_count > 1:
        raise ValidationError(
            "images",
            f"with several images is for Edit-Plus edits; {spec.mode.value} takes one input image: send it as 'image'",
        )
    return spec


def _refuse_fields_of_other_modes(fields: _Fields, spec: ModeSpec) -> None:
    """One rule for every mode: a mode's own field given to another mode is refused, naming the field and the modes
    it belongs to, so that no field is ever silently dropped. Another mode's selector names the one that won."""
    selector = _given_name(fields, spec.selector) if spec.selector is not None else None
    for name, owners in MODE_FIELDS.items():
        given = _given_name(fields, name)
        if given is None or spec in owners or fields.optional(given) is NEUTRAL_VALUES.get(name):
            continue
        selects = next((row for row in owners if row.selector == name), None)
        if selects is not None and selector is not None:
            raise ValidationError(
                given, f"cannot be combined with {selector}: {selects.mode.value} and {spec.mode.value} are separate "
                "jobs; send one of them"
            )
        # The modes that images alone select (edits) first: the general case before the specific ones.
        described = [row.description for row in sorted(owners, key=lambda row: row.selector is not None)]
        listed = described[0] if len(described) == 1 else ", ".join(described[:-1]) + " and " + described[-1]
        raise ValidationError(given, f"applies only to {listed}")


def _given_name(fields: _Fields, canonical: str) -> str | None:
    """The name under which a field (or one of its aliases) was given, or None."""
    for name in _ALIASES.get(canonical, (canonical,)):
        if fields.optional(name) is not None:
            return name
    return None


def _refuse_size_forms(fields: _Fields, spec: ModeSpec) -> None:
    forms = _size_forms(fields)
    if not forms or spec.selector is None:
        return
    selector = _given_name(fields, spec.selector) or spec.selector
    raise ValidationError(
        forms[0].split("/")[0], f"cannot be combined with {selector}: {spec.mode.value} returns {spec.returns}"
    )


def _strength(fields: _Fields, spec: ModeSpec) -> float | None:
    """Image-to-image's strength (it selects the mode); inpainting and outpainting default to 1 (full repaint)."""
    if "strength" not in spec.owns:
        return None  # the field was refused if given
    value = fields.number("strength", default=None, low=0.0, high=1.0)
    if value is None:
        return 1.0
    if value == 0.0:
        raise ValidationError("strength", "must be greater than 0 (0 would leave the input unchanged), got 0")
    return value


def _layers(fields: _Fields, spec: ModeSpec) -> tuple[int | None, int | None]:
    """Layer decomposition's layer count (it selects the mode) and resolution bucket."""
    if "resolution" not in spec.owns:
        return None, None  # the fields were refused if given
    layers = fields.integer("layers", default=None, low=MIN_LAYERS, high=MAX_LAYERS)
    resolution = fields.integer("resolution", default=LAYER_RESOLUTIONS[0])
    if resolution not in LAYER_RESOLUTIONS:
        raise ValidationError(
            "resolution", f"must be {' or '.join(map(str, LAYER_RESOLUTIONS))}, got {preview(resolution)}"
        )
    return layers, resolution


def _expand(fields: _Fields) -> Expand:
    value = fields.optional("expand")
    rule = f'must be an object {{"left", "right", "top", "bottom"}} of pixels, each 0 to {MAX_EXPAND}'
    if not isinstance(value, Mapping) or not value or not set(value) <= set(EXPAND_SIDES):
        raise ValidationError("expand", rule)
    sides = _Fields(value)
    amounts = {
        side: sides.integer(side, default=0, low=0, high=MAX_EXPAND, field_prefix="expand.") for side in EXPAND_SIDES
    }
    if not any(amounts.values()):
        raise ValidationError("expand", "must add at least one pixel on one side")
    return Expand(**amounts)


def _aspect_ratio(value: Any, presets: Mapping[str, tuple[int, int]]) -> tuple[int, int]:
    if not isinstance(value, str) or value.strip() not in presets:
        raise ValidationError("aspect_ratio", f"must be one of {', '.join(presets)}, got {preview(value)}")
    return presets[value.strip()]


def _image_size(value: Any, aspect: Any, rules: GenerationDefaults) -> tuple[int, int]:
    if isinstance(value, Mapping):
        unknown = set(value) - {"width", "height"}
        if unknown or not {"width", "height"} <= set(value):
            raise ValidationError("image_size", "as an object must be exactly {\"width\": int, \"height\": int}")
        sides = _Fields(value)
        width = sides.integer("width", default=0, field_prefix="image_size.")
        height = sides.integer("height", default=0, field_prefix="image_size.")
        check_dimensions(width, height, field="image_size", rules=rules.sizes)
        return width, height
    if isinstance(value, str) and value in FAL_PRESETS:
        return FAL_PRESETS[value]
    if isinstance(value, str) and value in REPLICATE_SIZE_MODES:
        name = aspect if aspect is not None else "1:1"
        width, height = _aspect_ratio(name, rules.aspect_ratios)
        if value == "optimize_for_speed":
            across, down = (int(part) for part in name.strip().split(":"))
            width, height = about_one_megapixel(across / down, multiple=rules.sizes.multiple)
        return width, height
    names = ", ".join([*FAL_PRESETS, *REPLICATE_SIZE_MODES])
    raise ValidationError("image_size", f"must be one of {names}, or {{\"width\", \"height\"}}; got {preview(value)}")


def _image_urls(fields: _Fields, max_images: int) -> tuple[str, ...]:
    image, images = fields.optional("image"), fields.optional("images")
    if image is not None and images is not None:
        raise ValidationError(
            "images", "cannot be combined with image: send one image as 'image' or several as 'images'"
        )
    if image is not None:
        return (fields.string("image", non_empty=True, max_chars=MAX_URL_CHARS),)
    if images is None:
        return ()
    if not isinstance(images, list) or not 1 <= len(images) <= max_images:
        raise ValidationError(
            "images", f"must be an array of 1 to {max_images} image URLs, data URIs or base64 strings"
        )
    for index, item in enumerate(images):
        if not isinstance(item, str) or not item.strip():
            raise ValidationError(f"images[{index}]", f"must be a non-empty string, got {json_type(item)}")
        if len(item) > MAX_URL_CHARS:
            raise ValidationError(f"images[{index}]", f"must be at most {MAX_URL_CHARS} characters")
        if _has_lone_surrogate(item):
            raise ValidationError(f"images[{index}]", _LONE_SURROGATE_RULE)
    return tuple(images)


def _safety_checker(fields: _Fields) -> bool:
    enable = fields.boolean("enable_safety_checker", default=None)
    disable = fields.boolean("disable_safety_checker", default=None)
    if enable is not None and disable is not None and enable == disable:
        raise ValidationError(
            "disable_safety_checker", f"contradicts enable_safety_checker ({str(enable).lower()}): give one of them"
        )
    if enable is not None:
        return enable
    return not disable if disable is not None else True


def _fast_mode(fields: _Fields) -> FastMode:
    go_fast = fields.boolean("go_fast", default=None)
    acceleration = fields.optional("acceleration")
    mode = FastMode.NONE if acceleration is None else _enum_choice("acceleration", acceleration, FastMode)
    if go_fast is not None:
        if acceleration is not None and go_fast != (mode is not FastMode.NONE):
            raise ValidationError("go_fast", f"contradicts acceleration {mode.value!r}: give one of them")
        if go_fast and mode is FastMode.NONE:
            mode = FastMode.REGULAR
    return mode


def _loras(fields: _Fields) -> tuple[LoraRequest, ...]:
    loras, single = fields.optional("loras"), fields.optional("lora_weights")
    if loras is not None and single is not None:
        raise ValidationError("lora_weights", "cannot be combined with loras: put every LoRA in 'loras'")
    if single is not None:
        path = fields.string("lora_weights", non_empty=True, max_chars=4096)
        scale = fields.number("lora_scale", default=1.0, low=MIN_LORA_SCALE, high=MAX_LORA_SCALE)
        return (LoraRequest(path.strip(), scale),)
    if fields.optional("lora_scale") is not None:
        raise ValidationError("lora_scale", "needs lora_weights")
    if loras is None:
        return ()
    if not isinstance(loras, list) or len(loras) > MAX_LORAS:
        raise ValidationError("loras", f"must be an array of at most {MAX_LORAS} {{\"path\", \"scale\"}} objects")
    parsed = []
    for index, entry in enumerate(loras):
        name = f"loras[{index}]"
        if not isinstance(entry, Mapping) or not set(entry) <= {"path", "scale"} or "path" not in entry:
            raise ValidationError(name, 'must be an object {"path": string, "scale": number}')
        item = _Fields(entry)
        path = item.string("path", non_empty=True, max_chars=4096, field_prefix=f"{name}.")
        scale = item.number("scale", default=1.0, low=MIN_LORA_SCALE, high=MAX_LORA_SCALE, field_prefix=f"{name}.")
        parsed.append(LoraRequest(path.strip(), scale))
    return tuple(parsed)


def _seed(value: int) -> int:
    if value == -1:
        return secrets.randbelow(SEED_LIMIT)
    if not 0 <= value < SEED_LIMIT:
        raise ValidationError(
            "seed", f"must be -1 (random) or an integer from 0 to {SEED_LIMIT - 1}, got {preview(value)}"
        )
    return value


_E = TypeVar("_E", bound=enum.Enum)


def _enum_choice(field: str, value: Any, choices: type[_E]) -> _E:
    """A string naming one of an enum's values (case and surrounding spaces ignored), or an error listing them."""
    allowed = ", ".join(f'"{choice.value}"' for choice in choices)
    if not isinstance(value, str):
        raise ValidationError(field, f"must be one of {allowed}, got {json_type(value)}")
    try:
        return choices(value.strip().lower())
    except ValueError:
        raise ValidationError(field, f"must be one of {allowed}, got {preview(value)}") from None


def _background(value: Any, rules: GenerationDefaults) -> Background:
    if value is None:
        return Background.AUTO
    background = _enum_choice("background", value, Background)
    if background is Background.TRANSPARENT and not rules.alpha_output:
        raise ValidationError(
            "background", "transparent needs a model that draws alpha (Qwen-Image-2.1); this endpoint's model does not"
        )
    return background


def _output_format(value: Any, default: OutputFormat) -> OutputFormat:
    if value is None:
        return default
    allowed = '"png", "jpeg" (or "jpg"), "webp"'
    if not isinstance(value, str):
        raise ValidationError("output_format", f"must be one of {allowed}, got {json_type(value)}")
    name = value.strip().lower()
    try:
        return OutputFormat("jpeg" if name == "jpg" else name)
    except ValueError:
        raise ValidationError("output_format", f"must be one of {allowed}, got {preview(value)}") from None


def _reject_unknown_fields(raw: Mapping[Any, Any]) -> None:
    unknown = [key for key in raw if key not in _FIELDS]
    if not unknown:
        return
    described = []
    for key in unknown[:5]:
        name = preview(key if isinstance(key, str) else repr(key))
        close = difflib.get_close_matches(str(key), sorted(_FIELDS), n=1)
        described.append(f"{name} (did you mean '{close[0]}'?)" if close else name)
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    raise ValidationError(
        "input", f"has unknown field(s) {', '.join(described)}{more}; see the README's parameter table"
    )


_T = TypeVar("_T")


class _Fields:
    """Typed, strict reads of one object's fields; every failure names the field.

    Each reader returns the parsed value, or ``default`` when the field is absent or JSON null; the return type
    follows the default's (``default=None`` gives an optional value).
    """

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self._raw = raw

    def optional(self, name: str) -> Any:
        """The raw value, or None when the field is absent or JSON null."""
        return self._raw.get(name)

    def string(
        self,
        name: str,
        *,
        default: str | None = None,
        required: bool = False,
        non_empty: bool = False,
        max_chars: int = MAX_PROMPT_CHARS,
        field_prefix: str = "",
    ) -> str:
        field = field_prefix + name
        value = self.optional(name)
        if value is None:
            if required or default is None:
                raise ValidationError(field, "is required")
            return default
        if not isinstance(value, str):
            raise ValidationError(field, f"must be a string, got {json_type(value)}")
        if non_empty and not value.strip():
            raise ValidationError(field, "must not be empty")
        if len(value) > max_chars:
            raise ValidationError(field, f"must be at most {max_chars} characters, got {len(value)}")
        if _has_lone_surrogate(value):
            raise ValidationError(field, _LONE_SURROGATE_RULE)
        return value

    @overload
    def integer(
        self, name: str, *, default: int, low: int | None = ..., high: int | None = ..., field_prefix: str = ...
    ) -> int: ...
    @overload
    def integer(
        self, name: str, *, default: None, low: int | None = ..., high: int | None = ..., field_prefix: str = ...
    ) -> int | None: ...
    def integer(
        self, name: str, *, default: int | None, low: int | None = None, high: int | None = None, field_prefix: str = ""
    ) -> int | None:
        field = field_prefix + name
        value = self.optional(name)
        if value is None:
            return default
        # bool is an int subclass in Python; JSON true must not pass as 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError(field, f"must be an integer, got {json_type(value)} {preview(value)}")
        if low is not None and high is not None and not low <= value <= high:
            raise ValidationError(field, f"must be between {low} and {high}, got {preview(value)}")
        return value

    @overload
    def number(self, name: str, *, default: float, low: float, high: float, field_prefix: str = ...) -> float: ...
    @overload
    def number(self, name: str, *, default: None, low: float, high: float, field_prefix: str = ...) -> float | None: ...
    def number(
        self, name: str, *, default: float | None, low: float, high: float, field_prefix: str = ""
    ) -> float | None:
        field = field_prefix + name
        value = self.optional(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValidationError(field, f"must be a number, got {json_type(value)} {preview(value)}")
        try:
            number = float(value)
        except OverflowError:  # a JSON integer too large for a float
            number = math.inf
        if not math.isfinite(number) or not low <= number <= high:
            raise ValidationError(field, f"must be between {low:g} and {high:g}, got {preview(value)}")
        return number

    @overload
    def boolean(self, name: str, *, default: bool) -> bool: ...
    @overload
    def boolean(self, name: str, *, default: None) -> bool | None: ...
    def boolean(self, name: str, *, default: bool | None) -> bool | None:
        value = self.optional(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ValidationError(name, f"must be a boolean (true or false), got {json_type(value)} {preview(value)}")
        return value

    @overload
    def aliased_number(self, canonical: str, *, default: float, low: float, high: float) -> float: ...
    @overload
    def aliased_number(self, canonical: str, *, default: None, low: float, high: float) -> float | None: ...
    def aliased_number(self, canonical: str, *, default: float | None, low: float, high: float) -> float | None:
        return self._aliased(canonical, lambda name: self.number(name, default=None, low=low, high=high), default)

    def aliased_integer(self, canonical: str, *, default: int, low: int, high: int) -> int:
        return self._aliased(canonical, lambda name: self.integer(name, default=None, low=low, high=high), default)

    def aliased_boolean(self, canonical: str, *, default: bool) -> bool:
        return self._aliased(canonical, lambda name: self.boolean(name, default=None), default)

    def aliased_url(self, canonical: str) -> str | None:
        """An image URL or data URI that hosts name differently (a mask: mask_image, mask, mask_url)."""

        def read(name: str) -> str | None:
            if self.optional(name) is None:
                return None
            return self.string(name, non_empty=True, max_chars=MAX_URL_CHARS)

        return self._aliased(canonical, read, None)

    def _aliased(self, canonical: str, read: Callable[[str], _T | None], default: _T) -> _T:
        """Read a field that several hosts name differently; the names given must agree."""
        given: list[tuple[str, _T]] = []
        for name in _ALIASES[canonical]:
            value = read(name)
            if value is not None:
                given.append((name, value))
        for name, value in given[1:]:
            if value != given[0][1]:
                first_name, first_value = given[0]
                rule = f"contradicts {first_name} ({preview(first_value)} vs {preview(value)}): give one of them"
                raise ValidationError(name, rule)
        return given[0][1] if given else default


# JSON may carry "\ud800" escapes, which decode to unpaired surrogates: not text any UTF-8 consumer accepts. Left
# in, they failed far from the field, as internal errors: the pipeline's tokenizer raises TypeError on the prompt,
# and the LoRA cache's sha256 of the URL (or the file system, for a path) raises UnicodeEncodeError.
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
_LONE_SURROGATE_RULE = "must be valid Unicode text (it contains an unpaired surrogate such as \\ud800)"


def _has_lone_surrogate(text: str) -> bool:
    return not text.isascii() and _LONE_SURROGATE.search(text) is not None
