"""One worker serving both tasks loads a text encoder or VAE the two pipelines share only once, and only when their
files are really identical."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_worker.app import build_worker
from qwen_worker.config import Settings
from qwen_worker.schema import Task


def worker_for(t2i, edit=None, **env):
    settings = {"QWEN_IMAGE_MODEL": str(t2i), "SAFETY_CHECKER": "off", "DEFAULT_STEPS": "2", **env}
    if edit is not None:
        settings["QWEN_IMAGE_EDIT_MODEL"] = str(edit)
    return build_worker(Settings.from_env(settings))


def pipelines(worker):
    return worker.runner.pipeline_for(Task.TEXT_TO_IMAGE).pipeline, worker.runner.pipeline_for(Task.EDIT).pipeline


JOB = {"id": "j", "input": {"prompt": "a tower", "size": "256*256", "seed": 8}}


def test_identical_components_are_loaded_once_and_outputs_do_not_change(tiny_models, caplog):
    with caplog.at_level(logging.INFO, logger="qwen_worker"):
        shared = worker_for(tiny_models["qwen-image"], tiny_models["qwen-image-edit"])
    t2i, edit = pipelines(shared)
    assert t2i.text_encoder is edit.text_encoder and t2i.vae is edit.vae
    assert "text_encoder shared with" in caplog.text and "loaded transformer" in caplog.text

    alone = worker_for(tiny_models["qwen-image"])
    assert shared.handle(JOB)["image_url"] == alone.handle(JOB)["image_url"]


def test_components_that_differ_are_not_shared(tiny_models, tmp_path):
    edit = shutil.copytree(tiny_models["qwen-image-edit"], tmp_path / "edit")
    weights = next((edit / "vae").glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3  # same names and sizes, different content
    save_file(tensors, weights)
    t2i_pipeline, edit_pipeline = pipelines(worker_for(tiny_models["qwen-image"], edit))
    assert t2i_pipeline.text_encoder is edit_pipeline.text_encoder
    assert t2i_pipeline.vae is not edit_pipeline.vae
    assert not torch.equal(t2i_pipeline.vae.state_dict()[name], edit_pipeline.vae.state_dict()[name])


def test_sharing_can_be_switched_off(tiny_models):
    t2i, edit = pipelines(worker_for(tiny_models["qwen-image"], tiny_models["qwen-image-edit"], SHARE_COMPONENTS="false"))
    assert t2i.text_encoder is not edit.text_encoder and t2i.vae is not edit.vae


def test_hugging_face_cache_blobs_are_compared_by_name_without_hashing(tiny_models, tmp_path, monkeypatch):
    """Two repos in one HF cache whose files link to the same blobs are identical without reading a byte."""
    from qwen_worker import pipelines as module

    cache = tmp_path / "hub"
    for repo, source in (("Qwen--Qwen-Image", tiny_models["qwen-image"]), ("Qwen--Qwen-Image-Edit", tiny_models["qwen-image-edit"])):
        snapshot = cache / f"models--{repo}" / "snapshots" / "rev"
        for path in sorted(source.rglob("*")):
            if path.is_file():
                blob = cache / "blobs" / module._content_id(path)  # stand-in for the hub's content-addressed names
                blob.parent.mkdir(parents=True, exist_ok=True)
                if not blob.exists():
                    shutil.copyfile(path, blob)
                link = snapshot / path.relative_to(source)
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(blob)
    def no_reading(*args, **kwargs):
        raise AssertionError("a blob's content was read: its name should have been enough")

    monkeypatch.setattr(module, "open", no_reading, raising=False)  # shadows the builtin inside pipelines.py only
    t2i, edit = pipelines(
        worker_for(
            cache / "models--Qwen--Qwen-Image/snapshots/rev", cache / "models--Qwen--Qwen-Image-Edit/snapshots/rev"
        )
    )
    assert t2i.text_encoder is edit.text_encoder and t2i.vae is edit.vae
