"""Offline model resolution: local folder, Runpod's cache, a volume HF cache, the baked cache, in that order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen_worker.errors import ConfigError
from qwen_worker.models import ResolvedFolder, ResolvedModel, resolve_folder, resolve_model

REPO = "Qwen/Qwen-Image"
CHECKER_REPO = "CompVis/stable-diffusion-safety-checker"


def pipeline_folder(path: Path, class_name: str = "QwenImagePipeline") -> Path:
    path.mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return path


def cache_entry(cache: Path, revision: str, *, with_ref: bool = True) -> Path:
    repo = cache / "models--Qwen--Qwen-Image"
    snapshot = pipeline_folder(repo / "snapshots" / revision)
    if with_ref:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(revision + "\n")
    return snapshot


def test_local_folder_wins(tmp_path):
    folder = pipeline_folder(tmp_path / "mine", "QwenImageEditPlusPipeline")
    resolved = resolve_model(str(folder), volume_path=tmp_path / "vol", baked_cache=tmp_path / "baked")
    assert resolved.path == folder and resolved.source == "local folder"
    assert resolved.pipeline_class == "QwenImageEditPlusPipeline"


def test_runpod_cache_before_volume_and_baked(tmp_path):
    volume = tmp_path / "vol"
    runpod = cache_entry(volume / "huggingface-cache/hub", "aaa")
    cache_entry(volume / ".cache/huggingface/hub", "bbb")
    cache_entry(tmp_path / "baked", "ccc")
    resolved = resolve_model(REPO, volume_path=volume, baked_cache=tmp_path / "baked")
    assert (resolved.path, resolved.revision, resolved.source) == (runpod, "aaa", "runpod model cache")


def test_volume_cache_before_baked(tmp_path):
    volume = tmp_path / "vol"
    snapshot = cache_entry(volume / ".cache/huggingface/hub", "bbb")
    cache_entry(tmp_path / "baked", "ccc")
    resolved = resolve_model(REPO, volume_path=volume, baked_cache=tmp_path / "baked")
    assert (resolved.path, resolved.source) == (snapshot, "network volume cache")


def test_baked_cache_last_and_single_snapshot_without_ref(tmp_path):
    snapshot = cache_entry(tmp_path / "baked", "ccc", with_ref=False)
    resolved = resolve_model(REPO, volume_path=tmp_path / "vol", baked_cache=tmp_path / "baked")
    assert (resolved.path, resolved.revision, resolved.source) == (snapshot, "ccc", "image cache")


def test_refs_main_chooses_among_snapshots(tmp_path):
    cache = tmp_path / "baked"
    cache_entry(cache, "old", with_ref=False)
    newest = cache_entry(cache, "new")
    assert resolve_model(REPO, volume_path=tmp_path / "vol", baked_cache=cache).path == newest


def test_ambiguous_snapshots_without_ref_are_not_guessed(tmp_path):
    cache = tmp_path / "baked"
    cache_entry(cache, "one", with_ref=False)
    cache_entry(cache, "two", with_ref=False)
    with pytest.raises(ConfigError, match="2 snapshots and no refs/main"):
        resolve_model(REPO, volume_path=tmp_path / "vol", baked_cache=cache)


def test_missing_model_names_repo_every_place_and_the_fix(tmp_path):
    with pytest.raises(ConfigError) as caught:
        resolve_model(REPO, volume_path=tmp_path / "vol", baked_cache=tmp_path / "baked")
    message = str(caught.value)
    assert REPO in message
    for place in ("local folder", "runpod model cache", "network volume cache", "image cache"):
        assert place in message
    assert "fetch_models.py" in message


def test_folder_without_model_index_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="model_index.json"):
        resolve_model(str(tmp_path / "empty"), volume_path=tmp_path, baked_cache=None)


# --- the same search for a model that is not a pipeline: the safety checker, whose folder root holds config.json


def checker_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def resolve_checker(spec: str, tmp_path: Path) -> ResolvedFolder:
    return resolve_folder(
        spec,
        volume_path=tmp_path / "vol",
        baked_cache=tmp_path / "baked",
        required_file="config.json",
        what="Safety checker",
    )


def test_checker_repo_found_in_a_cache_by_its_config(tmp_path):
    repo = tmp_path / "vol/huggingface-cache/hub/models--CompVis--stable-diffusion-safety-checker"
    snapshot = checker_folder(repo / "snapshots/abc")
    resolved = resolve_checker(CHECKER_REPO, tmp_path)
    assert resolved == ResolvedFolder(CHECKER_REPO, snapshot, "abc", "runpod model cache")


def test_checker_local_folder(tmp_path):
    folder = checker_folder(tmp_path / "checker")
    assert resolve_checker(str(folder), tmp_path) == ResolvedFolder(str(folder), folder, None, "local folder")


def test_checker_folder_without_config_is_refused_by_name(tmp_path):
    # A pipeline folder is not a checker folder: the required file is the caller's, not always model_index.json.
    folder = pipeline_folder(tmp_path / "pipeline")
    with pytest.raises(ConfigError, match=r"Safety checker .* has no config\.json"):
        resolve_checker(str(folder), tmp_path)


def test_missing_checker_is_named_as_such(tmp_path):
    with pytest.raises(ConfigError, match=f"^Safety checker {CHECKER_REPO} was not found") as caught:
        resolve_checker(CHECKER_REPO, tmp_path)
    assert "image cache" in str(caught.value)


def test_resolved_model_is_a_resolved_folder_with_its_class(tmp_path):
    folder = pipeline_folder(tmp_path / "mine")
    resolved = resolve_model(str(folder), volume_path=tmp_path / "vol", baked_cache=None)
    assert isinstance(resolved, ResolvedFolder)
    assert resolved == ResolvedModel(str(folder), folder, None, "local folder", "QwenImagePipeline")
