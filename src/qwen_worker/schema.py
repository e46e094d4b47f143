"""The request a job carries, validated once into a typed ``Request``.

This is the only module that reads input fields, including the other hosts' dialects (fal, Replicate, DashScope,
Oxen/eachlabs). The fields themselves are declared once, in ``contract.RequestInput`` (pydantic): types, ranges,
lengths, forbidden extras. That declaration is the validator ``parse_request`` runs first and the source of the
published JSON Schema (``schema/request.schema.json``). Its errors are translated into the worker's
``ValidationError`` in one place (``_translated``), naming the field path (``loras[1].scale``), the rule, and a
suggestion for a misspelt field. The rules that are not per field then run as named steps: aliases agree, one size
form, the mode rule and a mode's own fields (``modes.py``), fast mode's fixed steps, strength -> steps, the choices
(case-insensitive) and the serving model's rules (``profiles.py``; sizes in ``sizes.py``). The README's parameter
table documents every field, alias, default and rule (tests/test_docs.py and tests/test_contract.py hold them in step).

Types are strict: an integer must be a JSON integer (not "12", 1.0 or true), a number a JSON number (an integer is
one), a boolean a JSON boolean; strings must be valid Unicode (an unpaired surrogate escape such as "\\ud800" is
refused). JSON null means absent. A field the worker does not know fails the request, naming it, so that a typo never
passes silently.
"""

from __future__ import annotations

import difflib
import enum
import functools
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pydantic

from .contract import EXPAND_SIDES as EXPAND_SIDES
from .contract import LAYER_RESOLUTIONS as LAYER_RESOLUTIONS
from .contract import MAX_CFG as MAX_CFG
from .contract import MAX_CONTROL_SCALE as MAX_CONTROL_SCALE
from .contract import MAX_EXPAND as MAX_EXPAND
from .contract import MAX_LAYERS as MAX_LAYERS
from .contract import MAX_LORA_SCALE as MAX_LORA_SCALE
from .contract import MAX_LORAS as MAX_LORAS
from .contract import MAX_NUM_IMAGES as MAX_NUM_IMAGES
from .contract import MAX_PROMPT_CHARS as MAX_PROMPT_CHARS
from .contract import MAX_STEPS as MAX_STEPS
from .contract import MAX_URL_CHARS as MAX_URL_CHARS
from .contract import MIN_CFG as MIN_CFG
from .contract import MIN_CONTROL_SCALE as MIN_CONTROL_SCALE
from .contract import MIN_LAYERS as MIN_LAYERS
from .contract import MIN_LORA_SCALE as MIN_LORA_SCALE
from .contract import SEED_LIMIT as SEED_LIMIT
from .contract import ImageSizeObject, RequestInput, request_schema

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

# The names several hosts give one field (the first is the worker's own); each is declared in RequestInput.
_ALIASES: dict[str, tuple[str, ...]] = {
    "true_cfg_scale": ("true_cfg_scale", "guidance", "guidance_scale"),
    "num_images": ("num_images", "n"),
    "enhance_prompt": ("enhance_prompt", "prompt_extend"),
    "mask_image": ("mask_image", "mask", "mask_url"),
}
_FIELDS = frozenset(RequestInput.model_fields)

Rules = GenerationDefaults | Callable[[Mode], GenerationDefaults]


def parse_request(raw: Any, defaults: Rules | None = None) -> Request:
    """Validate a job's ``input`` and return the typed request, or raise ``ValidationError`` naming the field.

    ``defaults`` may be a function of the mode: the model that serves a request (and so its rules) depends on it.
    None: Qwen-Image's card (``profiles.DEFAULT_PROFILE``)."""
    if defaults is None:
        defaults = _CARD_RULES
    if not isinstance(raw, Mapping):
        raise ValidationError("input", f"must be a JSON object, got {json_type(raw)}")
    given = _validated(raw, defaults)
    _aliases_agree(given)
    notes: list[str] = []

    # The mode first (it decides which model serves the request, and so its rules), from the images' presence and
    # count; the image count is then checked against that model's rules.
    spec = _mode(given)
    mode = spec.mode
    _refuse_fields_of_other_modes(given, spec)
    rules = _rules(defaults, mode)
    image_urls = _image_urls(given, rules.max_images)
    if spec.refuses_size:
        _refuse_size_forms(given, spec)
    layers, resolution = _layers(given, spec)
    width, height = _size(given, rules, default=(1024, 1024) if spec.size_rule is SizeRule.DRAWN else None)
    match_input_size: bool = given.get("match_input_size", False)
    if match_input_size and width is not None:
        raise ValidationError("match_input_size", "cannot be combined with an explicit size")

    fast_mode = _fast_mode(given)
    steps: int | None = given.get("num_inference_steps")
    cfg: float | None = _aliased(given, "true_cfg_scale")
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
    strength = _strength(given, spec)
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

    background = _background(given.get("background"), rules)
    # The mode's default format (``modes.py``); a transparent result needs a format with alpha: PNG unless WebP is
    # asked for.
    default_format = OutputFormat.PNG if background is Background.TRANSPARENT else spec.default_format
    output_format = _output_format(given.get("output_format"), default_format)
    if spec.layered and output_format is OutputFormat.JPEG:
        raise ValidationError("output_format", "jpeg has no alpha channel, which layers need: use png or webp")
    if spec.layered and background is Background.OPAQUE:
        raise ValidationError("background", "opaque cannot be used with layers: each layer is a transparent RGBA image")
    if background is Background.TRANSPARENT and output_format is OutputFormat.JPEG:
        raise ValidationError("output_format", "jpeg has no alpha channel: use png or webp with background transparent")
    output_quality: int | None = given.get("output_quality")
    if output_quality is not None and output_format is OutputFormat.PNG:
        raise ValidationError("output_quality", "applies to jpeg and webp only (png is lossless)")

    if given.get("watermark", False):
        raise ValidationError("watermark", "true is not supported: this worker never watermarks images")

    negative_prompt: str = given.get("negative_prompt", "")
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

    num_images: int = _aliased(given, "num_images") or 1
    if spec.layered and num_images != 1:
        raise ValidationError(
            _given_name(given, "num_images") or "num_images",
            "must be 1 with layers: a job decomposes its image once (the layers count sets how many images return)",
        )

    return Request(
        mode=mode,
        prompt=_prompt(given, spec),
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        seed=_seed(given.get("seed", -1)),
        num_inference_steps=steps,
        true_cfg_scale=true_cfg_scale,
        enable_safety_checker=_safety_checker(given),
        output_format=output_format,
        image_urls=image_urls,
        background=background,
        num_images=num_images,
        output_quality=output_quality,
        match_input_size=match_input_size,
        loras=_loras(given),
        fast_mode=fast_mode,
        enhance_prompt=_aliased(given, "enhance_prompt") or False,
        sync_mode=given.get("sync_mode", False),
        dry_run=given.get("dry_run", False),
        strength=strength,
        # A field the mode does not own was refused above: each is read only where it was given.
        mask_url=_aliased(given, "mask_image"),
        expand=_expand(given, raw) if "expand" in given else None,
        preserve_unmasked=given.get("preserve_unmasked", True),
        layers=layers,
        resolution=resolution,
        control_url=given.get("control_image"),
        controlnet_conditioning_scale=given.get("controlnet_conditioning_scale", 1.0),
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


# ------------------------------------------------------------------------------------------------ the declaration


def _validated(raw: Mapping[Any, Any], defaults: Rules) -> dict[str, Any]:
    """The fields given (JSON null is absent), validated by the declaration ``contract.RequestInput``."""
    try:
        model = RequestInput.model_validate(_without_nulls(raw))
    except pydantic.ValidationError as err:
        raise _translated(err.errors(include_url=False, include_context=True), raw, defaults) from None
    return {name: getattr(model, name) for name in model.model_fields_set}


def _without_nulls(raw: Mapping[Any, Any]) -> dict[Any, Any]:
    """The request with every JSON null dropped (in the request and in the objects it holds): null means absent."""

    def inner(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {key: item for key, item in value.items() if item is not None}
        if isinstance(value, list) and any(isinstance(item, Mapping) for item in value):
            return [inner(item) for item in value]
        return value

    # An unknown field stays, null or not, to be refused by name.
    return {key: inner(value) for key, value in raw.items() if value is not None or key not in _FIELDS}


_LORA_ENTRY_RULE = 'must be an object {"path": string, "scale": number}'
_EXPAND_RULE = f'must be an object {{"left", "right", "top", "bottom"}} of pixels, each 0 to {MAX_EXPAND}'
_IMAGE_SIZE_OBJECT_RULE = "as an object must be exactly {\"width\": int, \"height\": int}"
_RANGE_ERRORS = frozenset({"greater_than_equal", "less_than_equal", "greater_than", "less_than"})


def _translated(errors: Sequence[Any], raw: Mapping[Any, Any], defaults: Rules) -> ValidationError:
    """pydantic's errors, as the worker's one ``ValidationError``: the unknown fields if any (with a suggestion for
    a misspelt one), else the first error in the declaration's field order, naming its path and the rule."""
    unknown = [key for key in raw if key not in _FIELDS]  # pydantic's extras, and keys it cannot read (not str)
    if unknown:
        return _unknown_fields(unknown)
    error = errors[0]
    loc: tuple[str | int, ...] = error["loc"]
    kind: str = error["type"]
    value = error["input"]
    top = str(loc[0])
    if top == "image_size":
        return _image_size_error([e for e in errors if e["loc"][0] == "image_size"], raw["image_size"])
    field = _path(loc)
    if top == "loras" and len(loc) == 1:
        return ValidationError("loras", f"must be an array of at most {MAX_LORAS} {{\"path\", \"scale\"}} objects")
    if top == "loras" and (len(loc) == 2 or kind in ("extra_forbidden", "missing")):
        return ValidationError(_path(loc[:2]), _LORA_ENTRY_RULE)
    if top == "expand" and (len(loc) == 1 or kind == "extra_forbidden"):
        return ValidationError("expand", _EXPAND_RULE)
    if top == "images":
        # The count before any one image, against the serving model's limit, as ``_image_urls`` checks it.
        images = raw["images"]
        count = len(images) if isinstance(images, list) else 1
        max_images = _rules(defaults, image_mode(max(count, 1)).mode).max_images
        if len(loc) == 1 or count > max_images:
            return _images_count_error(max_images)
    if top == "images" and kind in ("string_type", "string_too_short", "blank"):
        return ValidationError(field, f"must be a non-empty string, got {json_type(value)}")
    if top == "images" and kind == "string_too_long":
        return ValidationError(field, f"must be at most {MAX_URL_CHARS} characters")
    if top in _READ_AFTER and kind in ("string_type", "string_pattern_mismatch"):
        # A field whose step reads the string (a choice, the size form) words the rule; it refuses this value.
        return _refusal(field, _READ_AFTER[top], value, _rules(defaults, image_mode(0).mode))
    overflow = kind == "float_type" and isinstance(value, int) and not isinstance(value, bool)  # too large a float
    if kind in _RANGE_ERRORS or overflow:
        return _range_error(loc, kind, value)
    rules: dict[str, Callable[[], str]] = {
        "int_type": lambda: f"must be an integer, got {json_type(value)} {preview(value)}",
        "float_type": lambda: f"must be a number, got {json_type(value)} {preview(value)}",
        "bool_type": lambda: f"must be a boolean (true or false), got {json_type(value)} {preview(value)}",
        "string_type": lambda: f"must be a string, got {json_type(value)}",
        "string_too_long": lambda: f"must be at most {error['ctx']['max_length']} characters, got {len(value)}",
        "string_too_short": lambda: "must not be empty",
        "blank": lambda: "must not be empty",
        "string_unicode": lambda: _LONE_SURROGATE_RULE,
    }
    rule = rules.get(kind)
    return ValidationError(field, rule() if rule is not None else f"is invalid: {error['msg']}")


def _path(loc: Sequence[str | int]) -> str:
    """pydantic's location as the README names a field: ``loras[1].scale``, ``expand.left``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path


def _range_error(loc: Sequence[str | int], kind: str, value: Any) -> ValidationError:
    field = _path(loc)
    if field == "seed":
        return ValidationError(
            "seed", f"must be -1 (random) or an integer from 0 to {SEED_LIMIT - 1}, got {preview(value)}"
        )
    if field == "strength" and kind == "greater_than" and value == 0:
        return ValidationError("strength", "must be greater than 0 (0 would leave the input unchanged), got 0")
    declared = _declared(loc)
    low = declared.get("minimum", declared.get("exclusiveMinimum"))
    high = declared["maximum"]
    if declared.get("type") == "integer":
        return ValidationError(field, f"must be between {low} and {high}, got {preview(value)}")
    return ValidationError(field, f"must be between {low:g} and {high:g}, got {preview(value)}")


@functools.cache
def _published_schema() -> dict[str, Any]:
    """The published request schema, read for the bounds a range error names (both ends, whichever was crossed);
    built on the first such error, not at import."""
    return request_schema()


def _declared(loc: Sequence[str | int]) -> dict[str, Any]:
    """The published schema of the value at ``loc`` (its non-null branch)."""
    root = _published_schema()
    node: dict[str, Any] = root
    for part in loc:
        node = node["items"] if isinstance(part, int) else node["properties"][part]
        node = next((branch for branch in node.get("anyOf", [node]) if branch.get("type") != "null"), node)
        if "$ref" in node:
            node = root["$defs"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _image_size_error(errors: Sequence[Any], value: Any) -> ValidationError:
    if isinstance(value, Mapping):
        if set(value) != {"width", "height"}:
            return ValidationError("image_size", _IMAGE_SIZE_OBJECT_RULE)
        for error in errors:
            if error["loc"][1] == ImageSizeObject.__name__ and len(error["loc"]) == 3:
                side, name = error["input"], f"image_size.{error['loc'][2]}"
                if error["type"] == "missing":  # it was null
                    return ValidationError(name, "is required")
                return ValidationError(name, f"must be an integer, got {json_type(side)} {preview(side)}")
    names = ", ".join([*FAL_PRESETS, *REPLICATE_SIZE_MODES])
    return ValidationError("image_size", f"must be one of {names}, or {{\"width\", \"height\"}}; got {preview(value)}")


def _unknown_fields(unknown: Sequence[Any]) -> ValidationError:
    described = []
    for key in unknown[:5]:
        name = preview(key if isinstance(key, str) else repr(key))
        close = difflib.get_close_matches(str(key), sorted(_FIELDS), n=1)
        described.append(f"{name} (did you mean '{close[0]}'?)" if close else name)
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    return ValidationError(
        "input", f"has unknown field(s) {', '.join(described)}{more}; see the README's parameter table"
    )


def _rules(defaults: Rules, mode: Mode) -> GenerationDefaults:
    return defaults(mode) if callable(defaults) else defaults


# ------------------------------------------------------------------------------ the steps after the declaration


def _aliases_agree(given: Mapping[str, Any]) -> None:
    """Aliases of one field (``_ALIASES``) may be given together only with the same value."""
    for names in _ALIASES.values():
        values = [(name, given[name]) for name in names if name in given]
        for name, value in values[1:]:
            first_name, first_value = values[0]
            if value != first_value:
                rule = f"contradicts {first_name} ({preview(first_value)} vs {preview(value)}): give one of them"
                raise ValidationError(name, rule)


def _aliased(given: Mapping[str, Any], canonical: str) -> Any:
    """A field's value under whichever of its names was given (they agree), or None."""
    name = _given_name(given, canonical)
    return given[name] if name is not None else None


def _given_name(given: Mapping[str, Any], canonical: str) -> str | None:
    """The name under which a field (or one of its aliases) was given, or None."""
    for name in _ALIASES.get(canonical, (canonical,)):
        if name in given:
            return name
    return None


def _prompt(given: Mapping[str, Any], spec: ModeSpec) -> str:
    # Layer decomposition may go without a prompt: the pipeline then captions the input image itself.
    prompt: str | None = given.get("prompt")
    if spec.prompt_optional:
        return prompt or ""
    if prompt is None:
        raise ValidationError("prompt", "is required")
    if not prompt.strip():
        raise ValidationError("prompt", "must not be empty")
    return prompt


def _size(
    given: Mapping[str, Any], rules: GenerationDefaults, default: tuple[int, int] | None
) -> tuple[int | None, int | None]:
    """One size form at most: size | width+height | aspect_ratio | image_size.

    Replicate's image_size modes may take an aspect_ratio beside them."""
    size, width, height = given.get("size"), given.get("width"), given.get("height")
    aspect, image_size = given.get("aspect_ratio"), given.get("image_size")
    forms = _size_forms(given)
    if len(forms) > 1:
        raise ValidationError(
            forms[1].split("/")[0], f"cannot be combined with {forms[0]}: give the size in one form only"
        )
    if size is not None:
        return parse_size(size, rules.sizes)
    if width is not None or height is not None:
        if width is None or height is None:
            raise ValidationError("width" if width is None else "height", "is required when the other side is given")
        check_dimensions(width, height, field="width/height", rules=rules.sizes)
        return width, height
    if image_size is not None:
        return _image_size(image_size, aspect, rules)
    if aspect is not None:
        return _aspect_ratio(aspect, rules)
    return default if default is not None else (None, None)


def _size_forms(given: Mapping[str, Any]) -> list[str]:
    """The size forms a request gives, in the order the README lists them."""
    image_size = given.get("image_size")
    replicate_mode = isinstance(image_size, str) and image_size in REPLICATE_SIZE_MODES
    return [
        name
        for name, present in (
            ("size", "size" in given),
            ("width/height", "width" in given or "height" in given),
            ("aspect_ratio", "aspect_ratio" in given and not replicate_mode),
            ("image_size", image_size is not None),
        )
        if present
    ]


def _mode(given: Mapping[str, Any]) -> ModeSpec:
    """The mode rule (``modes.MODE_RULE``: the first selector given wins, else the input images decide), and the
    mode's input-image count checked, naming what would serve the request."""
    image_count = 1 if "image" in given else len(given.get("images", ()))
    selected = next(((name, row) for name, row in MODE_RULE if _given_name(given, name) is not None), None)
    if selected is None:
        return image_mode(image_count)
    name, spec = selected
    given_as = _given_name(given, name) or name
    if spec.max_images == 0 and image_count:
        raise ValidationError(
            "image" if "image" in given else "images",
            f"cannot be combined with {given_as}: {spec.mode.value} draws from text and takes no input image",
        )
    if image_count < spec.min_images:
        raise ValidationError(given_as, f"needs the input image ('image') for {spec.mode.value}")
    if spec.max_images == 1 and image_count > 1:
        raise ValidationError(
            "images",
            f"with several images is for Edit-Plus edits; {spec.mode.value} takes one input image: send it as 'image'",
        )
    return spec


def _refuse_fields_of_other_modes(given: Mapping[str, Any], spec: ModeSpec) -> None:
    """One rule for every mode: a mode's own field given to another mode is refused, naming the field and the modes
    it belongs to, so that no field is ever silently dropped. Another mode's selector names the one that won."""
    selector = _given_name(given, spec.selector) if spec.selector is not None else None
    for name, owners in MODE_FIELDS.items():
        given_as = _given_name(given, name)
        if given_as is None or spec in owners or given[given_as] is NEUTRAL_VALUES.get(name):
            continue
        selects = next((row for row in owners if row.selector == name), None)
        if selects is not None and selector is not None:
            raise ValidationError(
                given_as, f"cannot be combined with {selector}: {selects.mode.value} and {spec.mode.value} are "
                "separate jobs; send one of them"
            )
        # The modes that images alone select (edits) first: the general case before the specific ones.
        described = [row.description for row in sorted(owners, key=lambda row: row.selector is not None)]
        listed = described[0] if len(described) == 1 else ", ".join(described[:-1]) + " and " + described[-1]
        raise ValidationError(given_as, f"applies only to {listed}")


def _refuse_size_forms(given: Mapping[str, Any], spec: ModeSpec) -> None:
    forms = _size_forms(given)
    if not forms or spec.selector is None:
        return
    selector = _given_name(given, spec.selector) or spec.selector
    raise ValidationError(
        forms[0].split("/")[0], f"cannot be combined with {selector}: {spec.mode.value} returns {spec.returns}"
    )


def _strength(given: Mapping[str, Any], spec: ModeSpec) -> float | None:
    """Image-to-image's strength (it selects the mode); inpainting and outpainting default to 1 (full repaint)."""
    if "strength" not in spec.owns:
        return None  # the field was refused if given
    strength: float = given.get("strength", 1.0)
    return strength


def _layers(given: Mapping[str, Any], spec: ModeSpec) -> tuple[int | None, int | None]:
    """Layer decomposition's layer count (it selects the mode) and resolution bucket."""
    if "resolution" not in spec.owns:
        return None, None  # the fields were refused if given
    resolution: int = given.get("resolution", LAYER_RESOLUTIONS[0])
    if resolution not in LAYER_RESOLUTIONS:
        raise ValidationError(
            "resolution", f"must be {' or '.join(map(str, LAYER_RESOLUTIONS))}, got {preview(resolution)}"
        )
    return given.get("layers"), resolution


def _expand(given: Mapping[str, Any], raw: Mapping[Any, Any]) -> Expand:
    if not raw["expand"]:
        raise ValidationError("expand", _EXPAND_RULE)
    sides = given["expand"]
    amounts = {side: getattr(sides, side) for side in EXPAND_SIDES}
    if not any(amounts.values()):
        raise ValidationError("expand", "must add at least one pixel on one side")
    return Expand(**amounts)


def _aspect_ratio(value: Any, rules: GenerationDefaults) -> tuple[int, int]:
    presets = rules.aspect_ratios
    if not isinstance(value, str) or value.strip() not in presets:
        raise ValidationError("aspect_ratio", f"must be one of {', '.join(presets)}, got {preview(value)}")
    return presets[value.strip()]


def _image_size(value: str | ImageSizeObject, aspect: Any, rules: GenerationDefaults) -> tuple[int, int]:
    if isinstance(value, ImageSizeObject):
        check_dimensions(value.width, value.height, field="image_size", rules=rules.sizes)
        return value.width, value.height
    if value in FAL_PRESETS:
        return FAL_PRESETS[value]
    if value in REPLICATE_SIZE_MODES:
        name = aspect if aspect is not None else "1:1"
        width, height = _aspect_ratio(name, rules)
        if value == "optimize_for_speed":
            across, down = (int(part) for part in name.strip().split(":"))
            width, height = about_one_megapixel(across / down, multiple=rules.sizes.multiple)
        return width, height
    raise _image_size_error((), value)


def _image_urls(given: Mapping[str, Any], max_images: int) -> tuple[str, ...]:
    if "image" in given and "images" in given:
        raise ValidationError(
            "images", "cannot be combined with image: send one image as 'image' or several as 'images'"
        )
    if "image" in given:
        return (given["image"],)
    images: list[str] = given.get("images", [])
    if len(images) > max_images:
        raise _images_count_error(max_images)
    return tuple(images)


def _images_count_error(max_images: int) -> ValidationError:
    return ValidationError("images", f"must be an array of 1 to {max_images} image URLs, data URIs or base64 strings")


def _safety_checker(given: Mapping[str, Any]) -> bool:
    enable, disable = given.get("enable_safety_checker"), given.get("disable_safety_checker")
    if enable is not None and disable is not None and enable == disable:
        raise ValidationError(
            "disable_safety_checker", f"contradicts enable_safety_checker ({str(enable).lower()}): give one of them"
        )
    if enable is not None:
        return bool(enable)
    return not disable if disable is not None else True


def _fast_mode(given: Mapping[str, Any]) -> FastMode:
    go_fast, acceleration = given.get("go_fast"), given.get("acceleration")
    mode = FastMode.NONE if acceleration is None else _enum_choice("acceleration", acceleration, FastMode)
    if go_fast is not None:
        if acceleration is not None and go_fast != (mode is not FastMode.NONE):
            raise ValidationError("go_fast", f"contradicts acceleration {mode.value!r}: give one of them")
        if go_fast and mode is FastMode.NONE:
            mode = FastMode.REGULAR
    return mode


def _loras(given: Mapping[str, Any]) -> tuple[LoraRequest, ...]:
    if "loras" in given and "lora_weights" in given:
        raise ValidationError("lora_weights", "cannot be combined with loras: put every LoRA in 'loras'")
    if "lora_weights" in given:
        return (LoraRequest(given["lora_weights"].strip(), given.get("lora_scale", 1.0)),)
    if "lora_scale" in given:
        raise ValidationError("lora_scale", "needs lora_weights")
    return tuple(LoraRequest(entry.path.strip(), entry.scale) for entry in given.get("loras", ()))


def _seed(value: int) -> int:
    """-1 draws a random seed (the declaration holds the range)."""
    return secrets.randbelow(SEED_LIMIT) if value == -1 else value


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


_Step = Callable[[Any, GenerationDefaults], object]


def _refusal(field: str, step: _Step, value: Any, rules: GenerationDefaults) -> ValidationError:
    """The error a step raises for a value the declaration refused."""
    try:
        step(value, rules)
    except ValidationError as err:
        return err
    return ValidationError(field, f"is invalid, got {preview(value)}")  # the step and the declaration disagree


# The string fields whose steps check the value after the declaration (choices ignore case and spaces; the size
# form is Runpod's): a value of another type gets the step's wording, which lists what is accepted.
_READ_AFTER: dict[str, _Step] = {
    "size": lambda value, rules: parse_size(value, rules.sizes),
    "aspect_ratio": _aspect_ratio,
    "output_format": lambda value, _rules: _output_format(value, OutputFormat.PNG),
    "background": lambda value, _rules: _enum_choice("background", value, Background),
    "acceleration": lambda value, _rules: _enum_choice("acceleration", value, FastMode),
}

_LONE_SURROGATE_RULE = "must be valid Unicode text (it contains an unpaired surrogate such as \\ud800)"
