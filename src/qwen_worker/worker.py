"""One job, one direction: parse -> resolve inputs -> generate -> encode -> store -> respond.

``Worker.handle(job)`` never raises: a ``WorkerError`` becomes ``{"error": "<readable string>"}`` (Runpod marks the
job FAILED), and anything unexpected is logged with its traceback and answered with a generic error, so the worker
process keeps serving the next job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from .config import Settings
from .errors import StorageError, WorkerError
from .media import EncodedImage, ImageLimits, encode_image, load_image
from .models import resolve_model
from .pipelines import LoadedPipeline, PipelineRunner, load_pipeline, select_device
from .pricing import cost_of
from .schema import GenerationDefaults, Request, parse_request
from .storage import InlineStore, LocalDirectoryStore, ResultStore, S3Store

log = logging.getLogger(__name__)


class Worker:
    def __init__(
        self,
        settings: Settings,
        runner: PipelineRunner,
        store: ResultStore,
        fallback_store: ResultStore | None = None,
    ) -> None:
        self.settings = settings
        self.runner = runner
        self.store = store
        self.fallback_store = fallback_store
        self.defaults = GenerationDefaults(settings.default_steps, settings.default_true_cfg_scale)
        self.image_limits = ImageLimits(
            settings.max_image_bytes, settings.max_image_pixels, settings.image_fetch_timeout_seconds
        )

    def handle(self, job: Mapping[str, Any]) -> dict[str, Any]:
        job_id = str(job.get("id") or "job") if isinstance(job, Mapping) else "job"
        started = time.perf_counter()
        try:
            result = self._run(job_id, job.get("input") if isinstance(job, Mapping) else None)
        except WorkerError as err:
            log.warning("job %s failed: %s", job_id, err)
            return {"error": str(err)}
        except Exception:
            log.exception("job %s: unexpected error", job_id)
            return {"error": f"Internal error while processing job {job_id}; the worker's log has the details."}
        log.info("job %s done in %.0f ms", job_id, (time.perf_counter() - started) * 1000)
        return result

    def _run(self, job_id: str, raw_input: Any) -> dict[str, Any]:
        request = parse_request(raw_input, self.defaults)
        self.runner.check_request(request)
        timings: dict[str, float] = {}

        with _timed(timings, "fetch_inputs"):
            inputs = [
                load_image(url, self.image_limits, field="image" if len(request.image_urls) == 1 else f"images[{i}]")
                for i, url in enumerate(request.image_urls)
            ]
        generation = self.runner.generate(request, inputs)
        timings.update(generation.timings_ms)
        with _timed(timings, "encode_image"):
            encoded = [encode_image(image, request.output_format) for image in generation.images]
        with _timed(timings, "store"):
            urls, warning = self._store(job_id, encoded)

        first = encoded[0]
        result: dict[str, Any] = {
            "image_url": urls[0],
            "cost": cost_of(((image.width, image.height) for image in encoded), self.settings.price_per_megapixel),
            "seed": request.seed,
            "width": first.width,
            "height": first.height,
        }
        if warning:
            result["warning"] = warning
        log.info(
            "job %s: %s %dx%d seed=%d steps=%d timings_ms=%s",
            job_id,
            request.task.value,
            first.width,
            first.height,
            request.seed,
            request.num_inference_steps,
            {name: round(ms) for name, ms in timings.items()},
        )
        return result

    def _store(self, job_id: str, encoded: list[EncodedImage]) -> tuple[list[str], str | None]:
        try:
            return self.store.store(job_id, encoded), None
        except StorageError as err:
            if self.fallback_store is None:
                raise
            log.warning("job %s: %s; returning the result inline (UPLOAD_FALLBACK=inline)", job_id, err)
            urls = self.fallback_store.store(job_id, encoded)
            return urls, f"{err} The image is returned inline instead (UPLOAD_FALLBACK=inline)."


class _timed:
    """Adds the milliseconds a block took to ``timings[name]``."""

    def __init__(self, timings: dict[str, float], name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.name] = (time.perf_counter() - self.started) * 1000


def build_store(settings: Settings) -> tuple[ResultStore, ResultStore | None]:
    """The configured store, and the inline fallback when UPLOAD_FALLBACK=inline applies."""
    inline = InlineStore(settings.max_inline_bytes)
    if settings.bucket is not None:
        s3 = S3Store(settings.bucket)
        warning = s3.check()
        if warning:
            log.warning("storage check at start-up failed: %s. Jobs will fail until it is fixed.", warning)
        return s3, inline if settings.upload_fallback_inline else None
    if settings.local_output_dir is not None:
        return LocalDirectoryStore(settings.local_output_dir), None
    return inline, None


def build_worker(settings: Settings) -> Worker:
    """Resolve and load the configured models (once per process) and wire the worker. Raises ConfigError."""
    device = select_device(settings.require_cuda)
    loaded: list[LoadedPipeline] = []
    for spec in (settings.t2i_model, settings.edit_model):
        if spec is None:
            continue
        model = resolve_model(spec, volume_path=settings.volume_path, baked_cache=settings.hf_hub_cache)
        loaded.append(load_pipeline(model, device))
    store, fallback = build_store(settings)
    log.info("results go to %s", store.description)
    return Worker(settings, PipelineRunner(loaded, device), store, fallback)
