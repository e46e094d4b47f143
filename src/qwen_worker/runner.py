"""Running a loaded pipeline for one job: which pipeline serves the mode, call arguments, per-job state (LoRAs,
scheduler), timings and failures.

Knows nothing of HTTP, S3 or JSON: it takes a ``GenerationJob`` (a validated ``Request``, the final sizes, decoded
input images, local LoRA files) and returns PIL images. Per-job state is applied on entry and restored on exit, so the
next job meets the pipeline exactly as it was loaded (``loading.py``).

What serves each mode is its row in ``modes.MODES``: the loaded pipeline it runs on and the diffusers class that runs
it, built from the loaded one with ``from_pipe`` (the same modules, so a mode costs no memory), its call arguments and
how its output is unpacked. Nothing here names an individual mode.
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

import numpy as np
import torch
from PIL import Image

from .acceleration import BatchedTrueCFG
from .enums import Background, FastMode, Mode, Task
from .errors import (
    ConfigError,
    FastModeUnavailableError,
    GenerationError,
    TaskNotServedError,
    ValidationError,
)
from .inpainting import MaskedCanvas
from .loading import LoadedPipeline, derive_pipeline, lightning_variable
from .lora_files import PreparedLoraCache
from .media import flatten_alpha
from .models import ResolvedModel
from .modes import MODES, ModeRoute
from .profiles import DEFAULT_PROFILE, ModelProfile
from .schema import Request
from .trees import Tree, job_tree

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
class ServedMode:
    """A mode ready to run: the loaded pipeline it runs on (model, Lightning files, speed options) and the pipeline
    object called, ``loaded.pipeline`` itself or one built from it."""

    mode: Mode
    loaded: LoadedPipeline
    pipeline_class: str
    pipeline: Any


@dataclass(frozen=True)
class GenerationJob:
    """Everything one pipeline call needs, resolved by the worker: sizes are final, LoRAs are local files.

    ``canvas`` is inpainting's image and mask (outpainting's grown canvas and its border), None in other modes."""

    request: Request
    width: int
    height: int
    inputs: Sequence[Image.Image] = ()
    loras: Sequence[tuple[Path, float]] = ()
    canvas: MaskedCanvas | None = None
    control: Image.Image | None = None  # ControlNet's control image


@dataclass(frozen=True)
class LoraStep:
    """A job's LoRA step (``trees.job_tree``), as the stage clock timed it: the kind of tree the job ran on
    (``trees.Tree.kind``), entering the step (choosing the tree; writing the LoRAs into its slot or loading them) and
    leaving it (removing them). Not part of the result's timings: it is the GPU benchmark's to report."""

    tree: str
    apply_ms: float
    remove_ms: float


@dataclass
class Generation:
    images: list[Image.Image]
    model: ResolvedModel
    num_inference_steps: int
    true_cfg_scale: float
    timings_ms: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    license: str | None = None  # the model's licence, as results report it
    lora_step: LoraStep | None = None


class PipelineRunner:
    """Holds the loaded pipelines (at most one per task) and the modes built on them; runs jobs, one at a time."""

    def __init__(
        self,
        pipelines: Sequence[LoadedPipeline],
        device: torch.device,
        lora_cache: PreparedLoraCache | None = None,
        controlnet: Any | None = None,
        synchronize: Callable[[], None] | None = None,
    ) -> None:
        self.device = device
        # Called on both sides of the LoRA step's apply and remove (_StageClock): the GPU benchmark waits for the
        # device there, so the step's host-to-device copies are counted in it; the worker waits for nothing.
        self.synchronize = synchronize
        self.lora_cache = lora_cache
        self.controlnet = controlnet  # a QwenImageControlNetModel (QWEN_IMAGE_CONTROLNET_MODEL), or None
        self._by_task: dict[Task, LoadedPipeline] = {}
        for loaded in pipelines:
            if loaded.task in self._by_task:
                raise ConfigError(f"Two pipelines configured for {loaded.task.value}")
            self._by_task[loaded.task] = loaded
        # A pipeline that also serves other tasks (Qwen-Image-2.1 edits too) takes those no other pipeline serves:
        # a model configured for a task explicitly wins.
        for loaded in pipelines:
            for task in loaded.profile.tasks:
                self._by_task.setdefault(task, loaded)
        self._served: dict[Mode, ServedMode] = {}
        self._derived: dict[tuple[str, str], Any] = {}  # (source class, derived class) -> the from_pipe pipeline

    def profile_for(self, mode: Mode) -> ModelProfile:
        """The profile of the model serving ``mode``; Qwen-Image's when none does (the request is refused later)."""
        try:
            return self.route_for(mode)[1].profile
        except TaskNotServedError:
            return DEFAULT_PROFILE

    def pipeline_for(self, task: Task) -> LoadedPipeline:
        loaded = self._by_task.get(task)
        if loaded is None:
            raise TaskNotServedError(MODES[Mode(task.value)].not_served)  # each task is also the mode it serves
        return loaded

    def route_for(self, mode: Mode) -> tuple[ModeRoute, LoadedPipeline]:
        """The route that serves ``mode`` here and the loaded pipeline it runs on; TaskNotServedError if none."""
        spec = MODES[mode]
        by_class = {loaded.model.pipeline_class: loaded for loaded in self._by_task.values()}
        if spec.needs_controlnet and self.controlnet is None:
            raise TaskNotServedError(spec.not_served)
        for route in spec.routes:
            if route.source in by_class:
                return route, by_class[route.source]
        # A model loaded here that has no pipeline for this mode (Qwen-Image-2.1 for image-to-image, say): name it.
        without = sorted(name for name in by_class if all(route.source != name for route in spec.routes))
        detail = f" (this endpoint's {', '.join(without)} has no {mode.value} pipeline)" if without else ""
        raise TaskNotServedError(spec.not_served.rstrip(".") + detail + ".")

    def served(self, mode: Mode) -> ServedMode:
        """The pipeline that runs ``mode``, built from its loaded pipeline on first use (``prepare_modes`` builds
        every one at start-up, so no job waits for it)."""
        if mode not in self._served:
            route, loaded = self.route_for(mode)
            if route.pipeline_class is None:
                self._served[mode] = ServedMode(mode, loaded, route.source, loaded.pipeline)
            else:
                # Inpainting and outpainting run the same class on the same source: one pipeline object for both.
                key = (route.source, route.pipeline_class)
                if key not in self._derived:
                    # The ControlNet pipeline takes one module the loaded pipeline does not have.
                    extra = {"controlnet": self.controlnet} if MODES[mode].needs_controlnet else {}
                    self._derived[key] = derive_pipeline(loaded, route.pipeline_class, **extra)
                self._served[mode] = ServedMode(mode, loaded, route.pipeline_class, self._derived[key])
        return self._served[mode]

    def prepare_modes(self) -> list[ServedMode]:
        """Build every mode this endpoint can serve, once, and log what serves each and how long building took."""
        prepared = []
        for mode in Mode:
            try:
                self.route_for(mode)
            except TaskNotServedError:
                continue
            started = time.perf_counter()
            served = self.served(mode)
            log.info(
                "%s: %s on %s (built in %.0f ms)", mode.value, served.pipeline_class, served.loaded.model.model_id,
                (time.perf_counter() - started) * 1000,
            )
            prepared.append(served)
        return prepared

    def check_request(self, request: Request) -> None:
        """Refuse, before any download or GPU work, what the configured pipeline cannot do."""
        _route, loaded = self.route_for(request.mode)
        if len(request.image_urls) > 1 and not loaded.accepts_multiple_images:
            raise ValidationError(
                "images",
                f"with several images needs an Edit-Plus model (2509/2511); this endpoint serves "
                f"{loaded.model.pipeline_class}",
            )
        if loaded.fast.fused is not None and request.fast_mode is not loaded.fast.fused:
            raise FastModeUnavailableError(
                f"This endpoint serves only fast mode ({loaded.fast.fused.value}) for {request.mode.value}: its "
                "Lightning LoRA is fused into the model (LIGHTNING_FUSE=true). Send the request with "
                + ("go_fast: true." if loaded.fast.fused is FastMode.REGULAR else 'acceleration: "high".'),
                fused=loaded.fast.fused.value,
            )
        if request.fast_mode is not FastMode.NONE and not loaded.profile.lightning:
            raise FastModeUnavailableError(
                f"Fast mode ({request.fast_mode.value}) does not exist for {loaded.profile.name}: there is no "
                "Lightning LoRA for it. Send the request without go_fast/acceleration."
            )
        if request.fast_mode is not FastMode.NONE and loaded.lightning.for_mode(request.fast_mode) is None:
            variable = lightning_variable(loaded.task, request.fast_mode)
            raise FastModeUnavailableError(
                f"Fast mode ({request.fast_mode.value}) is not installed on this endpoint: its Lightning LoRA file is "
                f"not configured ({variable}). Send the request without go_fast/acceleration."
            )

    def generate(self, job: GenerationJob, on_progress: ProgressCallback | None = None) -> Generation:
        served = self.served(job.request.mode)
        loaded, pipeline = served.loaded, served.pipeline
        call = _call_arguments(served, job, on_progress)
        _note_uncompiled_size(loaded, job)
        stages = _StageClock(pipeline, self.synchronize)
        notes: list[str] = []
        with (
            _pipeline_errors(loaded, job),
            _scheduler_for(pipeline, job.request),
            # The transformer tree the job runs on, with its LoRAs (trees.py), first: the clock's hooks and batching
            # attach to the tree that runs.
            stages.lora_step(job_tree(pipeline, loaded, job.request.fast_mode, job.loras, self.lora_cache, notes)),
            stages,
            _batching(pipeline, loaded, job.request),
            torch.inference_mode(),
        ):
            output = pipeline(**call)
        note = prompt_token_note(pipeline, call["prompt"] or "", loaded.profile.max_prompt_tokens)
        spec = MODES[job.request.mode]
        images = spec.unpack(output)
        if job.request.background is not Background.TRANSPARENT and not spec.layered:
            # Qwen-Image-2.1 always decodes RGBA; unless transparency was asked for (or the mode returns layers,
            # alpha and all), deliver what a viewer shows.
            images = [flatten_alpha(image) for image in images]
        return Generation(
            images=images,
            model=loaded.model,
            num_inference_steps=job.request.num_inference_steps,
            true_cfg_scale=job.request.true_cfg_scale,
            timings_ms=stages.timings_ms(),
            notes=notes + ([note] if note else []),
            license=loaded.profile.license.name,
            lora_step=stages.lora,
        )


def _call_arguments(served: ServedMode, job: GenerationJob, on_progress: ProgressCallback | None) -> dict[str, Any]:
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
    sample_sigmas = served.loaded.pipeline.config.get("sample_sigmas")
    if sample_sigmas and len(sample_sigmas) != request.num_inference_steps:
        # A checkpoint whose model_index.json fixes a sigma grid (2.1 may) ignores num_inference_steps; the request's
        # steps are honoured with the pipeline's own default grid at that length.
        steps = request.num_inference_steps
        call["sigmas"] = np.linspace(1.0, 1 / steps, steps).tolist()
    MODES[request.mode].arguments(call, job, served.loaded.accepts_multiple_images)
    if on_progress is not None:
        total = request.denoising_steps  # with a strength, only the last part of the schedule runs

        def report(pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            on_progress(step + 1, total)
            return callback_kwargs

        call["callback_on_step_end"] = report
    return call


def _note_uncompiled_size(loaded: LoadedPipeline, job: GenerationJob) -> None:
    """Logs a job that may compile: only where no warm-up ran (the layered pipeline), for its first two lengths."""
    compiled = loaded.compiled_sizes
    if compiled is None or loaded.compiled_any_shape or (job.width, job.height) in compiled:
        return
    compiled.add((job.width, job.height))
    # The second length compiles the graph with the length dynamic, which serves every length after it.
    loaded.compiled_any_shape = len({width * height for width, height in compiled}) > 1
    log.info("size %dx%d was not warmed up: this job may compile a graph (COMPILE_WARMUP_SIZES)", job.width, job.height)


def _batching(pipeline: Any, loaded: LoadedPipeline, request: Request) -> AbstractContextManager[Any]:
    """Batched true CFG on the transformer that runs (read when entered: after a fast job's tree is swapped in)."""
    if loaded.batched_cfg and request.true_cfg_scale > 1:
        return BatchedTrueCFG(pipeline.transformer)
    return nullcontext()


@contextmanager
def _scheduler_for(pipeline: Any, request: Request) -> Iterator[None]:
    """Swap in a job-specific scheduler when one is needed, and always put the original back."""
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
        pixels = job.width * job.height * request.num_outputs
        raise GenerationError(
            f"The GPU ran out of memory generating {request.num_outputs} image(s) of {job.width}x{job.height} "
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
    """Splits one pipeline call into encode (prompt and input images), denoise and decode, and times the job's LoRA
    step before and after it (``lora_step``).

    The first transformer forward marks the start of denoising and the last one its end, so no pipeline internals
    are copied to time them. Hooks are removed when the call ends. ``synchronize``: called on both sides of the LoRA
    step's apply and remove (``PipelineRunner``'s).
    """

    def __init__(self, pipeline: Any, synchronize: Callable[[], None] | None = None) -> None:
        self.pipeline = pipeline
        self.synchronize = synchronize or (lambda: None)
        self.first_forward: float | None = None
        self.last_forward: float | None = None
        self.started = self.ended = 0.0
        self.lora: LoraStep | None = None

    @contextmanager
    def lora_step(self, step: AbstractContextManager[Tree]) -> Iterator[Tree]:
        """Enter ``step`` (``trees.job_tree``), timing its apply (entering) and its remove (leaving) apart."""
        self.synchronize()
        started = time.perf_counter()
        with step as tree:
            self.synchronize()
            applied = time.perf_counter()
            try:
                yield tree
            finally:
                leaving = time.perf_counter()
        self.synchronize()
        removed = time.perf_counter()
        self.lora = LoraStep(tree.kind, (applied - started) * 1000, (removed - leaving) * 1000)

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


def prompt_token_note(pipeline: Any, prompt: str, limit: int | None = MAX_PROMPT_TOKENS) -> str | None:
    """A note when the prompt is longer than the text encoder reads (the rest is silently cut by the pipeline).

    ``limit`` None: the pipeline reads the whole prompt (Qwen-Image-2.1), so there is nothing to say."""
    if limit is None or not prompt:
        return None
    tokens = len(pipeline.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if tokens <= limit:
        return None
    return f"the prompt is {tokens} tokens; the text encoder reads only the first {limit}"

