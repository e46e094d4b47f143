"""Running a loaded pipeline for one job: call arguments, per-job state (LoRAs, scheduler), timings and failures.

Knows nothing of HTTP, S3 or JSON: it takes a ``GenerationJob`` (a validated ``Request``, the final sizes, decoded
input images, local LoRA files) and returns PIL images. Per-job state is applied on entry and restored on exit, so the
next job meets the pipeline exactly as it was loaded (``loading.py``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .acceleration import BatchedTrueCFG
from .adapters import fast_transformer
from .errors import ConfigError, GenerationError, TaskNotServedError, ValidationError
from .loading import LoadedPipeline
from .loras import PreparedLoraCache, applied_loras
from .models import ResolvedModel
from .schema import FastMode, Request, Task

log = logging.getLogger(__name__)

# The pipelines' max_sequence_length default: prompt embeddings past this many tokens are dropped.
MAX_PROMPT_TOKENS = 512

# The model card's advice: with no negative prompt, still run true CFG against a single space.
EMPTY_NEGATIVE_PROMPT = " "

# The Lightning authors' scheduler: shift fixed at ln 3 whatever the resolution, no terminal shift.
LIGHTNING_SCHEDULER_OVERRIDES: dict[str, Any] = {
    "base_shift": math.log(3),
    "max_shift": math.log(3),
    "shift_terminal": None,
}

ProgressCallback = Callable[[int, int], None]  # (steps done, total steps)


@dataclass(frozen=True)
class GenerationJob:
    """Everything one pipeline call needs, resolved by the worker: sizes are final, LoRAs are local files."""

    request: Request
    width: int
    height: int
    inputs: Sequence[Image.Image] = ()
    loras: Sequence[tuple[Path, float]] = ()


@dataclass
class Generation:
    images: list[Image.Image]
    model: ResolvedModel
    num_inference_steps: int
    true_cfg_scale: float
    timings_ms: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class PipelineRunner:
    """Holds the loaded pipelines (at most one per task) and runs jobs on them, one at a time."""

    def __init__(
        self,
        pipelines: Sequence[LoadedPipeline],
        device: torch.device,
        lora_cache: PreparedLoraCache | None = None,
    ) -> None:
        self.device = device
        self.lora_cache = lora_cache
        self._by_task: dict[Task, LoadedPipeline] = {}
        for loaded in pipelines:
            if loaded.task in self._by_task:
                raise ConfigError(f"Two pipelines configured for {loaded.task.value}")
            self._by_task[loaded.task] = loaded

    def pipeline_for(self, task: Task) -> LoadedPipeline:
        loaded = self._by_task.get(task)
        if loaded is None:
            if task is Task.EDIT:
                raise TaskNotServedError(
                    "This endpoint does not serve image editing (no QWEN_IMAGE_EDIT_MODEL is configured); "
                    "send a request without 'image' for text-to-image."
                )
            raise TaskNotServedError(
                "This endpoint does not serve text-to-image (QWEN_IMAGE_MODEL is off); send an 'image' to edit it."
            )
        return loaded

    def check_request(self, request: Request) -> None:
        """Refuse, before any download or GPU work, what the configured pipeline cannot do."""
        loaded = self.pipeline_for(request.task)
        if len(request.image_urls) > 1 and not loaded.accepts_multiple_images:
            raise ValidationError(
                "images",
                f"with several images needs an Edit-Plus model (2509/2511); this endpoint serves "
                f"{loaded.model.pipeline_class}",
            )
        if loaded.fast.fused is not None and request.fast_mode is not loaded.fast.fused:
            raise TaskNotServedError(
                f"This endpoint serves only fast mode ({loaded.fast.fused.value}) for {request.task.value}: its "
                "Lightning LoRA is fused into the model (LIGHTNING_FUSE=true). Send the request with "
                + ("go_fast: true." if loaded.fast.fused is FastMode.REGULAR else 'acceleration: "high".')
            )
        if request.fast_mode is not FastMode.NONE and loaded.lightning.for_mode(request.fast_mode) is None:
            variable = _lightning_variable(request.task, request.fast_mode)
            raise TaskNotServedError(
                f"Fast mode ({request.fast_mode.value}) is not installed on this endpoint: its Lightning LoRA file is "
                f"not configured ({variable}). Send the request without go_fast/acceleration."
            )

    def generate(self, job: GenerationJob, on_progress: ProgressCallback | None = None) -> Generation:
        loaded = self.pipeline_for(job.request.task)
        call = _call_arguments(loaded, job, on_progress)
        _note_uncompiled_size(loaded, job)
        stages = _StageClock(loaded.pipeline)
        with (
            _pipeline_errors(loaded, job),
            _scheduler_for(loaded, job.request),
            # The transformer tree of the job's mode (adapters.py) first: the LoRAs, the clock's hooks and batching
            # attach to the tree that runs.
            fast_transformer(loaded.pipeline, loaded.fast, job.request.fast_mode),
            applied_loras(loaded.pipeline, job.loras, self.lora_cache),
            stages,
            _batching(loaded, job.request),
            torch.inference_mode(),
        ):
            output = loaded.pipeline(**call)
        note = prompt_token_note(loaded.pipeline, call["prompt"])
        return Generation(
            images=list(output.images),
            model=loaded.model,
            num_inference_steps=job.request.num_inference_steps,
            true_cfg_scale=job.request.true_cfg_scale,
            timings_ms=stages.timings_ms(),
            notes=[note] if note else [],
        )


def _call_arguments(loaded: LoadedPipeline, job: GenerationJob, on_progress: ProgressCallback | None) -> dict[str, Any]:
    """The keyword arguments of the diffusers pipeline call for this job."""
    request = job.request
    call: dict[str, Any] = {
        "prompt": request.effective_prompt,
        # No true CFG (scale 1): no negative prompt, so the pipeline skips the second transformer pass entirely.
        "negative_prompt": (request.negative_prompt or EMPTY_NEGATIVE_PROMPT) if request.true_cfg_scale > 1.0 else None,
        "true_cfg_scale": request.true_cfg_scale,
        "num_inference_steps": request.num_inference_steps,
        "num_images_per_prompt": request.num_images,
        "width": job.width,
        "height": job.height,
        # One CPU generator per image: image i is the image seed+i would give alone, on any device.
        "generator": [torch.Generator(device="cpu").manual_seed(seed) for seed in request.seeds],
        "output_type": "pil",
    }
    if request.task is Task.EDIT:
        call["image"] = list(job.inputs) if loaded.accepts_multiple_images else job.inputs[0]
    if on_progress is not None:
        total = request.num_inference_steps

        def report(pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            on_progress(step + 1, total)
            return callback_kwargs

        call["callback_on_step_end"] = report
    return call


def _note_uncompiled_size(loaded: LoadedPipeline, job: GenerationJob) -> None:
    if loaded.compiled_sizes is not None and (job.width, job.height) not in loaded.compiled_sizes:
        loaded.compiled_sizes.add((job.width, job.height))
        log.info("size %dx%d was not warmed up: this job compiles it (COMPILE_WARMUP_SIZES)", job.width, job.height)


def _batching(loaded: LoadedPipeline, request: Request) -> AbstractContextManager[Any]:
    if loaded.batched_cfg and request.true_cfg_scale > 1:
        return BatchedTrueCFG(loaded.pipeline.transformer)
    return nullcontext()


@contextmanager
def _scheduler_for(loaded: LoadedPipeline, request: Request) -> Iterator[None]:
    """Swap in a job-specific scheduler when one is needed, and always put the original back."""
    pipeline = loaded.pipeline
    original = pipeline.scheduler
    overrides: dict[str, Any] = {}
    if request.fast_mode is not FastMode.NONE:
        overrides.update(LIGHTNING_SCHEDULER_OVERRIDES)
    if request.num_inference_steps == 1 and original.config.get("shift_terminal"):
        # Stretching the schedule to a terminal shift divides by zero with a single step (a black image).
        overrides["shift_terminal"] = None
    if not overrides:
        yield
        return
    pipeline.scheduler = type(original).from_config({**original.config, **overrides})
    try:
        yield
    finally:
        pipeline.scheduler = original


@contextmanager
def _pipeline_errors(loaded: LoadedPipeline, job: GenerationJob) -> Iterator[None]:
    """Translate what a pipeline call can raise into a GenerationError the caller reads; the worker goes on."""
    request = job.request
    try:
        yield
    except torch.OutOfMemoryError:
        # Memory is freed and the worker goes on: the next, smaller job can succeed.
        _free_accelerator_memory()
        pixels = job.width * job.height * request.num_images
        raise GenerationError(
            f"The GPU ran out of memory generating {request.num_images} image(s) of {job.width}x{job.height} "
            f"({pixels / 1e6:.1f} MP in all); try a smaller size or fewer images."
        ) from None
    except torch.AcceleratorError as err:
        log.exception("pipeline %s hit an unrecoverable accelerator error", loaded.model.model_id)
        raise GenerationError(
            f"The GPU failed while generating ({str(err)[:160]}); this worker will be replaced. Please retry.",
            fatal=True,
        ) from None
    except (RuntimeError, ValueError) as err:
        log.exception("pipeline %s failed", loaded.model.model_id)
        _free_accelerator_memory()
        raise GenerationError(f"Generation failed: {type(err).__name__}: {str(err)[:200]}") from None


class _StageClock:
    """Splits one pipeline call into encode (prompt and input images), denoise and decode.

    The first transformer forward marks the start of denoising and the last one its end, so no pipeline internals
    are copied to time them. Hooks are removed when the call ends.
    """

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.first_forward: float | None = None
        self.last_forward: float | None = None
        self.started = self.ended = 0.0

    def __enter__(self) -> _StageClock:
        self.started = time.perf_counter()
        transformer = self.pipeline.transformer  # read now: a fast job swaps in its own tree before this
        self._hooks = [
            transformer.register_forward_pre_hook(self._before),
            transformer.register_forward_hook(self._after),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        self.ended = time.perf_counter()
        for hook in self._hooks:
            hook.remove()

    def _before(self, *args: Any) -> None:
        if self.first_forward is None:
            self.first_forward = time.perf_counter()

    def _after(self, *args: Any) -> None:
        self.last_forward = time.perf_counter()

    def timings_ms(self) -> dict[str, float]:
        if self.first_forward is None or self.last_forward is None:
            return {"generate": (self.ended - self.started) * 1000}
        return {
            "encode_prompt": (self.first_forward - self.started) * 1000,
            "denoise": (self.last_forward - self.first_forward) * 1000,
            "decode": (self.ended - self.last_forward) * 1000,
        }


def _free_accelerator_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prompt_token_note(pipeline: Any, prompt: str) -> str | None:
    """A note when the prompt is longer than the text encoder reads (the rest is silently cut by the pipeline)."""
    tokens = len(pipeline.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if tokens <= MAX_PROMPT_TOKENS:
        return None
    return f"the prompt is {tokens} tokens; the text encoder reads only the first {MAX_PROMPT_TOKENS}"


def _lightning_variable(task: Task, mode: FastMode) -> str:
    prefix = "LIGHTNING_EDIT_LORA" if task is Task.EDIT else "LIGHTNING_LORA"
    return prefix + ("_4STEP" if mode is FastMode.HIGH else "")
