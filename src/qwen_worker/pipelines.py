"""Loading the diffusers pipelines once per process and running them for a request.

Knows nothing of HTTP, S3 or JSON: it takes a validated ``Request`` plus decoded input images and returns PIL images.
The same code runs the tiny random-weight pipelines the tests build and the real 20B checkpoints.

- The pipeline class comes from the folder's ``model_index.json``, so Qwen-Image, Qwen-Image-Edit and
  Qwen-Image-Edit-Plus (2509/2511) folders all load through one path.
- Edit pipelines get an image-only Qwen2-VL processor (see ``processor.py``) so torchvision is never needed.
- bf16 on CUDA, float32 on CPU; ``local_files_only`` always (the hub is never contacted at run time).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .acceleration import AccelerationSettings, BatchedTrueCFG, apply_acceleration, warm_up
from .errors import ConfigError, GenerationError, TaskNotServedError, ValidationError
from .loras import applied_loras
from .models import ResolvedModel
from .schema import FastMode, Request, Task

log = logging.getLogger(__name__)

# model_index.json class name -> (task it serves, accepts several reference images)
SUPPORTED_PIPELINES: dict[str, tuple[Task, bool]] = {
    "QwenImagePipeline": (Task.TEXT_TO_IMAGE, False),
    "QwenImageEditPipeline": (Task.EDIT, False),
    "QwenImageEditPlusPipeline": (Task.EDIT, True),
}

# The pipelines' max_sequence_length default: prompt embeddings past this many tokens are dropped.
MAX_PROMPT_TOKENS = 512

# The model card's advice: with no negative prompt, still run true CFG against a single space.
EMPTY_NEGATIVE_PROMPT = " "

ProgressCallback = Callable[[int, int], None]  # (steps done, total steps)


# The Lightning authors' scheduler: shift fixed at ln 3 whatever the resolution, no terminal shift.
LIGHTNING_SCHEDULER_OVERRIDES: dict[str, Any] = {"base_shift": math.log(3), "max_shift": math.log(3), "shift_terminal": None}


@dataclass(frozen=True)
class LightningFiles:
    """Lightning distillation LoRAs per task: the 8-step file (go_fast / "regular") and the 4-step one ("high")."""

    eight_step: Path | None = None
    four_step: Path | None = None

    def for_mode(self, mode: FastMode) -> Path | None:
        return {FastMode.REGULAR: self.eight_step, FastMode.HIGH: self.four_step}.get(mode)


@dataclass
class LoadedPipeline:
    model: ResolvedModel
    pipeline: Any  # a diffusers DiffusionPipeline subclass
    task: Task
    accepts_multiple_images: bool
    load_seconds: float
    lightning: LightningFiles = field(default_factory=LightningFiles)
    compiled_sizes: set[tuple[int, int]] | None = None  # None: not compiled
    batched_cfg: bool = False


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


def select_device(require_cuda: bool) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if require_cuda:
        raise ConfigError(
            "REQUIRE_CUDA is set but no CUDA device is visible: refusing to run a 20B model on the CPU. "
            "Check the endpoint's GPU type and the CUDA driver, or unset REQUIRE_CUDA for a CPU run."
        )
    return torch.device("cpu")


def dtype_for(device: torch.device) -> torch.dtype:
    # bf16 is the checkpoints' own dtype; CPUs run it slowly and inexactly, so the CPU gets float32.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_pipeline(
    model: ResolvedModel,
    device: torch.device,
    lightning: LightningFiles = LightningFiles(),
    pool: "ComponentPool | None" = None,
    acceleration: AccelerationSettings = AccelerationSettings(),
) -> LoadedPipeline:
    """Load one pipeline folder onto ``device``. Raises ConfigError with the model id on any failure.

    Model components (transformer, text encoder, VAE) are loaded one by one so each load is timed in the log, and
    through ``pool`` so that a component already loaded for another pipeline, with identical files, is reused
    rather than loaded twice. ``lightning`` names the fast-mode LoRA files for this pipeline; they are checked now
    (a typo in the configuration should stop the worker, not fail jobs) and applied per job.
    """
    import diffusers

    for path in (lightning.eight_step, lightning.four_step):
        if path is not None and not path.is_file():
            raise ConfigError(f"Lightning LoRA file {path} for {model.model_id} does not exist")
    if model.pipeline_class not in SUPPORTED_PIPELINES:
        raise ConfigError(
            f"Model {model.model_id} at {model.path} is a {model.pipeline_class}; this worker serves "
            + ", ".join(SUPPORTED_PIPELINES)
        )
    task, multi_image = SUPPORTED_PIPELINES[model.pipeline_class]
    pipeline_class = getattr(diffusers, model.pipeline_class)
    pool = pool or ComponentPool(share=False)

    started = time.perf_counter()
    try:
        components = {
            name: pool.load(model, name, library, class_name, device)
            for name, (library, class_name) in _model_components(model.path).items()
        }
        if task is Task.EDIT:
            from .processor import load_processor

            components["processor"] = load_processor(model.path / "processor")
        # Everything not passed in (tokenizer, scheduler) is small and loaded by diffusers itself.
        pipeline = pipeline_class.from_pretrained(
            model.path, dtype=dtype_for(device), local_files_only=True, **components
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ConfigError(f"Could not load model {model.model_id} from {model.path}: {err}") from err
    pipeline.to(device)  # a no-op for components already there; moves nothing large twice
    pipeline.set_progress_bar_config(disable=True)  # tqdm bars would flood the worker's log
    if pool.first_use(pipeline.transformer):  # a shared transformer is configured (and compiled) once
        apply_acceleration(pipeline.transformer, acceleration)
    if acceleration.compile:
        warm_up(pipeline, acceleration.warmup_sizes, edit=task is Task.EDIT)
    seconds = time.perf_counter() - started
    log.info("loaded %s (%s) on %s in %.1f s", model.model_id, model.pipeline_class, device, seconds)
    compiled_sizes = set(acceleration.warmup_sizes) if acceleration.compile else None
    return LoadedPipeline(
        model, pipeline, task, multi_image, seconds, lightning, compiled_sizes, acceleration.batched_cfg
    )


# The components worth timing one by one and sharing between pipelines: the large torch modules.
MODEL_COMPONENT_NAMES = ("transformer", "text_encoder", "vae")


def _model_components(folder: Path) -> dict[str, tuple[str, str]]:
    index = json.loads((folder / "model_index.json").read_text())
    return {
        name: (entry[0], entry[1])
        for name, entry in index.items()
        if name in MODEL_COMPONENT_NAMES and isinstance(entry, list) and len(entry) == 2 and entry[0]
    }


class ComponentPool:
    """Model components loaded in this process, so a second pipeline reuses identical ones instead of a second copy.

    Qwen-Image and Qwen-Image-Edit ship the same Qwen2.5-VL text encoder and VAE (about 17 GB in bf16). Identity is
    checked, never assumed: two component folders match when they hold the same files with the same content. In a
    Hugging Face cache each file links to a blob named by its content hash, so comparing blob names is free; plain
    folders are hashed, and only when the file names and sizes already match.
    """

    def __init__(self, share: bool = True) -> None:
        self.share = share
        self._loaded: list[tuple[str, Path, Any]] = []  # (class name, folder, module)
        self._fingerprints: dict[Path, str] = {}
        self._configured: set[int] = set()

    def first_use(self, module: Any) -> bool:
        """True the first time a module is seen: per-module set-up must not run twice on a shared one."""
        if id(module) in self._configured:
            return False
        self._configured.add(id(module))
        return True

    def load(self, model: ResolvedModel, name: str, library: str, class_name: str, device: torch.device) -> Any:
        folder = model.path / name
        if self.share:
            for loaded_class, loaded_folder, module in self._loaded:
                if loaded_class == class_name and self._same_files(loaded_folder, folder):
                    log.info("%s: %s shared with the already loaded %s (identical files)", model.model_id, name, loaded_folder)
                    return module
        started = time.perf_counter()
        component_class = getattr(importlib.import_module(library), class_name)
        kwargs: dict[str, Any] = {"dtype": dtype_for(device), "local_files_only": True}
        if device.type == "cuda":
            kwargs["device_map"] = "cuda"  # load shards straight onto the GPU, skipping a CPU copy
        module = component_class.from_pretrained(folder, **kwargs)
        if device.type != "cuda":
            module.to(device)
        log.info("%s: loaded %s (%s) in %.1f s", model.model_id, name, class_name, time.perf_counter() - started)
        self._loaded.append((class_name, folder, module))
        return module

    def _same_files(self, first: Path, second: Path) -> bool:
        if first.resolve() == second.resolve():
            return True
        if _listing(first) != _listing(second):  # names and sizes: cheap, and settles most differences
            return False
        return self._fingerprint(first) == self._fingerprint(second)

    def _fingerprint(self, folder: Path) -> str:
        if folder not in self._fingerprints:
            digest = hashlib.sha256()
            for relative, _size in _listing(folder):
                digest.update(relative.encode() + b"\0" + _content_id(folder / relative).encode() + b"\0")
            self._fingerprints[folder] = digest.hexdigest()
        return self._fingerprints[folder]


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(path.relative_to(folder)), path.stat().st_size) for path in folder.rglob("*") if path.is_file())


def _content_id(path: Path) -> str:
    """A file's content hash: the blob name when it links into a Hugging Face cache, else its sha256."""
    target = path.resolve()
    if path.is_symlink() and target.parent.name == "blobs":
        return target.name
    digest = hashlib.sha256()
    with open(target, "rb") as handle:
        for chunk in iter(lambda: handle.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class PipelineRunner:
    """Holds the loaded pipelines (at most one per task) and runs jobs on them, one at a time."""

    def __init__(self, pipelines: Sequence[LoadedPipeline], device: torch.device) -> None:
        self.device = device
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
        if request.fast_mode is not FastMode.NONE and loaded.lightning.for_mode(request.fast_mode) is None:
            variable = _lightning_variable(request.task, request.fast_mode)
            raise TaskNotServedError(
                f"Fast mode ({request.fast_mode.value}) is not installed on this endpoint: its Lightning LoRA file is "
                f"not configured ({variable}). Send the request without go_fast/acceleration."
            )

    def generate(self, job: GenerationJob, on_progress: ProgressCallback | None = None) -> Generation:
        request = job.request
        loaded = self.pipeline_for(request.task)
        pipeline = loaded.pipeline
        call: dict[str, Any] = {
            "prompt": request.effective_prompt,
            "negative_prompt": request.negative_prompt or EMPTY_NEGATIVE_PROMPT,
            "true_cfg_scale": request.true_cfg_scale,
            "num_inference_steps": request.num_inference_steps,
            "num_images_per_prompt": request.num_images,
            "width": job.width,
            "height": job.height,
            # One CPU generator per image: image i is the image seed+i would give alone, on any device.
            "generator": [torch.Generator(device="cpu").manual_seed(seed) for seed in request.seeds],
            "output_type": "pil",
        }
        if request.true_cfg_scale <= 1.0:
            call["negative_prompt"] = None  # no true CFG: skip the second (negative) transformer pass entirely
        if request.task is Task.EDIT:
            call["image"] = list(job.inputs) if loaded.accepts_multiple_images else job.inputs[0]
        if on_progress is not None:
            total = request.num_inference_steps

            def report(pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
                on_progress(step + 1, total)
                return callback_kwargs

            call["callback_on_step_end"] = report

        if loaded.compiled_sizes is not None and (job.width, job.height) not in loaded.compiled_sizes:
            loaded.compiled_sizes.add((job.width, job.height))
            log.info("size %dx%d was not warmed up: this job compiles it (COMPILE_WARMUP_SIZES)", job.width, job.height)
        loras = list(job.loras)
        lightning = loaded.lightning.for_mode(request.fast_mode)
        if lightning is not None:
            loras.insert(0, (lightning, 1.0))
        stages = _StageClock(pipeline.transformer)
        batching = BatchedTrueCFG(pipeline.transformer) if loaded.batched_cfg and request.true_cfg_scale > 1 else nullcontext()
        try:
            with self._scheduler_for(loaded, request), applied_loras(pipeline, loras), stages, batching:
                with torch.inference_mode():
                    output = pipeline(**call)
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
        return Generation(
            images=list(output.images),
            model=loaded.model,
            num_inference_steps=request.num_inference_steps,
            true_cfg_scale=request.true_cfg_scale,
            timings_ms=stages.timings_ms(),
            notes=[note for note in (prompt_token_note(pipeline, call["prompt"]),) if note],
        )

    @contextmanager
    def _scheduler_for(self, loaded: LoadedPipeline, request: Request) -> Iterator[None]:
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


class _StageClock:
    """Splits one pipeline call into encode (prompt and input images), denoise and decode.

    The first transformer forward marks the start of denoising and the last one its end, so no pipeline internals
    are copied to time them. Hooks are removed when the call ends.
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer
        self.first_forward: float | None = None
        self.last_forward: float | None = None

    def __enter__(self) -> "_StageClock":
        self.started = time.perf_counter()
        self._hooks = [
            self.transformer.register_forward_pre_hook(self._before),
            self.transformer.register_forward_hook(self._after),
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
