"""The worker's exceptions, and the one message each shows the caller.

Every failure a job can meet is a ``WorkerError``; the worker turns it into ``{"error": str(err)}`` so Runpod
marks the job FAILED with a readable sentence. Anything else escaping a job is a bug: it is logged with its
traceback and answered with a generic "internal error" message (never the traceback itself).

    WorkerError                      a job failed; ``str(err)`` is what the caller reads
    ├── ValidationError              the request broke a rule: names the field and the rule
    ├── InputImageError              an input image could not be used ("Invalid image URL: <reason>")
    ├── LoraError                    a requested LoRA could not be fetched or applied
    ├── ContentFlaggedError          the safety checker flagged the input or every generated image
    ├── TaskNotServedError           the endpoint has no pipeline for this task (e.g. no edit model configured)
    │   └── FastModeUnavailableError a fast mode (Lightning) this endpoint does not have; ``fused`` names the one it
    │                                serves only, when its Lightning LoRA is fused
    ├── GenerationError              the pipeline failed while generating
    ├── ResultTooLargeError          an inline result would exceed the cap Runpod accepts
    └── StorageError                 the result could not be stored (bucket down, access denied, …)

    ConfigError                      the worker cannot start: bad or missing environment / model files
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class WorkerError(Exception):
    """A job failed for a reason the caller should read."""


class ValidationError(WorkerError):
    """The request broke a rule.

    Reads as Runpod's own errors do: "Invalid parameter: size format must be width*height".
    """

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule
        super().__init__(f"Invalid parameter: {field} {rule}")


class InputImageError(WorkerError):
    """An input image URL or data URI could not be turned into an image."""

    def __init__(self, reason: str, field: str = "image") -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"Invalid image URL ({field}): {reason}")


class LoraError(WorkerError):
    """A requested LoRA could not be resolved, downloaded or applied. Names the ``loras[i]`` entry."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"Invalid LoRA ({field}): {reason}")


class ContentFlaggedError(WorkerError):
    """The safety checker flagged what the job would have delivered (or its input); nothing was stored.

    ``field`` is what was flagged: ``prompt`` for generated images, the input's field (``image``, ``images[1]``)
    for a flagged input."""

    def __init__(self, message: str, *, field: str = "prompt") -> None:
        self.field = field
        super().__init__(message)


class TaskNotServedError(WorkerError):
    """The request asks for a task this endpoint was not configured to serve."""


class FastModeUnavailableError(TaskNotServedError):
    """The request asks for a fast mode (or, on a fused endpoint, for none) that this endpoint cannot run.

    ``fused`` is the only fast mode served ("regular" or "high") when the endpoint's Lightning LoRA is fused into its
    model, else None. The OpenAI route uses it to fall back to what the endpoint has (its ``quality`` field)."""

    def __init__(self, message: str, *, fused: str | None = None) -> None:
        self.fused = fused
        super().__init__(message)


class GenerationError(WorkerError):
    """The diffusion pipeline failed while generating.

    ``fatal`` marks faults that leave the GPU unusable (a sticky CUDA error): the job fails with
    ``refresh_worker`` so Runpod replaces the container instead of feeding it more jobs.
    """

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        self.fatal = fatal
        super().__init__(message)


class ResultTooLargeError(WorkerError):
    """An inline (data URI) result would be larger than Runpod accepts as job output."""


class StorageError(WorkerError):
    """The generated image could not be stored. Never carries credentials."""


class ConfigError(Exception):
    """The worker cannot start: the environment or the model files are wrong. Raised at start-up only."""


# Rendering user input inside an error message: short, and never raising.


def json_type(value: Any) -> str:
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


def preview(value: Any, limit: int = 40) -> str:
    """A short, safe rendering of user input for an error message (never echo a whole payload back)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"an integer of {value.bit_length()} bits"  # repr() of a huge int is slow, and refused past 4300 digits
    try:
        text = repr(value)
    except ValueError:
        # Such an integer inside an array or object ([10**5000]) made repr() raise, and the request failed as an
        # internal error instead of naming the field.
        return json_type(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
