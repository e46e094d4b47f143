"""Faults inside a job, on the real tiny pipelines in-process: the job fails clearly, state is restored, the next
job succeeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.responses import decode_data_uri, open_image
from synthetic_loras import random_pairs, write_diffusers

from qwen_worker.schema import Task
from qwen_worker.worker import Worker


@pytest.fixture(scope="module")
def lightning_file(tiny_models, tmp_path_factory):
    from diffusers import QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel.from_pretrained(tiny_models["qwen-image"] / "transformer")
    return write_diffusers(
        tmp_path_factory.mktemp("lightning") / "8step.safetensors", random_pairs(transformer, seed=9)
    )


@pytest.fixture(scope="module")
def worker(make_worker, tiny_models, lightning_file):
    return make_worker(QWEN_IMAGE_EDIT_MODEL=str(tiny_models["qwen-image-edit"]), LIGHTNING_LORA=str(lightning_file))


def t2i(**extra):
    return {"prompt": "a pear", "size": "256*256", "seed": 1, **extra}


def inject_once(monkeypatch, module: torch.nn.Module, error: Exception) -> None:
    """Make the next forward of ``module`` raise ``error`` (as a GPU fault would, mid-denoise)."""
    original = module.forward
    state = {"raised": False}

    def failing(*args, **kwargs):
        if not state["raised"]:
            state["raised"] = True
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "forward", failing)


def test_out_of_memory_fails_with_advice_and_the_next_job_succeeds(worker, monkeypatch):
    transformer = worker.runner.pipeline_for(Task.TEXT_TO_IMAGE).pipeline.transformer
    inject_once(monkeypatch, transformer, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    result = worker.handle({"id": "oom", "input": t2i(num_images=4)})
    assert set(result) == {"error"}
    assert "ran out of memory" in result["error"] and "4 image(s) of 256x256" in result["error"]
    assert "smaller size or fewer images" in result["error"]
    assert "image_url" in worker.handle({"id": "after-oom", "input": t2i()})


def test_unrecoverable_accelerator_error_asks_runpod_for_a_fresh_worker(worker, monkeypatch):
    transformer = worker.runner.pipeline_for(Task.TEXT_TO_IMAGE).pipeline.transformer
    inject_once(
        monkeypatch, transformer, torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    )
    result = worker.handle({"id": "xid", "input": t2i()})
    assert result["refresh_worker"] is True and "will be replaced" in result["error"]


def test_unexpected_error_is_generic_and_carries_no_traceback(worker):
    def broken(*args, **kwargs):
        raise KeyError("internal detail")

    # The same loaded pipelines, LoRAs, store and checker, behind Worker's encode= seam. (Worker keeps no state of
    # its own between jobs: whatever one job could leave behind lives in what the two share.)
    encoder_broken = Worker(
        worker.settings, worker.runner, worker.store, loras=worker.loras, safety=worker.safety, encode=broken
    )
    result = encoder_broken.handle({"id": "bug", "input": t2i()})
    assert result == {"error": "Internal error while processing job bug; the worker's log has the details."}
    assert "image_url" in worker.handle({"id": "after-bug", "input": t2i()})


@pytest.mark.parametrize(
    "job", [None, "text", {"id": 5}, {"id": 10**5000, "input": {}}, {"input": None}, {"input": []}]
)
def test_malformed_jobs_fail_as_strings(worker, job):
    result = worker.handle(job)
    assert set(result) == {"error"} and isinstance(result["error"], str)


def test_fast_mode_leaves_no_lora_or_scheduler_behind(worker):
    pipeline = worker.runner.pipeline_for(Task.TEXT_TO_IMAGE).pipeline
    scheduler = pipeline.scheduler
    modules_before = [type(module) for module in pipeline.transformer.modules()]
    reference = worker.handle({"id": "ref", "input": t2i()})["image_url"]

    fast = worker.handle({"id": "fast", "input": t2i(go_fast=True)})
    assert fast["num_inference_steps"] == 8 and fast["image_url"] != reference

    assert pipeline.scheduler is scheduler
    assert pipeline.scheduler.config["shift_terminal"] == 0.02  # the base config, not Lightning's
    assert [type(module) for module in pipeline.transformer.modules()] == modules_before
    assert worker.handle({"id": "again", "input": t2i()})["image_url"] == reference


def test_task_not_served_and_multi_image_needs_edit_plus(make_worker, tiny_models):
    edit_only = make_worker(
        QWEN_IMAGE_MODEL="none", QWEN_IMAGE_EDIT_MODEL=str(tiny_models["qwen-image-edit"]), SAFETY_CHECKER="off"
    )
    assert "does not serve text-to-image" in edit_only.handle({"id": "1", "input": t2i()})["error"]
    many = {"prompt": "merge", "images": ["data:image/png;base64,AAAA", "data:image/png;base64,AAAA"]}
    assert "needs an Edit-Plus model" in edit_only.handle({"id": "2", "input": many})["error"]

    t2i_only = make_worker(SAFETY_CHECKER="off")
    message = t2i_only.handle({"id": "3", "input": {"prompt": "blue", "image": "data:image/png;base64,AAAA"}})["error"]
    assert "does not serve image editing" in message


def test_overlong_prompt_is_noted(worker):
    result = worker.handle({"id": "long", "input": t2i(prompt="word " * 700)})
    assert any("the text encoder reads only the first 512" in note for note in result["notes"])


def test_a_single_step_gives_a_real_image_and_leaves_the_scheduler_alone(worker):
    pipeline = worker.runner.pipeline_for(Task.TEXT_TO_IMAGE).pipeline
    scheduler = pipeline.scheduler
    result = worker.handle({"id": "one", "input": t2i(num_inference_steps=1)})
    pixels = np.asarray(open_image(decode_data_uri(result["image_url"])[1]))
    assert pixels.max() > 0 and pixels.std() > 0  # not the all-black image a division by zero gives
    assert pipeline.scheduler is scheduler and scheduler.config["shift_terminal"] == 0.02
