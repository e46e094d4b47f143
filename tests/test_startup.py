"""A worker that cannot serve refuses to start, with one message that names the problem and the fix."""

from __future__ import annotations

import pytest

from qwen_worker.app import create_worker

BASE = {"SAFETY_CHECKER": "off"}


def refusal(monkeypatch, tmp_path, **env: str) -> str:
    for name in ("QWEN_IMAGE_MODEL", "QWEN_IMAGE_EDIT_MODEL", "HF_HOME", "HF_HUB_CACHE", "BUCKET_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RUNPOD_VOLUME_PATH", str(tmp_path / "volume"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "baked"))
    for name, value in {**BASE, **env}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as caught:
        create_worker()
    return str(caught.value)


def test_missing_weights_name_the_model_and_the_fix(monkeypatch, tmp_path):
    message = refusal(monkeypatch, tmp_path)
    assert message.startswith("qwen-worker cannot start:")
    assert "Qwen/Qwen-Image" in message and "fetch_models.py" in message and str(tmp_path / "baked") in message


def test_missing_edit_weights_name_that_model(monkeypatch, tmp_path, tiny_models):
    message = refusal(
        monkeypatch, tmp_path, QWEN_IMAGE_MODEL=str(tiny_models["qwen-image"]), QWEN_IMAGE_EDIT_MODEL="Qwen/Qwen-Image-Edit-2509"
    )
    assert "Qwen/Qwen-Image-Edit-2509" in message


def test_require_cuda_refuses_a_cpu_only_machine(monkeypatch, tmp_path, tiny_models):
    message = refusal(monkeypatch, tmp_path, QWEN_IMAGE_MODEL=str(tiny_models["qwen-image"]), REQUIRE_CUDA="1")
    assert "REQUIRE_CUDA" in message and "no CUDA device" in message


def test_missing_lightning_file_refuses(monkeypatch, tmp_path, tiny_models):
    message = refusal(
        monkeypatch, tmp_path, QWEN_IMAGE_MODEL=str(tiny_models["qwen-image"]), LIGHTNING_LORA=str(tmp_path / "none.safetensors")
    )
    assert "Lightning LoRA file" in message and "none.safetensors" in message


def test_partial_bucket_configuration_refuses(monkeypatch, tmp_path, tiny_models):
    message = refusal(
        monkeypatch, tmp_path, QWEN_IMAGE_MODEL=str(tiny_models["qwen-image"]), BUCKET_ENDPOINT_URL="http://127.0.0.1:9"
    )
    assert "BUCKET_ACCESS_KEY_ID" in message and "BUCKET_NAME" in message
