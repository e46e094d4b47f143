"""One worker serving both tasks loads a text encoder or VAE the two pipelines share only once, and only when their
files are really identical."""

from __future__ import annotations

import hashlib
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_worker.schema import Task


@pytest.fixture
def worker_for(make_worker):
    """``worker_for(t2i_folder, edit_folder=None, **env)``: an in-process worker on those two model folders."""

    def build(t2i, edit=None, **env):
        settings = {"QWEN_IMAGE_MODEL": str(t2i), "SAFETY_CHECKER": "off", **env}
        if edit is not None:
            settings["QWEN_IMAGE_EDIT_MODEL"] = str(edit)
        return make_worker(**settings)

    return build


def pipelines(worker):
    return worker.runner.pipeline_for(Task.TEXT_TO_IMAGE).pipeline, worker.runner.pipeline_for(Task.EDIT).pipeline


JOB = {"id": "j", "input": {"prompt": "a tower", "size": "256*256", "seed": 8}}


def test_identical_components_are_loaded_once_and_outputs_do_not_change(worker_for, tiny_models, caplog):
    with caplog.at_level(logging.INFO, logger="qwen_worker"):
        shared = worker_for(tiny_models["qwen-image"], tiny_models["qwen-image-edit"])
    t2i, edit = pipelines(shared)
    assert t2i.text_encoder is edit.text_encoder and t2i.vae is edit.vae
    assert "text_encoder shared with" in caplog.text and "loaded transformer" in caplog.text

    alone = worker_for(tiny_models["qwen-image"])
    assert shared.handle(JOB)["image_url"] == alone.handle(JOB)["image_url"]


def test_components_that_differ_are_not_shared(worker_for, tiny_models, tmp_path):
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


def test_sharing_can_be_switched_off(worker_for, tiny_models):
    t2i, edit = pipelines(
        worker_for(tiny_models["qwen-image"], tiny_models["qwen-image-edit"], SHARE_COMPONENTS="false")
    )
    assert t2i.text_encoder is not edit.text_encoder and t2i.vae is not edit.vae


def link_into_hf_cache(tiny_models, cache):
    """Both tiny repos laid out in one HF cache, their files links to content-addressed blobs as the hub makes them."""
    for repo, source in (
        ("Qwen--Qwen-Image", tiny_models["qwen-image"]),
        ("Qwen--Qwen-Image-Edit", tiny_models["qwen-image-edit"]),
    ):
        snapshot = cache / f"models--{repo}" / "snapshots" / "rev"
        for path in sorted(source.rglob("*")):
            if path.is_file():
                blob = cache / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()  # as the hub names blobs
                blob.parent.mkdir(parents=True, exist_ok=True)
                if not blob.exists():
                    shutil.copyfile(path, blob)
                link = snapshot / path.relative_to(source)
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(blob)
    return cache / "models--Qwen--Qwen-Image/snapshots/rev", cache / "models--Qwen--Qwen-Image-Edit/snapshots/rev"


@pytest.fixture
def hashed_files(monkeypatch):
    """Records every file whose content the pool hashes (patched where the pool reads files: raising if it moved)."""
    from qwen_worker import loading

    hashed = []
    real = loading._file_sha256

    def recording(path):
        hashed.append(path)
        return real(path)

    monkeypatch.setattr(loading, "_file_sha256", recording)
    return hashed


def test_plain_folders_with_matching_listings_are_compared_by_content(worker_for, tiny_models, tmp_path, hashed_files):
    """The control for the test below: outside an HF cache, identical-looking folders are hashed file by file."""
    t2i = shutil.copytree(tiny_models["qwen-image"], tmp_path / "t2i")
    edit = shutil.copytree(tiny_models["qwen-image-edit"], tmp_path / "edit")
    first, second = pipelines(worker_for(t2i, edit))
    assert first.text_encoder is second.text_encoder and first.vae is second.vae
    assert any(path.is_relative_to(edit / "vae") for path in hashed_files)


def test_hugging_face_cache_blobs_are_compared_by_name_without_hashing(worker_for, tiny_models, tmp_path, hashed_files):
    """Two repos in one HF cache whose files link to the same blobs are identical without reading a byte."""
    t2i_snapshot, edit_snapshot = link_into_hf_cache(tiny_models, tmp_path / "hub")
    t2i, edit = pipelines(worker_for(t2i_snapshot, edit_snapshot))
    assert t2i.text_encoder is edit.text_encoder and t2i.vae is edit.vae
    assert hashed_files == [], "a blob's content was hashed: its name should have been enough"
