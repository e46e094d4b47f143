"""A worker that cannot serve does not crash-loop: it logs the cause once and answers every job FAILED with one
message that names the variable, the model and the fix. In the SDK's local test mode the run still ends non-zero."""

from __future__ import annotations

import subprocess
import sys

import pytest
from support.worker_process import ROOT

from qwen_worker.app import StartupFailure, create_worker

BASE = {"SAFETY_CHECKER": "off"}
JOB = {"id": "queued", "input": {"prompt": "a lighthouse"}}


def failed_start(monkeypatch, tmp_path, **env: str) -> str:
    for name in ("QWEN_IMAGE_MODEL", "QWEN_IMAGE_EDIT_MODEL", "HF_HOME", "HF_HUB_CACHE", "BUCKET_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RUNPOD_VOLUME_PATH", str(tmp_path / "volume"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "baked"))
    for name, value in {**BASE, **env}.items():
        monkeypatch.setenv(name, value)
    worker = create_worker()
    assert isinstance(worker, StartupFailure)
    first, second = worker.handle(JOB), worker.handle({"id": "next", "input": {}})
    assert first == second and set(first) == {"error"}  # every job, whatever it asks, gets the same answer
    assert first["error"].startswith("The worker could not start: ")
    return first["error"]


def test_missing_weights_name_the_variable_the_model_and_the_fix(monkeypatch, tmp_path):
    message = failed_start(monkeypatch, tmp_path)
    assert "QWEN_IMAGE_MODEL" in message and "Qwen/Qwen-Image" in message
    assert "fetch_models.py" in message and str(tmp_path / "baked") in message


def test_missing_edit_weights_name_that_variable_and_model(monkeypatch, tmp_path, tiny_models):
    message = failed_start(
        monkeypatch, tmp_path, QWEN_IMAGE_MODEL=str(tiny_models["qwen-image"]),
        QWEN_IMAGE_EDIT_MODEL="Qwen/Qwen-Image-Edit-2509",
    )
    assert "QWEN_IMAGE_EDIT_MODEL" in message and "Qwen/Qwen-Image-Edit-2509" in message


def test_require_cuda_on_a_cpu_only_machine(monkeypatch, tmp_path, tiny_models):
    message = failed_start(monkeypatch, tmp_path, QWEN_IMAGE_MODEL=str(tiny_models["qwen-image"]), REQUIRE_CUDA="1")
    assert "REQUIRE_CUDA" in message and "no CUDA device" in message


def test_missing_lightning_file(monkeypatch, tmp_path, tiny_models):
    message = failed_start(
        monkeypatch, tmp_path, QWEN_IMAGE_MODEL=str(tiny_models["qwen-image"]),
        LIGHTNING_LORA=str(tmp_path / "none.safetensors"),
    )
    assert "Lightning LoRA file" in message and "none.safetensors" in message


def test_partial_bucket_configuration(monkeypatch, tmp_path, tiny_models):
    message = failed_start(
        monkeypatch, tmp_path, QWEN_IMAGE_MODEL=str(tiny_models["qwen-image"]), BUCKET_ENDPOINT_URL="http://127.0.0.1:9"
    )
    assert "BUCKET_ACCESS_KEY_ID" in message and "BUCKET_NAME" in message


def test_a_bad_variable_value(monkeypatch, tmp_path, tiny_models):
    message = failed_start(monkeypatch, tmp_path, QWEN_IMAGE_MODEL=str(tiny_models["qwen-image"]), DEFAULT_STEPS="many")
    assert "DEFAULT_STEPS must be an integer" in message


@pytest.mark.parametrize(
    "name, value, rule",
    [
        ("DEFAULT_STEPS", "50.5", "must be an integer, got '50.5'"),
        ("SHARE_COMPONENTS", "maybe", "must be true or false"),
    ],
)
def test_a_value_a_hub_preset_could_garble_names_the_variable(monkeypatch, tmp_path, tiny_models, name, value, rule):
    """Integral "50.0" and "True" are read (tests/test_config.py); a fraction or a non-boolean is every job's error."""
    message = failed_start(monkeypatch, tmp_path, QWEN_IMAGE_MODEL=str(tiny_models["qwen-image"]), **{name: value})
    assert f"{name} {rule}" in message


def test_an_unforeseen_loading_failure_is_served_too(monkeypatch, tmp_path, tiny_models):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "QwenImagePipeline", "transformer": ["diffusers", 7]}')
    message = failed_start(monkeypatch, tmp_path, QWEN_IMAGE_MODEL=str(broken))
    assert "loading the models failed (TypeError" in message


@pytest.mark.slow
def test_a_served_endpoint_answers_each_queued_job_failed_and_keeps_running(start_worker, tmp_path):
    """Over the SDK's HTTP API, as Runpod would deliver jobs: the process stays up and each job gets the reason."""
    with start_worker(QWEN_IMAGE_MODEL=str(tmp_path / "no-such-model"), SAFETY_CHECKER="off", timeout=120) as server:
        for _ in range(2):
            body = server.runsync({"prompt": "a lighthouse"}, timeout=60)
            assert body["status"] == "FAILED", body
            assert body["error"].startswith("The worker could not start: Model (QWEN_IMAGE_MODEL)"), body
            assert "no-such-model" in body["error"]
        assert server.process is not None and server.process.poll() is None
        assert server.log_text().count("the worker cannot start") == 1  # logged once, at start-up


def test_local_test_mode_still_fails_loudly(tmp_path):
    """`python handler.py` (make demo) with a misconfiguration ends non-zero and prints the reason."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HF_HUB_OFFLINE": "1",
        "QWEN_IMAGE_MODEL": str(tmp_path / "no-such-model"),
        "SAFETY_CHECKER": "off",
        "PYTHONPATH": str(ROOT / "src"),
    }
    run = subprocess.run(
        [sys.executable, "handler.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode != 0
    assert "The worker could not start: Model (QWEN_IMAGE_MODEL)" in run.stdout + run.stderr
