"""Loading the diffusers pipelines once per process: which classes, on which device, in which dtype, sharing what.

The same code loads the tiny random-weight pipelines the tests build and the real 20B checkpoints.

- The pipeline class comes from the folder's ``model_index.json``, so Qwen-Image (and 2512), Qwen-Image-Edit,
  Qwen-Image-Edit-Plus (2509/2511) and Qwen-Image-2.1 folders all load through one path; what each serves is its
  profile (``profiles.py``).
- A pipeline with a ``processor`` (the edit pipelines' Qwen2-VL one, 2.1's Qwen3-VL one) gets its image-only
  variant (see ``processor.py``) so torchvision is never needed.
- bf16 on CUDA, float32 on CPU; ``local_files_only`` always (the hub is never contacted at run time).
- Large components go through a ``ComponentPool``, so two pipelines with identical text encoder or VAE files share
  one copy; the speed options of ``acceleration.py`` are applied here, once per transformer.

Running a loaded pipeline for a job is ``runner.py``'s business.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .acceleration import AccelerationSettings, allow_graphs, apply_acceleration, warm_up, warm_up_calls
from .adapters import FastModes, fuse_lightning, resident_lightning
from .enums import FastMode, Task
from .errors import ConfigError
from .lora_slots import LoraSlots, build_slots
from .models import ResolvedModel
from .profiles import PROFILES, ModelProfile, profile_for
from .quantization import quantize_transformer
from .trees import swapped_transformer

log = logging.getLogger(__name__)

# model_index.json class name -> (task it is loaded for, accepts several reference images), from its profile
SUPPORTED_PIPELINES: dict[str, tuple[Task, bool]] = {
    name: (profile.tasks[0], profile.max_reference_images > 1) for name, profile in PROFILES.items()
}


@dataclass(frozen=True)
class LightningFiles:
    """Lightning distillation LoRAs per task: the 8-step file (go_fast / "regular") and the 4-step one ("high")."""

    eight_step: Path | None = None
    four_step: Path | None = None
    fuse: bool = False  # LIGHTNING_FUSE: merge the one configured file into the transformer (fast-only endpoint)

    def for_mode(self, mode: FastMode) -> Path | None:
        return {FastMode.REGULAR: self.eight_step, FastMode.HIGH: self.four_step}.get(mode)

    def by_mode(self) -> dict[FastMode, Path]:
        return {mode: path for mode in (FastMode.REGULAR, FastMode.HIGH) if (path := self.for_mode(mode)) is not None}


def lightning_variable(task: Task, mode: FastMode) -> str:
    """The environment variable that names ``task``'s Lightning file for ``mode`` (LIGHTNING_EDIT_LORA_4STEP, ...)."""
    prefix = "LIGHTNING_EDIT_LORA" if task is Task.EDIT else "LIGHTNING_LORA"
    return prefix + ("_4STEP" if mode is FastMode.HIGH else "")


@dataclass
class LoadedPipeline:
    """A pipeline ready for jobs, with what the runner needs to know about it.

    ``compiled_sizes`` and ``batched_cfg`` are the two speed options (``acceleration.py``) that matter per job: the
    runner logs a job that compiles (a size not warmed up, before ``compiled_any_shape``), and wraps true-CFG jobs in
    batched CFG.
    """

    model: ResolvedModel
    pipeline: Any  # a diffusers DiffusionPipeline subclass
    task: Task
    accepts_multiple_images: bool
    lightning: LightningFiles = field(default_factory=LightningFiles)
    fast: FastModes = field(default_factory=FastModes)  # the Lightning files, applied once (adapters.py)
    compiled_sizes: set[tuple[int, int]] | None = None  # None: not compiled; else the sizes compiled so far
    # A graph that serves every image-sequence length is compiled (acceleration.warm_up_calls): no job compiles.
    compiled_any_shape: bool = False
    batched_cfg: bool = False
    slots: LoraSlots | None = None  # user LoRAs written in place per job (lora_slots.py); None: loaded per job
    startup_seconds: dict[str, float] = field(default_factory=dict)  # per preparing step (prepare_pipeline)

    @property
    def profile(self) -> ModelProfile:
        return profile_for(self.model.pipeline_class)

    def extra_trees(self) -> list[Any]:
        """The transformer trees made at start-up beside the pipeline's own: Lightning copies, then LoRA-slot copies."""
        slot_trees = self.slots.transformers() if self.slots is not None else []
        return [*self.fast.transformers(), *slot_trees]


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
    pool: ComponentPool | None = None,
    acceleration: AccelerationSettings = AccelerationSettings(),
    lora_slot_rank: int = 0,
    offload: str = "none",
) -> LoadedPipeline:
    """Load one pipeline folder onto ``device`` and prepare it for jobs: ``read_pipeline``, then
    ``prepare_pipeline``. Raises ConfigError with the model id on any failure.

    ``pool`` shares components already loaded for another pipeline with identical files. ``lightning`` names the
    fast-mode LoRA files for this pipeline; they are read and applied now, once (``adapters.py``): a bad file stops the
    worker instead of failing jobs, and no job reads them. ``lora_slot_rank`` (LORA_SLOT_RANK) builds the LoRA slots
    of ``lora_slots.py``; 0 builds none. ``offload`` (the memory plan's, ``memory_plan.py``): ``text_encoder`` keeps
    the text encoder on the CPU, ``model`` loads everything on the CPU and lets diffusers move one model at a time to
    the GPU.
    """
    check_loadable(model, lightning, acceleration)
    started = time.perf_counter()
    read = read_pipeline(model, device, pool or ComponentPool(share=False), offload)
    loaded = prepare_pipeline(read, lightning, acceleration, lora_slot_rank)
    seconds = time.perf_counter() - started
    log.info("loaded %s (%s) on %s in %.1f s", model.model_id, model.pipeline_class, device, seconds)
    return loaded


def check_loadable(model: ResolvedModel, lightning: LightningFiles, acceleration: AccelerationSettings) -> None:
    """What can be refused before a byte of the model is read. Raises ConfigError."""
    for path in (lightning.eight_step, lightning.four_step):
        if path is not None and not path.is_file():
            raise ConfigError(f"Lightning LoRA file {path} for {model.model_id} does not exist")
    if model.pipeline_class not in SUPPORTED_PIPELINES:
        raise ConfigError(
            f"Model {model.model_id} at {model.path} is a {model.pipeline_class}; this worker serves "
            + ", ".join(SUPPORTED_PIPELINES)
        )
    if acceleration.batched_cfg and not profile_for(model.pipeline_class).batched_cfg:
        raise ConfigError(
            f"BATCHED_CFG=true cannot serve {model.model_id} ({model.pipeline_class}): its CFG passes differ in "
            "their masks and caches, so they cannot share one batch; unset BATCHED_CFG"
        )


@dataclass(frozen=True)
class ReadPipeline:
    """A pipeline as read from its folder, before any preparation (``prepare_pipeline``).

    ``first_use``: its transformer is configured here (fused, quantized, compiled); False when another pipeline
    already shares it (identical files, ``ComponentPool``), which configured it once.
    """

    model: ResolvedModel
    pipeline: Any
    device: torch.device
    first_use: bool = True
    offload: str = "none"  # the memory plan's (load_pipeline)


def read_pipeline(
    model: ResolvedModel, device: torch.device, pool: ComponentPool, offload: str = "none"
) -> ReadPipeline:
    """Read ``model``'s folder onto ``device``: the pipeline class its ``model_index.json`` names, with its large
    components (transformer, text encoder, VAE) loaded one by one, so each load is timed in the log, and through
    ``pool``, so that a component already loaded for another pipeline, with identical files, is reused rather than
    loaded twice; on the CPU what the memory plan keeps there (``offload``). Raises ConfigError."""
    import diffusers

    pipeline_class = getattr(diffusers, model.pipeline_class)
    try:
        index = json.loads((model.path / "model_index.json").read_text())
        components = {
            name: pool.load(
                model, name, library, class_name, _component_device(name, device, offload), dtype_for(device)
            )
            for name, (library, class_name) in _model_components(index).items()
        }
        processor_class = _processor_class(index)
        if processor_class is not None:
            from .processor import load_processor

            components["processor"] = load_processor(model.path / "processor", processor_class)
        # Everything not passed in (tokenizer, scheduler) is small and loaded by diffusers itself.
        pipeline = pipeline_class.from_pretrained(
            model.path, dtype=dtype_for(device), local_files_only=True, **components
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ConfigError(f"Could not load model {model.model_id} from {model.path}: {err}") from err
    _place(pipeline, device, offload)
    pipeline.set_progress_bar_config(disable=True)  # tqdm bars would flood the worker's log
    return ReadPipeline(model, pipeline, device, pool.first_use(pipeline.transformer), offload)


# Called after each step of prepare_pipeline with the step's name (the GPU benchmark synchronises the device there,
# so each step's device work is counted in its own time).
StepObserver = Callable[[str], None]


def prepare_pipeline(
    read: ReadPipeline,
    lightning: LightningFiles = LightningFiles(),
    acceleration: AccelerationSettings = AccelerationSettings(),
    lora_slot_rank: int = 0,
    after_step: StepObserver | None = None,
) -> LoadedPipeline:
    """Make a read pipeline ready for jobs, in the steps of ``PREPARE_STEPS``, in their order. Raises ConfigError.

    The order matters: Lightning is fused before quantizing (peft cannot merge into quantized weights); the resident
    copies are made after it (they share the quantized weights), then the LoRA slots (on each tree), all before any
    hook or compilation (acceleration); the warm-up runs on every tree, and the memory plan's model offload comes
    last. Each step's time is logged and kept on the result (``startup_seconds``)."""
    model, pipeline = read.model, read.pipeline
    task, multi_image = SUPPORTED_PIPELINES[model.pipeline_class]
    loaded = LoadedPipeline(model, pipeline, task, multi_image, lightning, batched_cfg=acceleration.batched_cfg)
    step = _PrepareStep(read, lightning, acceleration, lora_slot_rank)
    for name, run in PREPARE_STEPS:
        started = time.perf_counter()
        run(step, loaded)
        if after_step is not None:
            after_step(name)
        loaded.startup_seconds[name] = time.perf_counter() - started
    log.info(
        "%s prepared: %s", model.model_id,
        ", ".join(f"{name} {seconds:.1f} s" for name, seconds in loaded.startup_seconds.items()),
    )  # fmt: skip
    return loaded


@dataclass(frozen=True)
class _PrepareStep:
    """What every preparing step reads: the read pipeline and the settings that shape it."""

    read: ReadPipeline
    lightning: LightningFiles
    acceleration: AccelerationSettings
    lora_slot_rank: int


def _fuse(step: _PrepareStep, loaded: LoadedPipeline) -> None:
    """LIGHTNING_FUSE: the one configured Lightning file merged into the transformer's weights."""
    if not step.lightning.fuse:
        return
    if not step.read.first_use:
        raise ConfigError(
            f"LIGHTNING_FUSE=true cannot merge {loaded.model.model_id}'s Lightning LoRA into a transformer another "
            "pipeline shares (identical files); set SHARE_COMPONENTS=false or serve one pipeline"
        )
    loaded.fast = fuse_lightning(loaded.pipeline, step.lightning.by_mode(), loaded.model.model_id)


def _quantize(step: _PrepareStep, loaded: LoadedPipeline) -> None:
    """TRANSFORMER_QUANT, once per transformer (a shared one was quantized by the pipeline that read it first)."""
    if step.read.first_use:
        quantize_transformer(loaded.pipeline.transformer, step.acceleration.quant, step.read.device)


def _resident_copies(step: _PrepareStep, loaded: LoadedPipeline) -> None:
    """Each Lightning file on its own weight-sharing copy of the transformer (unless fused)."""
    if not step.lightning.fuse:
        loaded.fast = resident_lightning(loaded.pipeline, step.lightning.by_mode(), loaded.model.model_id)


def _slots(step: _PrepareStep, loaded: LoadedPipeline) -> None:
    """LORA_SLOT_RANK: a LoRA-slot copy of every tree a job can run on."""
    loaded.slots = build_slots(loaded.pipeline, loaded.fast, step.lora_slot_rank, loaded.model.model_id)


def _accelerate(step: _PrepareStep, loaded: LoadedPipeline) -> None:
    """The speed options on every tree (the pipeline's own transformer only once, when shared)."""
    if step.read.first_use:
        apply_acceleration(loaded.pipeline.transformer, step.acceleration)
    for tree in loaded.extra_trees():
        apply_acceleration(tree, step.acceleration)


def _warm_up(step: _PrepareStep, loaded: LoadedPipeline) -> None:
    """COMPILE=regional: every tree compiled at the warm-up sizes, so no job pays a compilation."""
    acceleration = step.acceleration
    if not acceleration.compile:
        return
    # The layered pipeline sizes from an input image and takes no width/height, so the warm-up's sizes mean nothing
    # to it: its first jobs compile instead (it counts as compiled, with no size warmed up; runner.py logs them).
    if loaded.task is Task.LAYERS:
        loaded.compiled_sizes = set()
        return
    # Each tree is its own graph: warm them all (plain, each fast mode, and each one's LoRA slot copy), so no
    # fast or LoRA job pays a compilation either.
    trees = [loaded.pipeline.transformer, *loaded.extra_trees()]
    profile = loaded.profile
    calls = warm_up_calls(
        acceleration.warmup_sizes, draws=Task.TEXT_TO_IMAGE in profile.tasks, references=profile.max_reference_images
    )
    # Per tree, a graph per warm-up call at most, and one spare for a shape dynamo still tells apart.
    allow_graphs(len(trees) * (len(calls) + 1))
    for tree in trees:
        with swapped_transformer(loaded.pipeline, tree):
            warm_up(loaded.pipeline, calls)
    loaded.compiled_sizes = set(acceleration.warmup_sizes)
    loaded.compiled_any_shape = True  # warm_up_calls ends with a second sequence length: the dynamic graph


def _offload(step: _PrepareStep, loaded: LoadedPipeline) -> None:
    """The memory plan's model offload, last: the copies and hooks above see the CPU weights."""
    if step.read.offload == "model" and step.read.device.type == "cuda":
        loaded.pipeline.enable_model_cpu_offload(device=step.read.device)


# The preparing steps, in the order they must run (prepare_pipeline's docstring says why).
PREPARE_STEPS: tuple[tuple[str, Callable[[_PrepareStep, LoadedPipeline], None]], ...] = (
    ("fuse", _fuse),
    ("quantize", _quantize),
    ("resident_copies", _resident_copies),
    ("slots", _slots),
    ("acceleration", _accelerate),
    ("warm_up", _warm_up),
    ("offload", _offload),
)


def _component_device(name: str, device: torch.device, offload: str) -> torch.device:
    """Where a component is loaded: the CPU when the memory plan keeps it (or, with model offload, all) there."""
    if offload == "model" or (offload == "text_encoder" and name == "text_encoder"):
        return torch.device("cpu")
    return device


def _place(pipeline: Any, device: torch.device, offload: str) -> None:
    """Move the pipeline's modules to ``device``, but for what the memory plan keeps on the CPU.

    ``text_encoder``: the text encoder stays on the CPU behind accelerate's ``AlignDevicesHook``, which runs it
    there and hands its outputs back on the device of its inputs (the pipeline's execution device). ``model``:
    nothing moves now (``enable_model_cpu_offload`` moves each model in when it runs)."""
    if offload == "model":
        return
    if offload != "text_encoder" or getattr(pipeline, "text_encoder", None) is None:
        pipeline.to(device)  # a no-op for components already there; moves nothing large twice
        return
    for name, module in pipeline.components.items():
        if isinstance(module, torch.nn.Module) and name != "text_encoder":
            module.to(device)
    # The pipeline's execution device (where prompts are tokenized to and latents made) stays the GPU's: diffusers
    # takes it from the first module of its components, the VAE in every Qwen-Image pipeline, which has no hook.
    encoder = pipeline.text_encoder
    if not hasattr(encoder, "_hf_hook"):  # a text encoder two pipelines share is hooked once
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module

        add_hook_to_module(encoder, AlignDevicesHook(execution_device=torch.device("cpu"), io_same_device=True))
        log.info("text encoder kept on the CPU (memory plan)")


def derive_pipeline(loaded: LoadedPipeline, class_name: str, **extra_modules: Any) -> Any:
    """A pipeline of another class built on ``loaded``'s components (``from_pipe``): the same transformer, text
    encoder, VAE, tokenizer, scheduler and, for the edit pipelines, the image-only processor (``processor.py``):
    the same objects, so it costs no memory, and speed options, LoRAs and scheduler swaps reach it as they reach
    ``loaded``. Building one takes milliseconds. ``extra_modules``: components the derived class has and the loaded
    one lacks (the ControlNet module).
    """
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    pipeline_class = getattr(diffusers, class_name)
    # from_pipe casts every module to its dtype argument, float32 when none is given: on the GPU that would turn the
    # loaded bf16 weights (shared, so the loaded pipeline's too) into float32, twice the memory. Passing the dtype
    # they already have makes the cast a no-op, which diffusers still warns about once per module: quieted here.
    dtype = loaded.pipeline.transformer.dtype
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipeline = pipeline_class.from_pipe(loaded.pipeline, dtype=dtype, **extra_modules)
    finally:
        diffusers_logging.set_verbosity(level)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


CONTROLNET_CLASS = "QwenImageControlNetModel"


def load_controlnet(folder: Path, model_id: str, device: torch.device) -> Any:
    """Load a Qwen-Image ControlNet (a diffusers model folder whose config.json names QwenImageControlNetModel)."""
    import diffusers

    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name") != CONTROLNET_CLASS:
        raise ConfigError(
            f"QWEN_IMAGE_CONTROLNET_MODEL={model_id} is a {config.get('_class_name')}, not a {CONTROLNET_CLASS}"
        )
    started = time.perf_counter()
    try:
        module = diffusers.QwenImageControlNetModel.from_pretrained(
            folder, dtype=dtype_for(device), local_files_only=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ConfigError(f"Could not load ControlNet {model_id} from {folder}: {err}") from err
    module.to(device).eval()
    log.info("loaded ControlNet %s on %s in %.1f s", model_id, device, time.perf_counter() - started)
    return module


# The components worth timing one by one and sharing between pipelines: the large torch modules.
MODEL_COMPONENT_NAMES = ("transformer", "text_encoder", "vae")


def _processor_class(index: Mapping[str, Any]) -> str | None:
    """The processor class model_index.json names (Qwen2VLProcessor, Qwen3VLProcessor), or None without one."""
    entry = index.get("processor")
    if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str):
        return entry[1]
    return None


def _model_components(index: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """The large components model_index.json names, as (library, class name)."""
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

    def load(
        self, model: ResolvedModel, name: str, library: str, class_name: str, device: torch.device,
        dtype: torch.dtype | None = None,
    ) -> Any:
        """The component, from the pool or loaded on ``device`` in ``dtype`` (default: the device's own)."""
        folder = model.path / name
        if self.share:
            for loaded_class, loaded_folder, module in self._loaded:
                if loaded_class == class_name and self._same_files(loaded_folder, folder):
                    log.info("%s: %s shared with the identical %s", model.model_id, name, loaded_folder)
                    return module
        started = time.perf_counter()
        component_class = getattr(importlib.import_module(library), class_name)
        kwargs: dict[str, Any] = {"dtype": dtype or dtype_for(device), "local_files_only": True}
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
    return _file_sha256(target)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
