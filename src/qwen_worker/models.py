"""Finding a model's folder on local disk, offline, before anything is loaded.

A model is named either by a local folder or by a Hugging Face repo id (``Qwen/Qwen-Image``). A repo id is looked
up, in this order, in:

1. Runpod's cached-model store: ``<volume>/huggingface-cache/hub/models--<org>--<name>/snapshots/<rev>/``
   (Runpod fills it when the endpoint's "Model" setting names the repo);
2. a Hugging Face cache on the network volume: ``<volume>/.cache/huggingface/hub`` (what
   ``HF_HOME=<volume>/.cache/huggingface`` or ``builder/fetch_models.py --cache-dir`` produce);
3. the cache baked into the image: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``.

In a cache the revision is the one ``refs/main`` points at, else the only snapshot present. Nothing here touches the
network; a model found nowhere is a ``ConfigError`` that names the repo id, every place looked and how to fix it.

``resolve_folder`` does the search for any model whose folder has a known file at its root (``config.json`` for the
safety checker); ``resolve_model`` is that search for a diffusers pipeline (``model_index.json``), plus its class.
``resolve_repo_file`` finds one file of a repo, named ``org/name:path/in/repo`` (a Lightning LoRA, a user LoRA), in the
same caches: what ``builder/fetch_models.py --file`` (or its Lightning names) puts there.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)

RUNPOD_CACHE_SUBDIR = Path("huggingface-cache/hub")
VOLUME_HF_CACHE_SUBDIR = Path(".cache/huggingface/hub")
# "org/name:path/in/repo": one file of a Hugging Face repo (Hub repo names: letters, digits, "-", "_", ".").
REPO_FILE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+):(?P<file>[^:]+)$")


@dataclass(frozen=True)
class ResolvedFolder:
    """A model folder ready for ``from_pretrained``, and where it came from."""

    model_id: str  # what the operator asked for: a repo id or a folder
    path: Path
    revision: str | None  # the snapshot hash when found in a cache
    source: str  # "local folder", "runpod model cache", "network volume cache", "image cache"


@dataclass(frozen=True)
class ResolvedModel(ResolvedFolder):
    """A diffusers pipeline folder, with the pipeline class its model_index.json names."""

    pipeline_class: str  # model_index.json's _class_name


def resolve_model(
    spec: str, *, volume_path: Path, baked_cache: Path | None, variable: str = "QWEN_IMAGE_MODEL"
) -> ResolvedModel:
    """Find the diffusers pipeline ``spec`` (a folder or a repo id) on local disk, or raise ConfigError.

    ``variable`` is the environment variable that named it, so the error tells the operator what to change."""
    found = resolve_folder(
        spec,
        volume_path=volume_path,
        baked_cache=baked_cache,
        required_file="model_index.json",
        what=f"Model ({variable})",
    )
    index = found.path / "model_index.json"
    try:
        class_name = json.loads(index.read_text())["_class_name"]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"Model {spec!r}: {index} is not a valid model_index.json ({err})") from None
    return ResolvedModel(found.model_id, found.path, found.revision, found.source, class_name)


def resolve_folder(
    spec: str, *, volume_path: Path, baked_cache: Path | None, required_file: str, what: str
) -> ResolvedFolder:
    """Find ``spec`` (a folder or a repo id) on local disk, or raise ConfigError saying where we looked.

    ``required_file`` must be at the folder's root (``model_index.json`` for a pipeline, ``config.json`` for a
    transformers model); ``what`` names the model in messages ("Model", "Safety checker", ...).
    """
    looked: list[str] = []
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return _found(spec, folder, None, "local folder", required_file, what)
    looked.append(f"local folder {folder} (does not exist)")

    if not _looks_like_repo_id(spec):
        raise ConfigError(
            f"{what} {spec!r} is neither an existing folder nor a Hugging Face repo id (org/name). Looked in: "
            + "; ".join(looked)
        )

    for cache, source in _caches(volume_path, baked_cache):
        repo_dir = cache / ("models--" + spec.replace("/", "--"))
        snapshot, why_not = _snapshot_in(repo_dir)
        if snapshot is not None:
            return _found(spec, snapshot, snapshot.name, source, required_file, what)
        looked.append(f"{source} {repo_dir} ({why_not})")

    raise ConfigError(
        f"{what} {spec} was not found on this machine (the worker never downloads at run time). Looked in: "
        + "; ".join(looked)
        + f". Fix: bake it into the image (builder/fetch_models.py), enable Runpod's cached model '{spec}' on the "
        "endpoint, put it on the network volume, or point the variable at a local folder."
    )


def _caches(volume_path: Path, baked_cache: Path | None) -> list[tuple[Path, str]]:
    """The Hugging Face caches a repo id is looked up in, in order, each with the name the log gives it."""
    return [
        (volume_path / RUNPOD_CACHE_SUBDIR, "runpod model cache"),
        (volume_path / VOLUME_HF_CACHE_SUBDIR, "network volume cache"),
        (baked_cache or Path.home() / ".cache/huggingface/hub", "image cache"),
    ]


def parse_repo_file(spec: str) -> tuple[str, str] | None:
    """``org/name:path/in/repo`` -> (repo id, file), or None when ``spec`` is not spelled that way."""
    match = REPO_FILE.match(spec.strip())
    return (match["repo"], match["file"]) if match else None


def resolve_repo_file(spec: str, *, volume_path: Path, baked_cache: Path | None, what: str) -> Path:
    """The local path of ``spec`` (``org/name:path/in/repo``), found offline in the same caches as the models.

    The revision is the one a pipeline of that repo would get (``refs/main``, else the only snapshot), and the file is
    then looked up with huggingface_hub's own offline cache lookup (``try_to_load_from_cache``: no network, and a
    file name escaping the snapshot is refused). Raises ConfigError naming every place looked and the fix.
    """
    from huggingface_hub import try_to_load_from_cache

    parsed = parse_repo_file(spec)
    if parsed is None:
        raise ConfigError(f"{what} {spec!r} is not spelled org/name:path/in/repo")
    repo, filename = parsed
    looked: list[str] = []
    for cache, source in _caches(volume_path, baked_cache):
        repo_dir = cache / ("models--" + repo.replace("/", "--"))
        snapshot, why_not = _snapshot_in(repo_dir)
        if snapshot is None:
            looked.append(f"{source} {repo_dir} ({why_not})")
            continue
        try:
            found = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=snapshot.name)
        except ValueError as err:  # huggingface_hub refuses absolute names and ".." before touching the disk
            raise ConfigError(f"{what} {spec!r}: {err}") from None
        path = Path(found) if isinstance(found, str) else None
        # The snapshot's entry is a link into the repo's blobs/: a link leading anywhere else is not this repo's file.
        if path is not None and path.resolve().is_relative_to(repo_dir.resolve()):
            log.info("%s %s: from %s at %s (revision %s)", what, spec, source, path, snapshot.name)
            return path
        looked.append(f"{source} {snapshot} (no file {filename})")
    raise ConfigError(
        f"{what} {spec} was not found on this machine (the worker never downloads at run time). Looked in: "
        + "; ".join(looked)
        + f". Fix: fetch it with builder/fetch_models.py --file {spec} (into the image, or onto the network volume "
        "with --cache-dir <volume>/.cache/huggingface/hub), or name a local file."
    )


def _found(spec: str, path: Path, revision: str | None, source: str, required_file: str, what: str) -> ResolvedFolder:
    if not (path / required_file).is_file():
        raise ConfigError(
            f"{what} {spec!r} at {path} has no {required_file}: it is not laid out as the Hugging Face repo is"
        )
    log.info("%s %s: from %s at %s (revision %s)", what, spec, source, path, revision or "n/a")
    return ResolvedFolder(spec, path, revision, source)


def _snapshot_in(repo_dir: Path) -> tuple[Path | None, str]:
    """The snapshot folder a cache would serve for the main branch, or None and the reason."""
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None, "not present"
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        revision = ref.read_text().strip()
        candidate = snapshots / revision
        if candidate.is_dir():
            return candidate, ""
        return None, f"refs/main names {revision} but that snapshot is missing"
    present = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(present) == 1:
        return present[0], ""
    if not present:
        return None, "no snapshot"
    return None, f"{len(present)} snapshots and no refs/main to choose between them"


def _looks_like_repo_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))
