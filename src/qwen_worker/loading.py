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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .acceleration import AccelerationSettings, allow_graphs, apply_acceleration, warm_up
from .adapters import FastModes, fuse_lightning, resident_lightning, swapped_transformer
from .enums import FastMode, Task
from .errors import ConfigError
from .lora_slots import LoraSlots, build_slots
from .models import ResolvedModel
from .profiles import PROFILES, ModelProfile, profile_for
from .quantization import quantize_transformer

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
    runner logs a size that was not warmed up, and wraps true-CFG jobs in batched CFG.
    """

    model: ResolvedModel
    pipeline: Any  # a diffusers DiffusionPipeline subclass
    task: Task
    accepts_multiple_images: bool
    lightning: LightningFiles = field(default_factory=LightningFiles)
    fast: FastModes = field(default_factory=FastModes)  # the Lightning files, applied once (adapters.py)
    compiled_sizes: set[tuple[int, int]] | None = None  # None: not compiled; else the sizes compiled so far
    batched_cfg: bool = False
    slots: LoraSlots | None = None  # user LoRAs written in place per job (lora_slots.py); None: loaded per job

    @property
    def profile(self) -> ModelProfile:
        return profile_for(self.model.pipeline_class)


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
    """Load one pipeline folder onto ``device``. Raises ConfigError with the model id on any failure.

    Model components (transformer, text encoder, VAE) are loaded one by one so each load is timed in the log, and
    through ``pool`` so that a component already loaded for another pipeline, with identical files, is reused
    rather than loaded twice. ``lightning`` names the fast-mode LoRA files for this pipeline; they are read and
    applied now, once (``adapters.py``): a bad file stops the worker instead of failing jobs, and no job reads them.
    ``lora_slot_rank`` (LORA_SLOT_RANK) builds the LoRA slots of ``lora_slots.py``; 0 builds none.
    ``offload`` (the memory plan's, ``memory_plan.py``): ``text_encoder`` keeps the text encoder on the CPU, ``model``
    loads everything on the CPU and lets diffusers move one model at a time to the GPU.
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
    if acceleration.batched_cfg and not profile_for(model.pipeline_class).batched_cfg:
        raise ConfigError(
            f"BATCHED_CFG=true cannot serve {model.model_id} ({model.pipeline_class}): its CFG passes differ in "
            "their masks and caches, so they cannot share one batch; unset BATCHED_CFG"
        )
    pipeline_class = getattr(diffusers, model.pipeline_class)
    pool = pool or ComponentPool(share=False)

    started = time.perf_counter()
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
    # The order matters: Lightning is fused before quantizing (peft cannot merge into quantized weights); the
    # resident copies are made after it (they share the quantized weights) and before any hook or compilation.
    first_use = pool.first_use(pipeline.transformer)  # a shared transformer is configured (and compiled) once
    if lightning.fuse and not first_use:
        raise ConfigError(
            f"LIGHTNING_FUSE=true cannot merge {model.model_id}'s Lightning LoRA into a transformer another pipeline "
            "shares (identical files); set SHARE_COMPONENTS=false or serve one pipeline"
        )
    fused = fuse_lightning(pipeline, lightning.by_mode(), model.model_id) if lightning.fuse else FastModes()
    if first_use:
        quantize_transformer(pipeline.transformer, acceleration.quant, device)
    fast = fused if lightning.fuse else resident_lightning(pipeline, lightning.by_mode(), model.model_id)
    slots = build_slots(pipeline, fast, lora_slot_rank, model.model_id)
    slot_trees = slots.transformers() if slots is not None else []
    if first_use:
        apply_acceleration(pipeline.transformer, acceleration)
    for tree in [*fast.transformers(), *slot_trees]:
        apply_acceleration(tree, acceleration)
    # The layered pipeline sizes from an input image and takes no width/height, so the warm-up's sizes mean nothing
    # to it: its first job of each size compiles instead.
    warms_up = acceleration.compile and task is not Task.LAYERS
    if warms_up:
        # Each tree is its own graph: warm them all (plain, each fast mode, and each one's LoRA slot copy), so no
        # fast or LoRA job pays a compilation either.
        trees = [pipeline.transformer, *fast.transformers(), *slot_trees]
        # Per tree, a graph per warm-up size at most, and one more for a size compiled later.
        allow_graphs(len(trees) * (len(acceleration.warmup_sizes) + 1))
        for tree in trees:
            with swapped_transformer(pipeline, tree):
                warm_up(pipeline, acceleration.warmup_sizes, edit=task is Task.EDIT)
    if offload == "model" and device.type == "cuda":
        pipeline.enable_model_cpu_offload(device=device)  # last: the copies and hooks above see the CPU weights
    seconds = time.perf_counter() - started
    log.info("loaded %s (%s) on %s in %.1f s", model.model_id, model.pipeline_class, device, seconds)
    # A compiled transformer that was not warmed up (the layered pipeline) compiles each size on first use.
    compiled_sizes = (set(acceleration.warmup_sizes) if warms_up else set()) if acceleration.compile else None
    return LoadedPipeline(
        model, pipeline, task, multi_image, lightning, fast, compiled_sizes, acceleration.batched_cfg, slots
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
