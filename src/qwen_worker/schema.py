"""The request a job carries, parsed once into a typed ``Request``.

This is the only module that knows the input field names. Rules (all inside the job's ``input`` object):

    field                  type     default        rule
    prompt                 string   (required)     non-empty after trimming
    negative_prompt        string   ""             "" still runs true CFG, with " " as the model card recommends
    size                   string   "1024*1024"    "W*H"; each side 256..2048 and a multiple of 16
                                    (edit: follows the input image at ~1 MP)
    seed                   integer  -1             -1 draws a random seed; otherwise 0 <= seed < 2**32
    num_inference_steps    integer  DEFAULT_STEPS  1..100
    true_cfg_scale         number   DEFAULT_TRUE_CFG_SCALE   1..20 (1 switches true CFG off)
    enable_safety_checker  boolean  true
    image                  string   -              an http(s) URL or a data:image/...;base64, URI; its presence makes the job an edit
    output_format          string   png (t2i), jpeg (edit)   "png" or "jpeg"

Types are strict: an integer must be a JSON integer (not "12", 1.0 or true) and a boolean a JSON boolean.
A field the worker does not know fails the request, naming it, so that a typo never passes silently.
"""

from __future__ import annotations

import difflib
import enum
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ValidationError

MIN_SIDE = 256
MAX_SIDE = 2048
SIDE_MULTIPLE = 16
SEED_LIMIT = 2**32
MAX_STEPS = 100
MIN_CFG, MAX_CFG = 1.0, 20.0
# Generous bounds that stop absurd payloads early; the text encoder sees far fewer tokens than this anyway.
MAX_PROMPT_CHARS = 10_000

_SIZE_PATTERN = re.compile(r"^\s*(\d{1,6})\s*\*\s*(\d{1,6})\s*$")


class Task(str, enum.Enum):
    TEXT_TO_IMAGE = "text-to-image"
    EDIT = "edit"


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


@dataclass(frozen=True)
class GenerationDefaults:
    """Operator-set defaults that requests may override (DEFAULT_STEPS, DEFAULT_TRUE_CFG_SCALE)."""

    num_inference_steps: int = 50
    true_cfg_scale: float = 4.0


@dataclass(frozen=True)
class Request:
    """A validated job. ``width``/``height`` are None for an edit whose size follows its input image."""

    task: Task
    prompt: str
    negative_prompt: str
    width: int | None
    height: int | None
    seed: int
    num_inference_steps: int
    true_cfg_scale: float
    enable_safety_checker: bool
    output_format: OutputFormat
    image_urls: tuple[str, ...] = ()


_FIELDS = (
    "prompt",
    "negative_prompt",
    "size",
    "seed",
    "num_inference_steps",
    "true_cfg_scale",
    "enable_safety_checker",
    "image",
    "output_format",
)


def parse_request(raw: Any, defaults: GenerationDefaults = GenerationDefaults()) -> Request:
    """Validate a job's ``input`` and return the typed request, or raise ``ValidationError`` naming the field."""
    if not isinstance(raw, Mapping):
        raise ValidationError("input", f"must be a JSON object, got {_json_type(raw)}")
    _reject_unknown_fields(raw)
    fields = _Fields(raw)

    task = Task.EDIT if "image" in raw else Task.TEXT_TO_IMAGE
    image_urls: tuple[str, ...] = ()
    if task is Task.EDIT:
        image_urls = (fields.string("image", required=True, max_chars=None, non_empty=True),)

    size = fields.optional("size")
    if size is None:
        width, height = (None, None) if task is Task.EDIT else (1024, 1024)
    else:
        width, height = parse_size(size)

    default_format = OutputFormat.JPEG if task is Task.EDIT else OutputFormat.PNG
    return Request(
        task=task,
        prompt=fields.string("prompt", required=True, non_empty=True),
        negative_prompt=fields.string("negative_prompt", default=""),
        width=width,
        height=height,
        seed=_seed(fields.integer("seed", default=-1)),
        num_inference_steps=fields.integer(
            "num_inference_steps", default=defaults.num_inference_steps, low=1, high=MAX_STEPS
        ),
        true_cfg_scale=fields.number("true_cfg_scale", default=defaults.true_cfg_scale, low=MIN_CFG, high=MAX_CFG),
        enable_safety_checker=fields.boolean("enable_safety_checker", default=True),
        output_format=_output_format(fields.optional("output_format"), default_format),
        image_urls=image_urls,
    )


def parse_size(value: Any) -> tuple[int, int]:
    """Parse Runpod's "W*H" size string; Runpod's own wording for a malformed value is kept verbatim."""
    if not isinstance(value, str):
        raise ValidationError("size", f'format must be width*height (a string such as "1024*1024"), got {_json_type(value)}')
    match = _SIZE_PATTERN.match(value)
    if not match:
        raise ValidationError("size", f'format must be width*height (e.g. "1024*1024"), got {_preview(value)}')
    width, height = int(match.group(1)), int(match.group(2))
    check_dimensions(width, height, field="size")
    return width, height


def check_dimensions(width: int, height: int, *, field: str) -> None:
    for side_name, side in (("width", width), ("height", height)):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise ValidationError(field, f"{side_name} must be between {MIN_SIDE} and {MAX_SIDE} pixels, got {side}")
        if side % SIDE_MULTIPLE:
            raise ValidationError(field, f"{side_name} must be a multiple of {SIDE_MULTIPLE}, got {side}")


def _seed(value: int) -> int:
    if value == -1:
        return secrets.randbelow(SEED_LIMIT)
    if not 0 <= value < SEED_LIMIT:
        raise ValidationError("seed", f"must be -1 (random) or an integer from 0 to {SEED_LIMIT - 1}, got {value}")
    return value


def _output_format(value: Any, default: OutputFormat) -> OutputFormat:
    if value is None:
        return default
    allowed = ", ".join(f'"{f.value}"' for f in OutputFormat)
    if not isinstance(value, str):
        raise ValidationError("output_format", f"must be one of {allowed}, got {_json_type(value)}")
    try:
        return OutputFormat(value.strip().lower())
    except ValueError:
        raise ValidationError("output_format", f"must be one of {allowed}, got {_preview(value)}") from None


def _reject_unknown_fields(raw: Mapping[Any, Any]) -> None:
    unknown = [key for key in raw if key not in _FIELDS]
    if not unknown:
        return
    described = []
    for key in unknown[:5]:
        name = _preview(key if isinstance(key, str) else repr(key))
        close = difflib.get_close_matches(str(key), _FIELDS, n=1)
        described.append(f"{name} (did you mean '{close[0]}'?)" if close else name)
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    raise ValidationError(
        "input", f"has unknown field(s) {', '.join(described)}{more}; accepted fields: {', '.join(_FIELDS)}"
    )


class _Fields:
    """Typed, strict reads of one request's fields; every failure names the field."""

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
        max_chars: int | None = MAX_PROMPT_CHARS,
    ) -> str:
        value = self.optional(name)
        if value is None:
            if required:
                raise ValidationError(name, "is required")
            assert default is not None
            return default
        if not isinstance(value, str):
            raise ValidationError(name, f"must be a string, got {_json_type(value)}")
        if non_empty and not value.strip():
            raise ValidationError(name, "must not be empty")
        if max_chars is not None and len(value) > max_chars:
            raise ValidationError(name, f"must be at most {max_chars} characters, got {len(value)}")
        return value

    def integer(self, name: str, *, default: int, low: int | None = None, high: int | None = None) -> int:
        value = self.optional(name)
        if value is None:
            return default
        # bool is an int subclass in Python; JSON true must not pass as 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError(name, f"must be an integer, got {_json_type(value)} {_preview(value)}")
        if low is not None and high is not None and not low <= value <= high:
            raise ValidationError(name, f"must be between {low} and {high}, got {value}")
        return value

    def number(self, name: str, *, default: float, low: float, high: float) -> float:
        value = self.optional(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValidationError(name, f"must be a number, got {_json_type(value)} {_preview(value)}")
        number = float(value)
        if not math.isfinite(number) or not low <= number <= high:
            raise ValidationError(name, f"must be between {low:g} and {high:g}, got {_preview(value)}")
        return number

    def boolean(self, name: str, *, default: bool) -> bool:
        value = self.optional(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ValidationError(name, f"must be a boolean (true or false), got {_json_type(value)} {_preview(value)}")
        return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _preview(value: Any, limit: int = 40) -> str:
    """A short, safe rendering of user input for an error message (never echo a whole payload back)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
