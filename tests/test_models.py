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


# ------------------------------------------------------------------------- one file of a repo: "org/name:path/file"

LIGHTNING_SPEC = "lightx2v/Qwen-Image-Lightning:Qwen-Image-Lightning-8steps-V1.1.safetensors"


def cached_file(cache: Path, repo: str, filename: str, revision: str, *, with_ref: bool = True) -> Path:
    """``filename`` in huggingface_hub's layout: the bytes in blobs/, the snapshot entry a link to them."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    blob = repo_dir / "blobs" / f"blob-{revision}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(b"lora bytes " + revision.encode())
    entry = repo_dir / "snapshots" / revision / filename
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.symlink_to("../" * (len(Path(filename).parts) + 1) + f"blobs/{blob.name}")
    if with_ref:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / "main").write_text(revision)
    return entry


def test_repo_file_is_found_in_each_cache_in_the_models_order(tmp_path):
    from qwen_worker.models import resolve_repo_file

    volume, baked = tmp_path / "vol", tmp_path / "baked"
    repo, filename = LIGHTNING_SPEC.split(":")
    in_baked = cached_file(baked, repo, filename, "c" * 40)
    find = lambda: resolve_repo_file(LIGHTNING_SPEC, volume_path=volume, baked_cache=baked, what="LoRA")  # noqa: E731
    assert find() == in_baked and find().read_bytes() == b"lora bytes " + b"c" * 40
    # A volume filled by fetch_models --cache-dir <volume>/.cache/huggingface/hub comes before the image's cache...
    in_volume = cached_file(volume / ".cache/huggingface/hub", repo, filename, "b" * 40)
    assert find() == in_volume
    # ...and Runpod's cached-model folder before both; without refs/main its only snapshot is the one (as for models).
    in_runpod = cached_file(volume / "huggingface-cache/hub", repo, filename, "a" * 40, with_ref=False)
    assert find() == in_runpod


def test_repo_file_in_a_subfolder_and_at_the_pinned_revision(tmp_path):
    from qwen_worker.models import resolve_repo_file

    name = "Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16.safetensors"
    cache = tmp_path / "baked"
    cached_file(cache, "lightx2v/Qwen-Image-Lightning", name, "1" * 40, with_ref=False)
    pinned = cached_file(cache, "lightx2v/Qwen-Image-Lightning", name, "2" * 40)  # refs/main names this one
    found = resolve_repo_file(
        f"lightx2v/Qwen-Image-Lightning:{name}", volume_path=tmp_path / "vol", baked_cache=cache, what="LoRA"
    )
    assert found == pinned


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (LIGHTNING_SPEC, ["was not found", "runpod model cache", "network volume cache", "image cache",
                          f"fetch_models.py --file {LIGHTNING_SPEC}"]),
        ("lightx2v/Qwen-Image-Lightning:../../../etc/passwd", ["lightx2v/Qwen-Image-Lightning:../../../etc/passwd"]),
    ],
    ids=["missing", "escape"],
)
def test_repo_file_not_found_or_escaping_is_a_config_error(tmp_path, spec, words):
    from qwen_worker.models import resolve_repo_file

    repo, filename = LIGHTNING_SPEC.split(":")
    cached_file(tmp_path / "baked", repo, "other.safetensors", "d" * 40)  # the repo is there, the file is not
    with pytest.raises(ConfigError) as caught:
        resolve_repo_file(spec, volume_path=tmp_path / "vol", baked_cache=tmp_path / "baked", what="LoRA")
    for word in words:
        assert word in str(caught.value), str(caught.value)


def test_repo_file_spelling():
    from qwen_worker.models import parse_repo_file

    assert parse_repo_file(LIGHTNING_SPEC) == tuple(LIGHTNING_SPEC.split(":"))
    others = ("loras/style.safetensors", "/abs/file.safetensors", "https://x.org/a.safetensors", "a:b", "a/b/c:d")
    for not_one in others:
        assert parse_repo_file(not_one) is None, not_one
