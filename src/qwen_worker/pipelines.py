"""Loading the diffusers pipelines once per process and running them for a request.

Knows nothing of HTTP, S3 or JSON: it takes a validated ``Request`` plus decoded input images and returns PIL images.
The same code runs the tiny random-weight pipelines the tests build and the real 20B checkpoints.

- The pipeline class comes from the folder's ``model_index.json``, so Qwen-Image, Qwen-Image-Edit and
  Qwen-Image-Edit-Plus (2509/2511) folders all load through one path.
- Edit pipelines get an image-only Qwen2-VL processor (see ``processor.py``) so torchvision is never needed.
- bf16 on CUDA, float32 on CPU; ``local_files_only`` always (the hub is never contacted at run time).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from .errors import ConfigError, GenerationError, TaskNotServedError, ValidationError
from .models import ResolvedModel
from .schema import Request, Task

log = logging.getLogger(__name__)

# model_index.json class name -> (task it serves, accepts several reference images)
SUPPORTED_PIPELINES: dict[str, tuple[Task, bool]] = {
    "QwenImagePipeline": (Task.TEXT_TO_IMAGE, False),
    "QwenImageEditPipeline": (Task.EDIT, False),
    "QwenImageEditPlusPipeline": (Task.EDIT, True),
}

# The model card's advice: with no negative prompt, still run true CFG against a single space.
EMPTY_NEGATIVE_PROMPT = " "

ProgressCallback = Callable[[int, int], None]  # (steps done, total steps)


@dataclass
class LoadedPipeline:
    model: ResolvedModel
    pipeline: Any  # a diffusers DiffusionPipeline subclass
    task: Task
    accepts_multiple_images: bool
    load_seconds: float


@dataclass
class Generation:
    images: list[Image.Image]
    model: ResolvedModel
    timings_ms: dict[str, float] = field(default_factory=dict)


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


def load_pipeline(model: ResolvedModel, device: torch.device) -> LoadedPipeline:
    """Load one pipeline folder onto ``device``. Raises ConfigError with the model id on any failure."""
    import diffusers

    if model.pipeline_class not in SUPPORTED_PIPELINES:
        raise ConfigError(
            f"Model {model.model_id} at {model.path} is a {model.pipeline_class}; this worker serves "
            + ", ".join(SUPPORTED_PIPELINES)
        )
    task, multi_image = SUPPORTED_PIPELINES[model.pipeline_class]
    pipeline_class = getattr(diffusers, model.pipeline_class)
    kwargs: dict[str, Any] = {"dtype": dtype_for(device), "local_files_only": True}
    if task is Task.EDIT:
        from .processor import load_processor

        kwargs["processor"] = load_processor(model.path / "processor")
    if device.type == "cuda":
        kwargs["device_map"] = "cuda"  # load shards straight onto the GPU, skipping a CPU copy

    started = time.perf_counter()
    try:
        pipeline = pipeline_class.from_pretrained(model.path, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ConfigError(f"Could not load model {model.model_id} from {model.path}: {err}") from err
    if device.type != "cuda":
        pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)  # tqdm bars would flood the worker's log
    seconds = time.perf_counter() - started
    log.info("loaded %s (%s) on %s in %.1f s", model.model_id, model.pipeline_class, device, seconds)
    return LoadedPipeline(model, pipeline, task, multi_image, seconds)


class PipelineRunner:
    """Holds the loaded pipelines (at most one per task) and runs requests on them."""

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

    def generate(
        self, request: Request, inputs: Sequence[Image.Image], on_progress: ProgressCallback | None = None
    ) -> Generation:
        loaded = self.pipeline_for(request.task)
        call: dict[str, Any] = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt or EMPTY_NEGATIVE_PROMPT,
            "true_cfg_scale": request.true_cfg_scale,
            "num_inference_steps": request.num_inference_steps,
            # A CPU generator draws the same noise on every device, so a seed means the same image on CPU and GPU.
            "generator": torch.Generator(device="cpu").manual_seed(request.seed),
            "output_type": "pil",
        }
        if request.width is not None and request.height is not None:
            call["width"], call["height"] = request.width, request.height
        if request.task is Task.EDIT:
            call["image"] = list(inputs) if loaded.accepts_multiple_images else inputs[0]
        if on_progress is not None:
            total = request.num_inference_steps

            def report(pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
                on_progress(step + 1, total)
                return callback_kwargs

            call["callback_on_step_end"] = report

        started = time.perf_counter()
        try:
            with torch.inference_mode():
                output = loaded.pipeline(**call)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise GenerationError(
                "The GPU ran out of memory while generating; try a smaller size or fewer images."
            ) from None
        except (RuntimeError, ValueError) as err:
            log.exception("pipeline %s failed", loaded.model.model_id)
            raise GenerationError(f"Generation failed: {type(err).__name__}: {str(err)[:200]}") from None
        return Generation(
            images=list(output.images),
            model=loaded.model,
            timings_ms={"generate": (time.perf_counter() - started) * 1000},
        )
