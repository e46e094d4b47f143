"""The memory plan (qwen_worker/memory_plan.py) on the real byte counts: folders whose safetensors files carry the
published checkpoints' headers and no data (builder/real_size_models.py), planned against simulated GPU sizes; and
on the tiny pipelines, where MEMORY_PLAN=auto's choice is loaded and reaches every result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.worker_process import ROOT

from qwen_worker import memory_plan
from qwen_worker.app import StartupFailure, configured_pipelines, create_worker, memory_setup, offload_blockers
from qwen_worker.config import Settings
from qwen_worker.errors import ConfigError
from qwen_worker.memory_plan import GB, component_weights, make_report, read_header

JOB = {"id": "plan", "input": {"prompt": "a lighthouse", "size": "256*256", "seed": 3}}


@pytest.fixture
def real(real_size_models) -> dict[str, Path]:
    return real_size_models


def real_env(real: dict[str, Path], **env: str) -> dict[str, str]:
    return {"QWEN_IMAGE_MODEL": str(real["qwen-image"]), "SAFETY_CHECKER_MODEL": str(real["safety-checker"]), **env}


def report_for(env: dict[str, str], gb: float | None, *, fp8: bool = True):
    settings = Settings.from_env(env)
    return make_report(
        memory_setup(settings, configured_pipelines(settings)),
        element_bytes=2,
        available=None if gb is None else int(gb * GB),
        available_source="simulated",
        mode=settings.memory_plan,
        configured_quant=settings.acceleration.quant,
        fp8_supported=fp8,
        offload_blockers=offload_blockers(settings),
    )


def test_component_bytes_are_the_published_sizes_and_the_files_hold_no_data(real):
    transformer = component_weights(real["qwen-image"] / "transformer")
    assert len(transformer.files) == 9 and not transformer.short_files  # sharded, found through its index; whole
    # 20.430 B parameters (bench/configs/README.md), bf16 as stored
    assert sum(t.elements for t in transformer.tensors.values()) == pytest.approx(20.43e9, rel=1e-3)
    assert transformer.load_bytes(2) == pytest.approx(40.86e9, rel=1e-3)
    assert component_weights(real["qwen-image"] / "text_encoder").load_bytes(2) == pytest.approx(16.58e9, rel=1e-3)
    assert component_weights(real["qwen-image"] / "vae").load_bytes(2) == pytest.approx(0.254e9, rel=1e-2)
    # stored in float32, loaded in bf16: half the file
    checker = component_weights(real["safety-checker"])
    assert checker.file_bytes == pytest.approx(1.216e9, rel=1e-2)
    assert checker.load_bytes(2) == pytest.approx(checker.file_bytes / 2, rel=1e-3)
    assert checker.load_bytes(4) == pytest.approx(checker.file_bytes, rel=1e-3)
    # int8 / fp8: the linear weights at one byte, the rest as loaded
    assert transformer.quantized_bytes(2, "int8") == pytest.approx(20.5e9, rel=1e-2)
    disk = sum(path.stat().st_blocks * 512 for path in transformer.files)
    assert disk < 10 * 1000**2, "the real-size files must be sparse"


def test_nothing_beyond_the_header_is_read(real, monkeypatch):
    path = next(iter(component_weights(real["qwen-image"] / "transformer").files))
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
    read: list[int] = []

    class Counting:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def read(self, size=-1):
            data = self.handle.read(size)
            read.append(len(data))
            return data

    # Counting closes the handle it wraps on exit, as read_header uses it in a with block
    monkeypatch.setattr(memory_plan, "open", lambda p, mode="r": Counting(open(p, mode)), raising=False)  # noqa: SIM115
    tensors = read_header(path)
    assert tensors and sum(read) == 8 + header_length


def test_a_file_cut_short_after_its_header_still_plans_and_says_so(real, tmp_path):
    folder = tmp_path / "vae"
    source = real["qwen-image"] / "vae" / "diffusion_pytorch_model.safetensors"
    sparse_copy(source, folder / "diffusion_pytorch_model.safetensors")
    with open(folder / "diffusion_pytorch_model.safetensors", "r+b") as handle:
        handle.truncate(handle.seek(0, 2) - 1000)  # the data region cut short
    weights = component_weights(folder)
    assert weights.load_bytes(2) == component_weights(real["qwen-image"] / "vae").load_bytes(2)
    assert weights.short_files


def test_a_file_that_is_not_safetensors_is_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(ConfigError, match="model.safetensors is not a safetensors file"):
        component_weights(tmp_path)


# (setup env, GPU GB) -> the plan MEMORY_PLAN=auto loads; None: nothing fits. The README's GPU table prints these.
BOTH = {"QWEN_IMAGE_EDIT_MODEL": "qwen-image-edit"}
DECISIONS = [
    ({}, 24, None),
    ({}, 48, "fp8"),
    ({}, 80, "bf16"),
    ({}, 141, "bf16"),
    (BOTH, 48, "fp8 + model CPU offload"),
    (BOTH, 80, "fp8"),
    (BOTH, 141, "bf16"),
]


@pytest.mark.parametrize(("extra", "gb", "expected"), DECISIONS)
def test_auto_picks_the_least_lossy_plan_that_fits(real, extra, gb, expected):
    env = real_env(real, MEMORY_PLAN="auto", **{name: str(real[value]) for name, value in extra.items()})
    report = report_for(env, gb)
    assert (report.chosen.name if report.chosen else None) == expected
    if report.chosen is not None:
        assert report.chosen.gpu_bytes <= gb * GB
        # every less lossy plan did not fit
        for plan in report.candidates[: report.candidates.index(report.chosen)]:
            assert plan.gpu_bytes > gb * GB


def test_without_fp8_the_quantized_plan_is_int8(real):
    report = report_for(real_env(real, MEMORY_PLAN="auto"), 48, fp8=False)
    assert report.chosen is not None and report.chosen.name == "int8"


def test_shared_components_count_once(real):
    both = real_env(real, QWEN_IMAGE_EDIT_MODEL=str(real["qwen-image-edit"]))
    shared = report_for(both, None).configured.gpu_bytes
    unshared = report_for({**both, "SHARE_COMPONENTS": "false"}, None).configured.gpu_bytes
    text_encoder = component_weights(real["qwen-image"] / "text_encoder").load_bytes(2)
    vae = component_weights(real["qwen-image"] / "vae").load_bytes(2)
    assert unshared - shared == text_encoder + vae


def sparse_copy(source: Path, target: Path) -> None:
    """``source``'s header, and a hole as long as its data."""
    with open(source, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        handle.seek(0)
        head = handle.read(8 + length)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as handle:
        handle.write(head)
        handle.truncate(source.stat().st_size)


def test_in_a_hub_cache_only_files_of_the_same_blob_count_as_identical(real, tmp_path):
    source = real["qwen-image"] / "vae" / "diffusion_pytorch_model.safetensors"
    for blob in ("aaa", "bbb"):
        sparse_copy(source, tmp_path / "blobs" / blob)
    for snapshot, blob in (("one", "aaa"), ("two", "bbb"), ("three", "aaa")):
        link = tmp_path / snapshot / "vae" / "diffusion_pytorch_model.safetensors"
        link.parent.mkdir(parents=True)
        link.symlink_to(tmp_path / "blobs" / blob)
    one, two, three = (component_weights(tmp_path / name / "vae").identity() for name in ("one", "two", "three"))
    assert one == three and one != two  # same headers and lengths, other content: not shared


def test_lightning_copies_and_slots_are_counted(real):
    base = report_for(real_env(real, LORA_SLOT_RANK="0"), None).configured.gpu_bytes
    lightning = str(real["lightning-8step"])
    with_copy = report_for(real_env(real, LORA_SLOT_RANK="0", LIGHTNING_LORA=lightning), None).configured.gpu_bytes
    assert with_copy - base == pytest.approx(0.85e9, rel=0.01)  # the published 8-step file's size
    slots = report_for(real_env(real, LIGHTNING_LORA=lightning), None).configured.gpu_bytes - with_copy
    assert slots == 2 * 589_824_000 * 2  # two trees of lora_slots.py's "590 M parameters", in bf16
    fused = report_for(real_env(real, LORA_SLOT_RANK="0", LIGHTNING_LORA=lightning, LIGHTNING_FUSE="true"), None)
    assert fused.configured.gpu_bytes == base  # merged into the weights: nothing resident


def test_the_failure_names_the_need_the_gpu_and_what_would_fit(real):
    env = real_env(real, QWEN_IMAGE_EDIT_MODEL=str(real["qwen-image-edit"]))
    report = report_for(env, 80)
    assert not report.fits
    message = report.failure()
    needed = report.configured.gpu_bytes / GB
    assert f"need {needed:.1f} GB of GPU memory" in message and "this GPU has 80.0 GB" in message
    fp8 = report.candidates[1]
    assert f"TRANSFORMER_QUANT=fp8 -> {fp8.gpu_bytes / GB:.1f} GB" in message
    assert "without QWEN_IMAGE_EDIT_MODEL (one pipeline fewer)" in message
    assert "MEMORY_PLAN=auto picks the first" in message


def test_the_readme_gpu_table_is_the_planners_output(real):
    from gpu_table import gpu_table  # scripts/gpu_table.py

    assert gpu_table(real) in (ROOT / "README.md").read_text()


def test_a_setup_that_does_not_fit_fails_every_job_with_the_plan(monkeypatch, tmp_path, tiny_models):
    for name in ("QWEN_IMAGE_EDIT_MODEL", "HF_HOME", "HF_HUB_CACHE", "BUCKET_NAME", "MEMORY_PLAN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QWEN_IMAGE_MODEL", str(tiny_models["qwen-image"]))
    monkeypatch.setenv("SAFETY_CHECKER", "off")
    monkeypatch.setenv("MEMORY_PLAN_GPU_GB", "0.01")
    worker = create_worker()
    assert isinstance(worker, StartupFailure)
    answer = worker.handle(JOB)
    assert answer["error"].startswith("The worker could not start: the configured models need ")
    assert "this GPU has 0.0 GB (MEMORY_PLAN_GPU_GB)" in answer["error"]
    assert worker.handle({"id": "next", "input": {}}) == answer


def tiny_candidates(tiny_models) -> dict[str, int]:
    settings = Settings.from_env({"QWEN_IMAGE_MODEL": str(tiny_models["qwen-image"]), "SAFETY_CHECKER": "off"})
    report = make_report(
        memory_setup(settings, configured_pipelines(settings)), element_bytes=4, available=None,
        available_source="", mode="auto", configured_quant="none", fp8_supported=False,
    )
    return {plan.name: plan.gpu_bytes for plan in report.candidates}


def test_auto_quantizes_when_only_int8_fits_and_every_result_says_so(make_worker, tiny_models):
    sizes = tiny_candidates(tiny_models)
    assert sizes["bf16"] > sizes["int8"]
    between = (sizes["bf16"] + sizes["int8"]) / 2 / GB
    worker = make_worker(MEMORY_PLAN="auto", MEMORY_PLAN_GPU_GB=f"{between:.6f}", SAFETY_CHECKER="off")
    transformer = next(iter(worker.runner._by_task.values())).pipeline.transformer
    assert hasattr(transformer.transformer_blocks[0].attn.to_q.weight, "__tensor_flatten__")  # a torchao weight
    for _ in range(2):
        result = worker.handle(JOB)
        assert "error" not in result, result
        assert any(note.startswith("memory plan: int8 (MEMORY_PLAN=auto; bf16 needs") for note in result["notes"])


def test_auto_keeps_the_text_encoder_on_the_cpu_when_that_is_what_fits(make_worker, tiny_models):
    sizes = tiny_candidates(tiny_models)
    plan = "int8 + text encoder on the CPU"
    between = (sizes["int8"] + sizes[plan]) / 2 / GB
    worker = make_worker(MEMORY_PLAN="auto", MEMORY_PLAN_GPU_GB=f"{between:.6f}", SAFETY_CHECKER="off")
    loaded = next(iter(worker.runner._by_task.values()))
    assert hasattr(loaded.pipeline.text_encoder, "_hf_hook")  # accelerate's hook runs it on the CPU
    result = worker.handle(JOB)
    assert "error" not in result, result
    assert any(note.startswith(f"memory plan: {plan}") for note in result["notes"])


def test_the_plan_is_the_default_and_a_fitting_setup_adds_no_note(make_worker):
    worker = make_worker(MEMORY_PLAN_GPU_GB="1000", SAFETY_CHECKER="off")
    result = worker.handle(JOB)
    assert "error" not in result and not any("memory plan" in note for note in result.get("notes", []))


def test_int8_prediction_matches_what_torchao_makes(tiny_models):
    from diffusers import QwenImageTransformer2DModel

    from qwen_worker.quantization import _tensor_bytes, quantize_transformer

    folder = tiny_models["qwen-image"] / "transformer"
    weights = component_weights(folder)
    module = QwenImageTransformer2DModel.from_pretrained(folder, local_files_only=True)
    state = list(module.state_dict().values())
    assert sum(_tensor_bytes(tensor) for tensor in state) == weights.load_bytes(4)
    quantize_transformer(module, "int8", torch.device("cpu"))
    assert sum(_tensor_bytes(tensor) for tensor in module.state_dict().values()) == weights.quantized_bytes(4, "int8")


def run_check(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"),
            "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run([sys.executable, "handler.py", "--check", *args], cwd=ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=300)


def test_deploy_check_says_what_it_would_load_and_whether_it_fits(tiny_models, tmp_path):
    env = {"QWEN_IMAGE_MODEL": str(tiny_models["qwen-image"]),
           "SAFETY_CHECKER_MODEL": str(tiny_models["safety-checker"]), "RUNPOD_VOLUME_PATH": str(tmp_path)}
    fits = run_check(env, "--gpu-memory", "80")
    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert f"QWEN_IMAGE_MODEL={tiny_models['qwen-image']}: QwenImagePipeline from local folder" in fits.stdout
    assert "transformer" in fits.stdout and "safety checker" in fits.stdout and "would start" in fits.stdout
    assert "QWEN_IMAGE_EDIT_MODEL: edits are not served" in fits.stdout
    missing = run_check(
        {**env, "QWEN_IMAGE_EDIT_MODEL": "Qwen/Qwen-Image-Edit", "QWEN_IMAGE_LAYERED_MODEL": "Qwen/Qwen-Image-Layered"},
        "--gpu-memory", "0.01",
    )
    assert missing.returncode == 1
    # every missing model is named, not only the first, and what was found is still planned, against the size given
    assert "WOULD NOT START: Model (QWEN_IMAGE_EDIT_MODEL) Qwen/Qwen-Image-Edit was not found" in missing.stdout
    assert "WOULD NOT START: Model (QWEN_IMAGE_LAYERED_MODEL) Qwen/Qwen-Image-Layered was not found" in missing.stdout
    assert "memory plan (bf16; MEMORY_PLAN=check)" in missing.stdout
    assert "WOULD NOT START: the configured models need" in missing.stdout
    assert "this GPU has 0.0 GB (--gpu-memory)" in missing.stdout
