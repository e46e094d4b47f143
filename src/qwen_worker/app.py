"""The composition root: read the environment, load models once, wire the worker.

``handler.py`` calls ``create_worker``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .config import Settings
from .errors import ConfigError
from .loading import (
    ComponentPool,
    LightningFiles,
    dtype_for,
    lightning_variable,
    load_controlnet,
    load_pipeline,
    select_device,
)
from .lora_files import LoraStore, PreparedLoraCache
from .memory_plan import GB, MemoryReport, Setup, make_report, pipeline_setup
from .models import ResolvedFolder, ResolvedModel, parse_repo_file, resolve_folder, resolve_model, resolve_repo_file
from .profiles import PROFILES, check_license, check_lightning, profile_for
from .progress import StepProgress, runpod_sender
from .quantization import FP8_MIN_CAPABILITY
from .runner import PipelineRunner
from .safety import SafetyChecker
from .schema import Task
from .storage import InlineStore, LocalDirectoryStore, ResultStore, S3Store
from .worker import SafetyPolicy, Worker

log = logging.getLogger("qwen_worker")


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    # The SDK's own default is DEBUG, which logs every job's whole output (base64 images included).
    from .runpod_sdk import RunPodLogger

    RunPodLogger().set_level(settings.runpod_log_level)


def build_store(settings: Settings) -> ResultStore:
    """The configured store: a bucket, else a local directory, else inline data URIs."""
    if settings.bucket is not None:
        s3 = S3Store(settings.bucket)
        warning = s3.check()
        if warning:
            log.warning("storage check at start-up failed: %s. Jobs will fail until it is fixed.", warning)
        return s3
    if settings.local_output_dir is not None:
        return LocalDirectoryStore(settings.local_output_dir)
    return InlineStore(settings.max_inline_bytes)


def _safety_folder(settings: Settings) -> ResolvedFolder:
    return resolve_folder(
        settings.safety_checker_model,
        volume_path=settings.volume_path,
        baked_cache=settings.hf_hub_cache,
        required_file="config.json",
        what="safety checker (SAFETY_CHECKER_MODEL; set SAFETY_CHECKER=off to run without one)",
    )


def _controlnet_folder(settings: Settings) -> ResolvedFolder:
    return resolve_folder(
        settings.controlnet_model or "",
        volume_path=settings.volume_path,
        baked_cache=settings.hf_hub_cache,
        required_file="config.json",
        what="ControlNet (QWEN_IMAGE_CONTROLNET_MODEL)",
    )


def build_safety(settings: Settings, device: torch.device) -> SafetyPolicy:
    if settings.safety_checker == "off":
        log.warning("safety checker disabled by operator (SAFETY_CHECKER=off)")
        return SafetyPolicy(checker=None, mode="off")
    checker = SafetyChecker.load(_safety_folder(settings).path, device, dtype_for(device))
    return SafetyPolicy(checker=checker, mode=settings.safety_checker, check_inputs=settings.safety_check_inputs)


def lightning_file(settings: Settings, value: Path | None, variable: str) -> Path | None:
    """A Lightning variable's file: a local path as given, or ``org/name:file`` found offline in the model caches
    (where ``builder/fetch_models.py --models lightning-8step`` puts it). Raises ConfigError naming the variable."""
    if value is None or value.exists() or parse_repo_file(str(value)) is None:
        return value
    what = f"Lightning LoRA ({variable})"
    return resolve_repo_file(str(value), volume_path=settings.volume_path, baked_cache=settings.hf_hub_cache, what=what)


@dataclass(frozen=True)
class ConfiguredPipeline:
    """A pipeline the settings ask for, found on disk and checked, not loaded yet."""

    model: ResolvedModel
    task: Task
    variable: str


def configured_pipelines(settings: Settings, problems: list[str] | None = None) -> list[ConfiguredPipeline]:
    """Resolve the configured models (offline) and refuse what must not be served, before any weight is loaded.

    Raises ConfigError at the first problem; with ``problems`` (the deploy check) each model's problem is appended
    there instead, and that model left out."""
    try:
        lightning = lightning_files(settings)
    except ConfigError as err:
        if problems is None:
            raise
        problems.append(str(err))
        return []
    found = []
    for spec, task, variable in (
        (settings.t2i_model, Task.TEXT_TO_IMAGE, "QWEN_IMAGE_MODEL"),
        (settings.edit_model, Task.EDIT, "QWEN_IMAGE_EDIT_MODEL"),
        (settings.layered_model, Task.LAYERS, "QWEN_IMAGE_LAYERED_MODEL"),
    ):
        if spec is None:
            continue
        try:
            found.append(_configured(settings, spec, task, variable, lightning))
        except ConfigError as err:
            if problems is None:
                raise
            problems.append(str(err))
    return found


def _configured(
    settings: Settings, spec: str, task: Task, variable: str, lightning: dict[Task, LightningFiles]
) -> ConfiguredPipeline:
    model = resolve_model(spec, volume_path=settings.volume_path, baked_cache=settings.hf_hub_cache, variable=variable)
    if model.pipeline_class in PROFILES:  # an unknown class is refused by load_pipeline, naming the known ones
        # Before any weight is loaded: a research-only model is not served until its licence is accepted.
        profile = profile_for(model.pipeline_class)
        check_license(profile, spec, variable, settings.accept_research_license)
        # The Lightning files that would apply to this model: its task's, and the edits' when it serves those too
        # because no edit model is configured (2.1).
        variables = [lightning_variable(each, mode) for each in _tasks(settings, task, profile.tasks)
                     for mode in lightning[each].by_mode()]  # fmt: skip
        check_lightning(profile, spec, variable, variables)
    return ConfiguredPipeline(model, task, variable)


def _tasks(settings: Settings, task: Task, served: tuple[Task, ...]) -> list[Task]:
    if task is Task.TEXT_TO_IMAGE and settings.edit_model is None and Task.EDIT in served:
        return [task, Task.EDIT]
    return [task]


def lightning_files(settings: Settings) -> dict[Task, LightningFiles]:
    """The Lightning files per task, each found (``lightning_file``). Raises ConfigError naming the variable."""
    fuse = settings.lightning_fuse
    return {
        Task.TEXT_TO_IMAGE: LightningFiles(
            lightning_file(settings, settings.lightning_lora, "LIGHTNING_LORA"),
            lightning_file(settings, settings.lightning_lora_4step, "LIGHTNING_LORA_4STEP"),
            fuse,
        ),
        Task.EDIT: LightningFiles(
            lightning_file(settings, settings.lightning_edit_lora, "LIGHTNING_EDIT_LORA"),
            lightning_file(settings, settings.lightning_edit_lora_4step, "LIGHTNING_EDIT_LORA_4STEP"),
            fuse,
        ),
        Task.LAYERS: LightningFiles(),  # no Lightning LoRA exists for Qwen-Image-Layered
    }


def memory_setup(settings: Settings, pipelines: list[ConfiguredPipeline]) -> Setup:
    """What the memory plan adds up for these settings (memory_plan.py). Raises ConfigError for a missing folder."""
    lightning = lightning_files(settings)
    setups = []
    for each in pipelines:
        files = lightning[each.task]
        resident = [] if files.fuse else [path for path in (files.eight_step, files.four_step) if path is not None]
        served = PROFILES[each.model.pipeline_class].tasks if each.model.pipeline_class in PROFILES else ()
        serves_edits = Task.EDIT in _tasks(settings, each.task, served)
        setups.append(pipeline_setup(each.model, each.variable, resident, serves_edits=serves_edits))
    controlnet = None
    if settings.controlnet_model is not None:
        controlnet = _controlnet_folder(settings).path
    safety = None
    if settings.safety_checker != "off":
        safety = _safety_folder(settings).path
    return Setup(setups, controlnet, safety, settings.lora_slot_rank, settings.share_components,
                 settings.acceleration.batched_cfg)


def offload_blockers(settings: Settings) -> list[str]:
    """What model CPU offload cannot serve: trees that share the offloaded transformer's weights, and compilation."""
    blockers = []
    resident = [settings.lightning_lora, settings.lightning_lora_4step, settings.lightning_edit_lora,
                settings.lightning_edit_lora_4step]  # fmt: skip
    if not settings.lightning_fuse and any(value is not None for value in resident):
        blockers.append("the resident Lightning copies share the transformer's weights (set LIGHTNING_FUSE=true)")
    if settings.acceleration.compile:
        blockers.append("COMPILE=regional compiles GPU-resident blocks")
    return blockers


def gpu_memory(settings: Settings, device: torch.device) -> tuple[int | None, str, bool]:
    """Bytes to plan against, where that number comes from, and whether fp8 is supported there."""
    fp8 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY
    if settings.memory_plan_gpu_gb is not None:
        return int(settings.memory_plan_gpu_gb * GB), "MEMORY_PLAN_GPU_GB", fp8
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free, f"free of {total / GB:.1f} GB on {torch.cuda.get_device_name(device)}", fp8
    return None, "no GPU: nothing to compare with (MEMORY_PLAN_GPU_GB plans against a size)", fp8


def plan_memory(settings: Settings, pipelines: list[ConfiguredPipeline], device: torch.device) -> MemoryReport:
    """The memory plan for these settings on ``device`` (memory_plan.py); ConfigError when it does not fit."""
    available, source, fp8 = gpu_memory(settings, device)
    report = make_report(
        memory_setup(settings, pipelines),
        element_bytes=dtype_for(device).itemsize,
        available=available,
        available_source=source,
        mode=settings.memory_plan,
        configured_quant=settings.acceleration.quant,
        fp8_supported=fp8,
        offload_blockers=offload_blockers(settings),
    )
    log.info("%s", report.describe())
    if not report.fits:
        raise ConfigError(report.failure())
    return report


def build_worker(settings: Settings) -> Worker:
    """Resolve and load the configured models (once per process) and wire the worker. Raises ConfigError."""
    device = select_device(settings.require_cuda)
    pipelines = configured_pipelines(settings)
    report = plan_memory(settings, pipelines, device)
    plan = report.chosen or report.configured
    notes = [note] if (note := report.note()) else []
    if notes:
        log.warning("%s", notes[0])
    acceleration = replace(settings.acceleration, quant=plan.quant)
    # Model CPU offload moves the transformer in and out: no slot copies beside it (LoRAs are loaded per job).
    slot_rank = 0 if plan.offload == "model" else settings.lora_slot_rank
    lightning = lightning_files(settings)
    pool = ComponentPool(share=settings.share_components)
    loaded = [
        load_pipeline(each.model, device, lightning[each.task], pool, acceleration, slot_rank, plan.offload)
        for each in pipelines
    ]
    safety = build_safety(settings, device)
    store = build_store(settings)
    log.info("results go to %s", store.description)
    prepared_loras = PreparedLoraCache(settings.lora_memory_cache_bytes)
    loras = LoraStore(
        settings.lora_cache_dir,
        settings.lora_cache_max_bytes,
        settings.lora_max_bytes,
        settings.volume_path,
        settings.image_fetch_timeout_seconds,
        prepared=prepared_loras,
        baked_cache=settings.hf_hub_cache,
    )
    sender = runpod_sender() if settings.report_progress else None
    controlnet = None
    if settings.controlnet_model is not None:
        controlnet = load_controlnet(_controlnet_folder(settings).path, settings.controlnet_model, device)
    runner = PipelineRunner(loaded, device, lora_cache=prepared_loras, controlnet=controlnet)
    # The modes built on the loaded pipelines (image-to-image, inpainting, ...): from_pipe shares every module, so
    # this takes milliseconds and no memory, and no mode's first job waits for it.
    runner.prepare_modes()
    return Worker(
        settings,
        runner,
        store,
        notes=notes,
        loras=loras,
        safety=safety,
        progress=(lambda job: StepProgress(job, sender)) if sender else (lambda job: None),
    )


class StartupFailure:
    """Stands in for the worker when it could not start: every job is answered FAILED with the start-up error.

    Exiting instead would make Runpod restart the container again and again while jobs wait in the queue and the
    caller sees nothing; answering each job tells the caller (and the operator, in the job's error) what to fix.
    Runpod's own vLLM worker does the same. In the SDK's local test mode a FAILED job still ends the run non-zero.
    """

    def __init__(self, reason: str) -> None:
        self.message = f"The worker could not start: {reason}"

    def handle(self, job: Mapping[str, Any]) -> dict[str, Any]:
        return {"error": self.message}


def create_worker() -> Worker | StartupFailure:
    """Read the environment, load the models and return a ready worker, or a StartupFailure that says why not."""
    try:
        settings = Settings.from_env()
        configure_logging(settings)
        return build_worker(settings)
    except ConfigError as err:
        reason = str(err)
    except Exception as err:  # loading can fail in ways no check foresaw (a corrupt shard, a driver fault)
        logging.basicConfig(stream=sys.stdout, level=logging.INFO)  # a no-op when configure_logging already ran
        log.exception("loading the models failed")
        reason = f"loading the models failed ({type(err).__name__}: {str(err)[:300]})"
    logging.basicConfig(stream=sys.stdout, level=logging.INFO)
    log.error("the worker cannot start: %s. Every job will fail with this message until it is fixed.", reason)
    return StartupFailure(reason)
