"""The composition root: read the environment, load models once, wire the worker.

``handler.py`` calls ``create_worker``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import Settings
from .errors import ConfigError
from .loading import (
    ComponentPool,
    LightningFiles,
    LoadedPipeline,
    dtype_for,
    lightning_variable,
    load_controlnet,
    load_pipeline,
    select_device,
)
from .loras import LoraStore, PreparedLoraCache
from .models import parse_repo_file, resolve_folder, resolve_model, resolve_repo_file
from .profiles import PROFILES, check_license, check_lightning, profile_for
from .progress import StepProgress, runpod_sender
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
    from runpod.serverless.modules.rp_logger import RunPodLogger

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


def build_safety(settings: Settings, device: torch.device) -> SafetyPolicy:
    if settings.safety_checker == "off":
        log.warning("safety checker disabled by operator (SAFETY_CHECKER=off)")
        return SafetyPolicy(checker=None, mode="off")
    folder = resolve_folder(
        settings.safety_checker_model,
        volume_path=settings.volume_path,
        baked_cache=settings.hf_hub_cache,
        required_file="config.json",
        what="safety checker (SAFETY_CHECKER_MODEL; set SAFETY_CHECKER=off to run without one)",
    )
    checker = SafetyChecker.load(folder.path, device, dtype_for(device))
    return SafetyPolicy(checker=checker, mode=settings.safety_checker, check_inputs=settings.safety_check_inputs)


def lightning_file(settings: Settings, value: Path | None, variable: str) -> Path | None:
    """A Lightning variable's file: a local path as given, or ``org/name:file`` found offline in the model caches
    (where ``builder/fetch_models.py --models lightning-8step`` puts it). Raises ConfigError naming the variable."""
    if value is None or value.exists() or parse_repo_file(str(value)) is None:
        return value
    what = f"Lightning LoRA ({variable})"
    return resolve_repo_file(str(value), volume_path=settings.volume_path, baked_cache=settings.hf_hub_cache, what=what)


def build_worker(settings: Settings) -> Worker:
    """Resolve and load the configured models (once per process) and wire the worker. Raises ConfigError."""
    device = select_device(settings.require_cuda)
    loaded: list[LoadedPipeline] = []
    fuse = settings.lightning_fuse
    lightning = {
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
    pool = ComponentPool(share=settings.share_components)
    for spec, task, variable in (
        (settings.t2i_model, Task.TEXT_TO_IMAGE, "QWEN_IMAGE_MODEL"),
        (settings.edit_model, Task.EDIT, "QWEN_IMAGE_EDIT_MODEL"),
        (settings.layered_model, Task.LAYERS, "QWEN_IMAGE_LAYERED_MODEL"),
    ):
        if spec is None:
            continue
        model = resolve_model(
            spec, volume_path=settings.volume_path, baked_cache=settings.hf_hub_cache, variable=variable
        )
        if model.pipeline_class in PROFILES:  # an unknown class is refused by load_pipeline, naming the known ones
            # Before any weight is loaded: a research-only model is not served until its licence is accepted.
            profile = profile_for(model.pipeline_class)
            check_license(profile, spec, variable, settings.accept_research_license)
            # The Lightning files that would apply to this model: its task's, and the edits' when it serves those
            # too because no edit model is configured (2.1).
            tasks = [task]
            if task is Task.TEXT_TO_IMAGE and settings.edit_model is None and Task.EDIT in profile.tasks:
                tasks.append(Task.EDIT)
            variables = [lightning_variable(each, mode) for each in tasks for mode in lightning[each].by_mode()]
            check_lightning(profile, spec, variable, variables)
        loaded.append(
            load_pipeline(model, device, lightning[task], pool, settings.acceleration, settings.lora_slot_rank)
        )
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
        folder = resolve_folder(
            settings.controlnet_model,
            volume_path=settings.volume_path,
            baked_cache=settings.hf_hub_cache,
            required_file="config.json",
            what="ControlNet (QWEN_IMAGE_CONTROLNET_MODEL)",
        )
        controlnet = load_controlnet(folder.path, settings.controlnet_model, device)
    runner = PipelineRunner(loaded, device, lora_cache=prepared_loras, controlnet=controlnet)
    # The modes built on the loaded pipelines (image-to-image, inpainting, ...): from_pipe shares every module, so
    # this takes milliseconds and no memory, and no mode's first job waits for it.
    runner.prepare_modes()
    return Worker(
        settings,
        runner,
        store,
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
