"""OpenAI's Images API on top of the worker: each OpenAI request becomes the worker's native input and runs through
``Worker.run``, so every native rule and error applies; the answer is OpenAI's response object or error.

    POST /v1/images/generations   JSON body -> text-to-image
    POST /v1/images/edits         multipart (image / image[] / mask files) or JSON (images[].image_url,
                                  mask.image_url) -> edit, Edit-Plus (several images), inpainting (mask)
    GET  /v1/models               the loaded models

The field mapping (the README's "OpenAI Images API" table says the same to users):

    prompt, background, output_format   the native fields of the same name
    n                                   num_images
    size "WxH" | "auto"                 size "W*H" | the native default (1024x1024; edits: ~1 MP at the input's aspect)
    quality low | medium | high | auto  the 4-step Lightning path | the 8-step one | the card's steps | the
                                        endpoint's default; a fast path the endpoint lacks falls back to what it
                                        has, and the response says so (``quality`` and ``notes``)
    output_compression 0-100            output_quality 1-100 (jpeg, webp)
    response_format b64_json | url      sync_mode true (inline) | the bucket's presigned URL (refused without one)
    moderation auto | low               the safety checker on | off for this request (SAFETY_CHECKER=always still
                                        checks, =off never does)
    mask (transparent = edit)           mask_image (white = repaint), converted here; preserve_unmasked keeps the rest
    model                               must name a loaded model serving the route, or be omitted
    user, safety_identifier             accepted and dropped: never logged, never stored

A few native fields pass through as they are (``EXTENSION_FIELDS``: seed, negative_prompt...), as the OpenAI SDKs
send them with ``extra_body``. What the worker cannot do (``stream``, ``partial_images``, ``style``) is refused naming
the field. The translation of the worker's errors into OpenAI's ``{"error": {message, type, param, code}}`` is
``_translated``, the one place for it: a bad request is a 400 naming the OpenAI parameter, never a 500.

This module does no HTTP: ``http_server.py`` parses bodies and multipart into the plain values taken here, and
``handle_job`` serves the same routes as Runpod's ``/openai/v1`` queue jobs (``{"openai_route", "openai_input"}``).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import (
    ContentFlaggedError,
    FastModeUnavailableError,
    GenerationError,
    InputImageError,
    LoraError,
    ResultTooLargeError,
    StorageError,
    TaskNotServedError,
    ValidationError,
    WorkerError,
    json_type,
    preview,
)
from .media import decode_image, read_image_bytes

if TYPE_CHECKING:
    from .app import StartupFailure
    from .worker import Worker

log = logging.getLogger(__name__)

GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"
MODELS = "/v1/models"
ROUTES = (GENERATIONS, EDITS, MODELS)

# quality -> the native acceleration (Lightning fast mode) it runs; "high" and "auto" run none (the card's steps, or
# the endpoint's DEFAULT_STEPS).
_ACCELERATION_BY_QUALITY = {"low": "high", "medium": "regular", "high": None, "auto": None}
_QUALITY_BY_ACCELERATION = {"high": "low", "regular": "medium", None: "high"}

# The kinds of the fields a request may carry. Multipart sends every value as text: ``_coerced`` reads it as its
# kind. "json" values are objects or arrays (as text in multipart).
_OPENAI_FIELDS = {
    "prompt": "str", "model": "str", "n": "int", "size": "str", "quality": "str", "response_format": "str",
    "output_format": "str", "output_compression": "int", "background": "str", "moderation": "str", "user": "str",
    "safety_identifier": "str", "stream": "bool", "partial_images": "int", "style": "str",
}
_EDIT_FIELDS = {"input_fidelity": "str"}  # besides image, images, mask (files or image_url objects)
# Native fields the OpenAI routes pass through unchanged (extra_body in the SDKs); the native schema validates them.
EXTENSION_FIELDS = {
    "seed": "int", "negative_prompt": "str", "num_inference_steps": "int", "true_cfg_scale": "number",
    "enhance_prompt": "bool", "loras": "json", "strength": "number", "preserve_unmasked": "bool",
}
# Refused, naming the field and why (the worker answers once, when the image is done).
_UNSUPPORTED = {
    "stream": "streaming is not supported: this worker answers once the images are done (send stream false or omit it)",
    "partial_images": "needs streaming, which this worker does not do (omit it)",
    "style": "is a dall-e-3 option this worker has no equivalent for (omit it)",
}
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")


class OpenAIError(Exception):
    """An answer in OpenAI's error shape: HTTP ``status`` and ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = dict(headers or {})
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(param: str | None, message: str, code: str | None = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ImageInput:
    """One input image as the edit route received it: a URL or data URI, and the parameter that carried it
    (``image``, ``image[1]``, ``images[0].image_url``, ``mask``), which every error about it names."""

    reference: str
    param: str


@dataclass(frozen=True)
class PreparedRequest:
    """An OpenAI request validated and mapped onto the worker's input; ``execute`` runs it."""

    native: dict[str, Any]
    params: dict[str, str]  # native field -> the OpenAI parameter that set it, for errors
    response_format: str
    quality: str  # as run: low | medium | high
    background: str
    mask: ImageInput | None = None
    notes: tuple[str, ...] = field(default=())


def parse_json_body(data: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or a 400 saying what it is instead."""
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        raise bad_request(None, "The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(None, f"The request body must be a JSON object, got {json_type(body)}.", code="invalid_json")
    return body


def coerce_form_fields(fields: Mapping[str, str]) -> dict[str, Any]:
    """Multipart text values read as the kinds the JSON body carries (n="2" -> 2, stream="false" -> False)."""
    kinds = {**_OPENAI_FIELDS, **_EDIT_FIELDS, **EXTENSION_FIELDS}
    return {name: _coerced(name, value, kinds.get(name, "str")) for name, value in fields.items()}


def _coerced(name: str, text: str, kind: str) -> Any:
    if kind == "str":
        return text
    if kind == "bool":
        if text.strip().lower() in ("true", "false"):
            return text.strip().lower() == "true"
        raise bad_request(name, f"Invalid parameter: {name} must be true or false, got {preview(text)}")
    if kind == "int":
        try:
            return int(text.strip())
        except ValueError:
            raise bad_request(name, f"Invalid parameter: {name} must be an integer, got {preview(text)}") from None
    if kind == "number":
        try:
            return float(text.strip())
        except ValueError:
            raise bad_request(name, f"Invalid parameter: {name} must be a number, got {preview(text)}") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise bad_request(name, f"Invalid parameter: {name} must be JSON text, got {preview(text)}") from None


def json_edit_images(body: Mapping[str, Any]) -> tuple[list[ImageInput], ImageInput | None]:
    """The JSON form of an edit: ``images: [{"image_url": ...}]`` (or one ``image`` object) and ``mask:
    {"image_url": ...}``. Uploaded files (``file_id``) are OpenAI's own storage, which this worker does not have."""
    images, image = body.get("images"), body.get("image")
    if images is not None and image is not None:
        raise bad_request("images", "Invalid parameter: images cannot be combined with image: send one of them")
    if image is not None:
        entries: list[tuple[Any, str]] = [(image, "image")]
    elif isinstance(images, list) and images:
        entries = [(entry, f"images[{index}]") for index, entry in enumerate(images)]
    else:
        raise bad_request(
            "images", 'Invalid parameter: images is required: an array of {"image_url": URL or data URI} objects',
            code="missing_required_parameter",
        )
    found = [_image_url(entry, name) for entry, name in entries]
    mask = body.get("mask")
    return found, (_image_url(mask, "mask") if mask is not None else None)


def _image_url(entry: Any, name: str) -> ImageInput:
    url = entry.get("image_url") if isinstance(entry, Mapping) else None
    if isinstance(entry, Mapping) and entry.get("file_id") is not None:
        raise bad_request(name, f"Invalid parameter: {name}.file_id is not supported (no file storage): send image_url")
    if not isinstance(url, str) or not url.strip():
        raise bad_request(name, f'Invalid parameter: {name} must be an object {{"image_url": URL or data URI}}')
    return ImageInput(url, f"{name}.image_url")


def prepare(
    worker: Worker,
    route: str,
    body: Mapping[str, Any],
    images: Sequence[ImageInput] = (),
    mask: ImageInput | None = None,
) -> PreparedRequest:
    """Validate an OpenAI request and map it onto the worker's input, without doing any work; raises OpenAIError.

    ``body`` holds the fields (typed: JSON, or multipart through ``coerce_form_fields``); ``images`` and ``mask`` the
    edit's inputs. The native rules run here too (``Worker.check``), so a bad request is answered before it queues.
    """
    allowed = {**_OPENAI_FIELDS, **EXTENSION_FIELDS, **(_EDIT_FIELDS if route == EDITS else {})}
    for name in body:
        if name not in allowed:
            raise bad_request(
                name, f"Unknown parameter: {preview(name)}. See the README's OpenAI field mapping.",
                code="unknown_parameter",
            )
    for name, reason in _UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value is not False and not (name == "partial_images" and value == 0):
            raise bad_request(name, f"Invalid parameter: {name} {reason}", code="unsupported_parameter")

    params: dict[str, str] = {
        "prompt": "prompt", "num_images": "n", "size": "size", "acceleration": "quality", "output_format":
        "output_format", "output_quality": "output_compression", "background": "background", "sync_mode":
        "response_format", "enable_safety_checker": "moderation", "input": "input",
    }
    params.update({name: name for name in EXTENSION_FIELDS})
    native: dict[str, Any] = {name: body[name] for name in EXTENSION_FIELDS if body.get(name) is not None}
    native["prompt"] = body.get("prompt")
    native["output_format"] = body.get("output_format") or "png"  # OpenAI's default; the native edit default is jpeg
    for name, target in (("n", "num_images"), ("background", "background")):
        if body.get(name) is not None:
            native[target] = body[name]
    if body.get("background") == "auto":
        del native["background"]

    size = _text(body, "size", "auto")
    if size.strip().lower() != "auto":
        match = _SIZE.match(size)
        if not match:
            raise bad_request("size", f'Invalid parameter: size must be "auto" or WIDTHxHEIGHT (e.g. "1024x1024"), '
                              f"got {preview(size)}")
        if mask is not None:
            raise bad_request("size", "Invalid parameter: size cannot be given with a mask: the edited image keeps "
                              "the input's own size (send auto or omit it)")
        native["size"] = f"{match.group(1)}*{match.group(2)}"

    compression = body.get("output_compression")
    if compression is not None:
        if isinstance(compression, bool) or not isinstance(compression, int) or not 0 <= compression <= 100:
            raise bad_request("output_compression", "Invalid parameter: output_compression must be an integer from 0 "
                              f"to 100, got {preview(compression)}")
        native["output_quality"] = max(1, compression)  # the encoders' quality scale starts at 1

    moderation = _choice(body, "moderation", ("auto", "low"), "auto")
    if moderation == "low":
        native["enable_safety_checker"] = False

    response_format = _choice(body, "response_format", ("b64_json", "url"), "b64_json")
    if response_format == "url" and worker.settings.bucket is None:
        raise bad_request("response_format", "Invalid parameter: response_format url needs a bucket on this endpoint "
                          "(BUCKET_* variables) to hold the images; ask for b64_json instead")
    native["sync_mode"] = response_format == "b64_json"

    quality = _choice(body, "quality", tuple(_ACCELERATION_BY_QUALITY), "auto")
    acceleration = _ACCELERATION_BY_QUALITY[quality]
    if acceleration is not None:
        native["acceleration"] = acceleration

    if route == EDITS:
        fidelity = body.get("input_fidelity")
        if fidelity is not None:
            _choice(body, "input_fidelity", ("low", "high"), "high")
        if not images:
            raise bad_request("image", "Invalid parameter: image is required", code="missing_required_parameter")
        if mask is not None and len(images) > 1:
            raise bad_request("mask", "Invalid parameter: mask applies to one input image; this worker inpaints one "
                              "image at a time (send one image with the mask)")
        if len(images) == 1:
            native["image"] = images[0].reference
            params["image"] = images[0].param
        else:
            native["images"] = [image.reference for image in images]
            params["images"] = images[0].param.split("[")[0]
            params.update({f"images[{i}]": image.param for i, image in enumerate(images)})
        if mask is not None:
            native["mask_image"] = mask.reference  # a stand-in for the checks below; execute() converts the mask
            params["mask_image"] = mask.param
    elif images or mask is not None:
        raise bad_request("image", "Invalid parameter: image belongs to /v1/images/edits")

    _check_model(worker, body.get("model"), route, mask is not None)

    notes: list[str] = []
    if body.get("input_fidelity") is not None:
        notes.append("input_fidelity has no equivalent here and was ignored")
    with _translated(params):
        try:
            worker.check(native)
        except FastModeUnavailableError as err:
            # Run what this endpoint has: its fused fast mode, else the full steps; the response says so.
            fallback = err.fused
            if fallback is None and "acceleration" not in native:
                raise
            ran = _QUALITY_BY_ACCELERATION[fallback]
            notes.append(f"quality {quality} is not available on this endpoint ({err}); ran as quality {ran}")
            native.pop("acceleration", None)
            if fallback is not None:
                native["acceleration"] = fallback
            worker.check(native)
    ran_quality = _QUALITY_BY_ACCELERATION[native.get("acceleration")]
    return PreparedRequest(
        native=native,
        params=params,
        response_format=response_format,
        quality=ran_quality,
        background="transparent" if body.get("background") == "transparent" else "opaque",
        mask=mask,
        notes=tuple(notes),
    )


def _check_model(worker: Worker, model: Any, route: str, masked: bool) -> None:
    if model is None:
        return
    served = worker.served_models()
    wanted = "inpainting" if masked else "edit" if route == EDITS else "text-to-image"
    serving = [name for name, modes in served.items() if any(mode.value == wanted for mode in modes)]
    if model not in serving:
        names = ", ".join(serving) or "none"
        raise bad_request(
            "model", f"Invalid parameter: model {preview(model)} is not loaded here for {wanted}; this endpoint's "
            f"model for it: {names} (or omit model)", code="model_not_found",
        )


def _text(body: Mapping[str, Any], name: str, default: str) -> str:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise bad_request(name, f"Invalid parameter: {name} must be a string, got {json_type(value)}")
    return value


def _choice(body: Mapping[str, Any], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = _text(body, name, default)
    if value not in allowed:
        raise bad_request(
            name, f"Invalid parameter: {name} must be one of {', '.join(allowed)}, got {preview(value)}"
        )
    return value


def execute(worker: Worker, prepared: PreparedRequest, job_id: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Run a prepared request (the GPU part: call it one at a time); OpenAI's response body and the headers that go
    with it (the cost). Raises OpenAIError."""
    native = dict(prepared.native)
    with _translated(prepared.params):
        if prepared.mask is not None:
            native["mask_image"] = native_mask(prepared.mask, worker)
        result = worker.run({"id": job_id, "input": native}, job_id)
    return openai_response(result, prepared), {"X-Image-Cost-USD": f"{result['cost']:.8f}"}


def native_mask(mask: ImageInput, worker: Worker) -> str:
    """OpenAI's mask (fully transparent pixels are edited, the rest kept) as the worker's: a greyscale PNG, white =
    repaint. A mask without transparency says nothing in OpenAI's convention, so it is refused rather than guessed."""
    data = read_image_bytes(mask.reference, worker.image_limits, field=mask.param)
    image = decode_image(data, worker.image_limits, field=mask.param, flatten=False)
    if image.mode not in ("RGBA", "LA", "PA") and not (image.mode == "P" and "transparency" in image.info):
        raise ValidationError(
            "mask_image", "must have an alpha channel (a PNG with transparency): its fully transparent pixels mark "
            "where to edit"
        )
    edited = image.convert("RGBA").getchannel("A").point(lambda alpha: 255 if alpha == 0 else 0)
    if edited.getbbox() is None:
        raise ValidationError("mask_image", "has no fully transparent pixel: nothing to edit")
    buffer = io.BytesIO()
    edited.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def openai_response(result: Mapping[str, Any], prepared: PreparedRequest) -> dict[str, Any]:
    """OpenAI's ImagesResponse from the worker's result; ``cost``, ``seed`` and ``notes`` are this worker's additions
    (the SDKs keep unknown fields)."""
    notes = [*prepared.notes, *result.get("notes", ())]
    data = []
    for image in result["images"]:
        url: str = image["url"]
        item: dict[str, Any]
        if url.startswith("data:"):
            item = {"b64_json": url.split(",", 1)[1]}
            if prepared.response_format == "url":  # UPLOAD_FALLBACK=inline rescued a failed upload
                notes.append("the upload failed, so the image is returned as b64_json (UPLOAD_FALLBACK=inline)")
        else:
            item = {"url": url}
        if "prompt" in result:  # enhance_prompt: what the model read
            item["revised_prompt"] = result["prompt"]
        item["seed"] = image["seed"]
        data.append(item)
    if result.get("warning"):
        notes.append(result["warning"])
    first = result["images"][0]
    response: dict[str, Any] = {
        "created": int(time.time()),
        "data": data,
        "background": prepared.background,
        "output_format": first["content_type"].split("/", 1)[1],
        "quality": prepared.quality,
        "size": f"{first['width']}x{first['height']}",
        "model": result["model"]["id"],
        "cost": result["cost"],
    }
    if notes:
        response["notes"] = notes
    return response


def models_response(worker: Worker) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "qwen-image-worker",
             "modes": [mode.value for mode in modes]}
            for name, modes in worker.served_models().items()
        ],
    }


@contextmanager
def _translated(params: Mapping[str, str]) -> Iterator[None]:
    """The worker's errors as OpenAI's, naming the OpenAI parameter: the one place this translation happens."""
    try:
        yield
    except OpenAIError:
        raise
    except ValidationError as err:
        param = _param(err.field, params)
        raise bad_request(param, f"Invalid parameter: {param} {err.rule}") from None
    except InputImageError as err:
        param = _param(err.field, params)
        raise bad_request(param, f"Invalid image ({param}): {err.reason}", code="invalid_image") from None
    except LoraError as err:
        raise bad_request(_param(err.field, params), str(err)) from None
    except ContentFlaggedError as err:
        raise bad_request(_param(err.field, params), str(err), code="moderation_blocked") from None
    except FastModeUnavailableError as err:
        raise bad_request("quality", str(err)) from None
    except TaskNotServedError as err:
        raise bad_request("model", str(err), code="model_not_found") from None
    except ResultTooLargeError as err:
        raise bad_request("response_format", str(err)) from None
    except StorageError as err:
        raise OpenAIError(502, str(err)) from None
    except GenerationError:
        raise  # the server decides what a fatal one means for the process (http_server marks itself unhealthy)
    except WorkerError as err:
        raise bad_request(None, str(err)) from None


def _param(native_field: str, params: Mapping[str, str]) -> str:
    """The OpenAI parameter behind a native field name (``images[1]`` -> ``image[1]``, ``loras[0].path`` stays)."""
    if native_field in params:
        return params[native_field]
    base = re.split(r"[\[.]", native_field, maxsplit=1)[0]
    return params[base] + native_field[len(base):] if base in params else native_field


def generation_error(err: GenerationError) -> OpenAIError:
    return OpenAIError(500, str(err))


def handle_job(worker: Worker | StartupFailure, job: Mapping[str, Any]) -> dict[str, Any]:
    """The queue worker's handler: a native job, or Runpod's ``/openai/v1`` job shape (``{"openai_route": "/v1/...",
    "openai_input": {...}}``), answered with OpenAI's response object (``{"error": message}`` fails the job)."""
    raw = job.get("input") if isinstance(job, Mapping) else None
    if not (isinstance(raw, Mapping) and "openai_route" in raw):
        return worker.handle(job)
    from .app import StartupFailure  # app loads torch; handler.py has imported it already

    if isinstance(worker, StartupFailure):
        return worker.handle(job)
    raw_id = job.get("id")
    job_id = raw_id[:128] if isinstance(raw_id, str) and raw_id else "job"
    try:
        return _openai_job(worker, raw, job_id)
    except OpenAIError as err:
        log.warning("job %s failed: %s", job_id, err.message)
        return {"error": err.message}
    except GenerationError as err:
        log.warning("job %s failed: %s", job_id, err)
        return {"error": str(err), "refresh_worker": True} if err.fatal else {"error": str(err)}
    except Exception:
        log.exception("job %s: unexpected error", job_id)
        return {"error": f"Internal error while processing job {job_id}; the worker's log has the details."}


def _openai_job(worker: Worker, raw: Mapping[str, Any], job_id: str) -> dict[str, Any]:
    route = raw.get("openai_route")
    if route not in ROUTES:
        raise bad_request(
            "openai_route", f"Invalid parameter: openai_route must be one of {', '.join(ROUTES)}, got {preview(route)}"
        )
    if route == MODELS:
        return models_response(worker)
    body = raw.get("openai_input")
    if not isinstance(body, Mapping):
        raise bad_request("openai_input", f"Invalid parameter: openai_input must be a JSON object, got "
                          f"{json_type(body)}")
    if route == EDITS:
        images, mask = json_edit_images(body)
        fields = {name: value for name, value in body.items() if name not in ("image", "images", "mask")}
        prepared = prepare(worker, route, fields, images, mask)
    else:
        prepared = prepare(worker, route, body)
    response, _headers = execute(worker, prepared, job_id)
    return response

