"""TRANSFORMER_QUANT on the tiny model: int8 on the CPU, and fp8 refused where it cannot run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.responses import decode_data_uri, open_image
from synthetic_loras import lightning_and_style

from qwen_worker.app import build_worker, create_worker
from qwen_worker.config import Settings
from qwen_worker.errors import ConfigError
from qwen_worker.quantization import check_quantization, linear_weight_bytes
from qwen_worker.schema import FastMode, Task

JOB = {"prompt": "a lighthouse", "size": "256*256", "seed": 12, "output_format": "png"}
# int8 weights against float32 ones, on the tiny model's random weights: PSNR of the 8-bit image.
MIN_PSNR_DB = 30.0
# float32 -> int8 is 4x; the per-row scale and zero point (5 bytes a row) cost more on the tiny model's 32-wide rows
# than on the real 3072-wide ones (~4x there, ~2x against bf16 on a GPU).
MIN_SHRINK = 3.3


def worker(tiny_models, **env):
    return build_worker(
        Settings.from_env({"QWEN_IMAGE_MODEL": str(tiny_models["qwen-image"]), "SAFETY_CHECKER": "off", **env})
    )


def pixels(result: dict) -> np.ndarray:
    assert "error" not in result, result
    return np.asarray(open_image(decode_data_uri(result["image_url"])[1]), dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.fixture(scope="module")
def lightning(tiny_models, tmp_path_factory):
    return lightning_and_style(tiny_models["qwen-image"] / "transformer", tmp_path_factory.mktemp("quant-loras"))


@pytest.fixture(scope="module")
def workers(tiny_models, lightning):
    env = {"LIGHTNING_LORA": str(lightning["eight"])}
    return {"none": worker(tiny_models, **env), "int8": worker(tiny_models, TRANSFORMER_QUANT="int8", **env)}


def test_int8_shrinks_the_linear_weights_and_keeps_the_image_close(workers):
    transformers = {mode: w.runner.pipeline_for(Task.TEXT_TO_IMAGE).pipeline.transformer for mode, w in workers.items()}
    shrink = linear_weight_bytes(transformers["none"]) / linear_weight_bytes(transformers["int8"])
    assert MIN_SHRINK <= shrink <= 4.0
    assert any("torchao" in type(m.weight).__module__ for m in transformers["int8"].modules() if hasattr(m, "weight"))
    plain = {mode: pixels(w.handle({"id": "p", "input": JOB})) for mode, w in workers.items()}
    assert not np.array_equal(plain["none"], plain["int8"])  # really quantized
    assert psnr(plain["none"], plain["int8"]) >= MIN_PSNR_DB


def test_int8_runs_lightning_and_user_loras_unmerged_on_the_quantized_layers(workers, lightning):
    fast = {**JOB, "go_fast": True, "loras": [{"path": str(lightning["style"]), "scale": 0.7}]}
    images = {mode: pixels(w.handle({"id": "f", "input": fast})) for mode, w in workers.items()}
    assert psnr(images["none"], images["int8"]) >= MIN_PSNR_DB
    # the copy shares the quantized weights: no float copy of the model came back
    loaded = workers["int8"].runner.pipeline_for(Task.TEXT_TO_IMAGE)
    (tree,) = loaded.fast.copies.values()
    base_weights = {id(p) for p in loaded.pipeline.transformer.parameters()}
    assert all(id(p) in base_weights for name, p in tree.named_parameters() if "lora_" not in name)
    # the user LoRA ran in the Lightning copy's LoRA slot, on the same quantized weights
    assert loaded.slots is not None
    slot_tree = loaded.slots.tree_for(FastMode.REGULAR)
    assert slot_tree is not tree
    assert all(id(p) in base_weights for name, p in slot_tree.named_parameters() if "lora_" not in name)
    assert any(p.abs().sum() > 0 for name, p in slot_tree.named_parameters() if ".slot." in name)


def test_int8_with_a_fused_lightning_fuses_first(tiny_models, lightning):
    fused = worker(tiny_models, LIGHTNING_LORA=str(lightning["eight"]), LIGHTNING_FUSE="true", TRANSFORMER_QUANT="int8")
    reference = worker(tiny_models, LIGHTNING_LORA=str(lightning["eight"]), LIGHTNING_FUSE="true")
    job = {"id": "f", "input": {**JOB, "go_fast": True}}
    assert psnr(pixels(fused.handle(job)), pixels(reference.handle(job))) >= MIN_PSNR_DB


def test_fp8_is_refused_on_the_cpu():
    with pytest.raises(ConfigError, match=r"TRANSFORMER_QUANT=fp8 needs a CUDA GPU of compute capability 8\.9"):
        check_quantization("fp8", torch.device("cpu"))


def test_fp8_is_refused_on_a_gpu_below_compute_capability_8_9_naming_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError) as caught:
        check_quantization("fp8", torch.device("cuda"))
    assert "NVIDIA A100-SXM4-80GB" in str(caught.value) and "compute capability 8.0" in str(caught.value)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_quantization("fp8", torch.device("cuda"))  # Hopper: allowed


def test_a_worker_that_cannot_quantize_answers_every_job_with_the_reason(tiny_models, monkeypatch):
    monkeypatch.setenv("QWEN_IMAGE_MODEL", str(tiny_models["qwen-image"]))
    monkeypatch.setenv("SAFETY_CHECKER", "off")
    monkeypatch.setenv("TRANSFORMER_QUANT", "fp8")
    failed = create_worker()
    answer = failed.handle({"id": "j", "input": JOB})
    assert "could not start" in answer["error"] and "TRANSFORMER_QUANT=fp8" in answer["error"]


def test_unknown_quantization_is_refused_naming_the_variable():
    with pytest.raises(ConfigError, match="TRANSFORMER_QUANT must be one of none, int8, fp8"):
        Settings.from_env({"TRANSFORMER_QUANT": "int4"})
