"""One job, one direction: parse -> resolve inputs -> generate -> safety -> encode -> store -> respond.

``Worker.handle(job)`` never raises: a ``WorkerError`` becomes ``{"error": "<readable string>"}`` (Runpod marks the
job FAILED), and anything unexpected is logged with its traceback and answered with a generic error, so the worker
process keeps serving the next job. ``Worker.run`` is the same job raising its ``WorkerError`` instead, for callers
that answer errors in another shape (the OpenAI routes, ``openai_api.py``); ``Worker.check`` validates an input
without doing any work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from .config import Settings
from .enums import Mode, OutputFormat
from .errors import ContentFlaggedError, GenerationError, StorageError, ValidationError, WorkerError
from .inpainting import MaskedCanvas, PasteBack, inpainting_canvas, outpainting_canvas
from .lora_files import LoraStore
from .media import EncodedImage, ImageLimits, encode_image, flatten_alpha, load_image, load_mask
from .modes import MODES, SizeRule
from .profiles import request_rules
from .response import dry_run_quote, job_result
from .runner import GenerationJob, PipelineRunner, ProgressCallback
from .safety import SafetyChecker
from .schema import GenerationDefaults, Request, parse_request
from .sizes import OutputPlan, layered_size, plan_output
from .storage import InlineStore, ResultStore

log = logging.getLogger(__name__)

FLAGGED_MESSAGE = "the generated image was flagged by the safety checker"


@dataclass(frozen=True)
class SafetyPolicy:
    """The operator's SAFETY_CHECKER setting applied to a request's flag."""

    checker: SafetyChecker | None
    mode: str  # "on" | "always" | "off"
    check_inputs: bool = False

    def applies_to(self, request: Request) -> bool:
        return self.checker is not None and (self.mode == "always" or request.enable_safety_checker)

    def check(self, images: Sequence[Image.Image]) -> list[bool]:
        """One flag per image (True = flagged). Only called where ``applies_to`` said the checker runs."""
        if self.checker is None:
            raise RuntimeError("the safety policy has no checker loaded")
        return self.checker.check(images)

    def describe(self, request: Request) -> str:
        if self.mode == "off":
            return "disabled by operator"
        if self.mode == "always":
            return "enforced by operator"
        return "enabled" if request.enable_safety_checker else "disabled by request"


class ImageFetcher(Protocol):
    """Turns an input image reference (URL or data URI) into a decoded image; ``media.load_image`` is the real one."""

    def __call__(self, reference: str, limits: ImageLimits, *, field: str) -> Image.Image: ...


class ImageEncoder(Protocol):
    """Encodes a result image; ``media.encode_image`` is the real one."""

    def __call__(self, image: Image.Image, output_format: OutputFormat, quality: int | None = None) -> EncodedImage: ...


def _no_progress(job: Mapping[str, Any]) -> ProgressCallback | None:
    return None


class Worker:
    """Runs jobs, one at a time, on the pipelines, store and policies ``app.py`` built.

    ``fetch_image``, ``fetch_mask``, ``encode`` and ``progress`` are seams: tests pass stand-ins instead of patching
    module globals.
    """

    def __init__(
        self,
        settings: Settings,
        runner: PipelineRunner,
        store: ResultStore,
        *,
        loras: LoraStore | None = None,
        safety: SafetyPolicy | None = None,
        progress: Callable[[Mapping[str, Any]], ProgressCallback | None] = _no_progress,
        fetch_image: ImageFetcher = load_image,
        fetch_mask: ImageFetcher = load_mask,
        encode: ImageEncoder = encode_image,
        notes: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.runner = runner
        self.store = store
        # Inline results: fal's sync_mode, and the UPLOAD_FALLBACK=inline rescue when an upload fails.
        self.inline_store = InlineStore(settings.max_inline_bytes)
        self.loras = loras
        self.safety = safety or SafetyPolicy(checker=None, mode="off")
        self.progress = progress
        self.fetch_image = fetch_image
        self.fetch_mask = fetch_mask
        self.encode = encode
        self.notes = list(notes)  # what every result says about this worker (the memory plan MEMORY_PLAN=auto chose)
        self.image_limits = ImageLimits(
            settings.max_image_bytes, settings.max_image_pixels, settings.image_fetch_timeout_seconds
        )

    def handle(self, job: Mapping[str, Any]) -> dict[str, Any]:
        job = job if isinstance(job, Mapping) else {}
        raw_id = job.get("id")
        # Runpod's ids are strings; anything else (even a huge integer) must not crash the handler before its try.
        job_id = raw_id[:128] if isinstance(raw_id, str) and raw_id else "job"
        started = time.perf_counter()
        try:
            result = self.run(job, job_id)
        except GenerationError as err:
            log.warning("job %s failed: %s", job_id, err)
            # refresh_worker: the SDK stops this worker after the job, and Runpod starts a fresh one.
            return {"error": str(err), "refresh_worker": True} if err.fatal else {"error": str(err)}
        except WorkerError as err:
            log.warning("job %s failed: %s", job_id, err)
            return {"error": str(err)}
        except Exception:
            log.exception("job %s: unexpected error", job_id)
            return {"error": f"Internal error while processing job {job_id}; the worker's log has the details."}
        log.info("job %s done in %.0f ms", job_id, (time.perf_counter() - started) * 1000)
        return result

    def check(self, raw_input: Any) -> None:
        """Validate a job's ``input`` against the request rules and what this endpoint serves, as ``run`` does first;
        raises ``WorkerError``. No download, no GPU work: cheap enough to answer a bad request before it queues."""
        self.runner.check_request(parse_request(raw_input, self._rules_for))

    def served_models(self) -> dict[str, list[Mode]]:
        """Each loaded model's id (a repo id or a folder, as configured) and the modes it serves here."""
        models: dict[str, list[Mode]] = {}
        for mode in Mode:
            try:
                _route, loaded = self.runner.route_for(mode)
            except WorkerError:
                continue
            models.setdefault(loaded.model.model_id, []).append(mode)
        return models

    def run(self, job: Mapping[str, Any], job_id: str) -> dict[str, Any]:
        """One job, raising ``WorkerError`` where ``handle`` answers ``{"error"}``."""
        request = parse_request(job.get("input"), self._rules_for)
        self.runner.check_request(request)
        timings: dict[str, float] = {}

        with _timed(timings, "fetch_inputs"):
            inputs = self._fetch_inputs(request)
            canvas = self._canvas(request, inputs)
            control = (
                self.fetch_image(request.control_url, self.image_limits, field="control_image")
                if request.control_url is not None
                else None
            )
        plan = self._plan_output(request, inputs, canvas)
        if request.dry_run:
            return dry_run_quote(request, plan, price_per_megapixel=self.settings.price_per_megapixel)
        if inputs and self.safety.check_inputs and self.safety.applies_to(request):
            with _timed(timings, "safety_inputs"):
                self._refuse_flagged_inputs(inputs)
        with _timed(timings, "fetch_loras"):
            loras = self._resolve_loras(request)

        generation = self.runner.generate(
            GenerationJob(request, plan.width, plan.height, inputs, loras, canvas, control), self.progress(job)
        )
        timings.update(generation.timings_ms)
        with _timed(timings, "finish"):
            images = self._finish(request, generation.images, plan, canvas)
        with _timed(timings, "safety"):
            delivered, flags = self._screen(request, images)
        with _timed(timings, "encode_image"):
            encoded = [self.encode(image, request.output_format, request.output_quality) for _, image in delivered]
        with _timed(timings, "upload"):
            urls, warning = self._store(job_id, encoded, inline=request.sync_mode)

        result = job_result(
            request,
            generation,
            seeds=[seed for seed, _ in delivered],
            encoded=encoded,
            urls=urls,
            flags=flags,
            timings=timings,
            price_per_megapixel=self.settings.price_per_megapixel,
            safety_checker=self.safety.describe(request),
        )
        if warning:
            result["warning"] = warning
        if self.notes:
            result["notes"] = [*result.get("notes", []), *self.notes]
        log.info(
            "job %s: %s %dx%d x%d seed=%d steps=%d timings_ms=%s",
            job_id, request.mode.value, encoded[0].width, encoded[0].height, len(encoded), request.seed,
            generation.num_inference_steps, result["timings"],
        )
        return result

    def _rules_for(self, mode: Mode) -> GenerationDefaults:
        """The defaults and rules of the model that serves ``mode``: its card's, unless the operator set their own."""
        profile = self.runner.profile_for(mode)
        return request_rules(profile, self.settings.default_steps, self.settings.default_true_cfg_scale)

    def _finish(
        self, request: Request, images: Sequence[Image.Image], plan: OutputPlan, canvas: MaskedCanvas | None
    ) -> list[Image.Image]:
        """The images as delivered: at the delivered size and, when inpainting or outpainting with
        ``preserve_unmasked``, with the input pasted back outside the mask (``inpainting.PasteBack``)."""
        resized = [_resized(image, plan.delivered) for image in images]
        if canvas is None or not request.preserve_unmasked:
            return resized
        paste_back = PasteBack(canvas)
        return [paste_back(image) for image in resized]

    def _screen(
        self, request: Request, images: Sequence[Image.Image]
    ) -> tuple[list[tuple[int, Image.Image]], list[bool] | None]:
        """The (seed, image) pairs that may be delivered, and the per-image flags when the checker ran.

        Flagged images are dropped here, before encoding, so they are never stored or returned. Layers are one
        image taken apart: each is checked as a viewer would see it alone (composited on white), and one flagged
        layer refuses the whole job, as the others would still add up to most of the flagged picture."""
        if MODES[request.mode].layered:
            pairs = [(request.seed, image) for image in images]  # every layer comes from the one seed
            if not self.safety.applies_to(request):
                return pairs, None
            layer_flags = self.safety.check([flatten_alpha(image) for image in images])
            if any(layer_flags):
                raise ContentFlaggedError(
                    f"{sum(layer_flags)} of {len(layer_flags)} layers were flagged by the safety checker; "
                    "no layer is delivered"
                )
            return pairs, layer_flags
        pairs = list(zip(request.seeds, images, strict=True))
        if not self.safety.applies_to(request):
            return pairs, None
        flags = self.safety.check(images)
        if all(flags):
            raise ContentFlaggedError(
                FLAGGED_MESSAGE
                if len(flags) == 1
                else f"all {len(flags)} generated images were flagged by the safety checker"
            )
        return [pair for pair, flagged in zip(pairs, flags, strict=True) if not flagged], flags

    def _fetch_inputs(self, request: Request) -> list[Image.Image]:
        many = len(request.image_urls) > 1
        return [
            self.fetch_image(url, self.image_limits, field=f"images[{index}]" if many else "image")
            for index, url in enumerate(request.image_urls)
        ]

    def _canvas(self, request: Request, inputs: Sequence[Image.Image]) -> MaskedCanvas | None:
        """Inpainting's image and mask, or outpainting's grown canvas and border; None in the other modes."""
        if request.mask_url is not None:
            mask = self.fetch_mask(request.mask_url, self.image_limits, field="mask_image")
            canvas = inpainting_canvas(inputs[0], mask)
            if canvas.mask.getbbox() is None:  # binarised: no pixel at or above the threshold
                raise ValidationError("mask_image", "is black everywhere: nothing to repaint (white = repaint)")
            return canvas
        if request.expand is not None:
            width, height = request.expand.grown(*inputs[0].size)
            if width * height > self.image_limits.max_pixels:
                raise ValidationError(
                    "expand",
                    f"grows the image to {width}x{height} = {width * height} pixels, over the limit of "
                    f"{self.image_limits.max_pixels} (MAX_IMAGE_PIXELS)",
                )
            return outpainting_canvas(inputs[0], request.expand)
        return None

    def _plan_output(
        self, request: Request, inputs: Sequence[Image.Image], canvas: MaskedCanvas | None
    ) -> OutputPlan:
        spec = MODES[request.mode]
        if spec.size_rule is SizeRule.LAYER_BUCKET and request.resolution is not None:
            # The layered pipeline decides its size from the input's aspect and the resolution bucket.
            size = layered_size(inputs[0].size, request.resolution)
            return OutputPlan(size[0], size[1], size)
        requested = None
        if request.width is not None and request.height is not None:
            requested = (request.width, request.height)
        # Inpainting returns the input's dimensions and outpainting the grown canvas's: planned as match_input_size
        # plans an edit, on the canvas. Edit-Plus follows the last reference image, as the model does.
        reference = canvas.image.size if canvas is not None else inputs[-1].size if inputs else None
        return plan_output(
            requested,
            reference,
            match_input_size=request.match_input_size or spec.size_rule is SizeRule.KEEPS_INPUT,
            field="images" if len(inputs) > 1 else "image",
            rules=self.runner.profile_for(request.mode).sizes,
            multiple=spec.size_multiple,
        )

    def _refuse_flagged_inputs(self, inputs: Sequence[Image.Image]) -> None:
        flags = self.safety.check(inputs)
        if any(flags):
            flagged = ["image" if len(inputs) == 1 else f"images[{i}]" for i, f in enumerate(flags) if f]
            raise ContentFlaggedError(
                f"the input image ({', '.join(flagged)}) was flagged by the safety checker; nothing was generated",
                field=flagged[0],
            )

    def _resolve_loras(self, request: Request) -> list[tuple[Path, float]]:
        if not request.loras:
            return []
        if self.loras is None:
            raise WorkerError("LoRAs are not enabled on this endpoint")
        return [(self.loras.resolve(lora, f"loras[{index}]"), lora.scale) for index, lora in enumerate(request.loras)]

    def _store(self, job_id: str, encoded: list[EncodedImage], *, inline: bool) -> tuple[list[str], str | None]:
        if inline:  # fal's sync_mode: the caller wants the bytes in the response, not a URL
            return self.inline_store.store(job_id, encoded), None
        try:
            return self.store.store(job_id, encoded), None
        except StorageError as err:
            if not self.settings.upload_fallback_inline:
                raise
            log.warning("job %s: %s; returning the result inline (UPLOAD_FALLBACK=inline)", job_id, err)
            urls = self.inline_store.store(job_id, encoded)
            return urls, f"{err} The image is returned inline instead (UPLOAD_FALLBACK=inline)."


def _resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Adds the milliseconds the block took to ``timings[name]``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = (time.perf_counter() - started) * 1000
