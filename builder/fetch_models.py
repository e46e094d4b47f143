#!/usr/bin/env python3
"""Download what the worker serves into a Hugging Face cache: at image build time, or onto a network volume.

    python builder/fetch_models.py [--models NAME,NAME...|none] [--repo NAME=REPO] [--revision NAME=REV]
        [--file REPO[@REV]:FILE ...] [--accept-research-license] [--cache-dir DIR] [--extra-repo REPO[@REV] ...]
        [--t2i-repo REPO] [--edit-repo REPO] [--edit-plus-repo REPO] [--revision-t2i REV] ...

Every model the worker serves has a name here (``--list`` prints them with the worker variable each one fills):

    t2i Qwen/Qwen-Image                    t2i-2512 Qwen/Qwen-Image-2512        qwen-image-2.1 Qwen/Qwen-Image-2.1
    edit Qwen/Qwen-Image-Edit              edit-plus Qwen/Qwen-Image-Edit-2509  edit-plus-2511 Qwen/Qwen-Image-Edit-2511
    layered Qwen/Qwen-Image-Layered        controlnet-union InstantX/Qwen-Image-ControlNet-Union
    lightning-8step, lightning-4step, lightning-edit-*, lightning-edit-2509-*, lightning-edit-2511-*: one LoRA file
    each from lightx2v's Lightning repos (the CATALOGUE below names each file)

``qwen-image-2.1`` is under the Qwen Research License (research and evaluation only): it is fetched only with
``--accept-research-license``. A single file is named ``REPO:FILE`` (``--file``), the same spelling the worker's
``LIGHTNING_LORA`` and a job's ``loras[].path`` accept, resolved offline in the same caches.

Examples::

    # Dockerfile (BuildKit): the token is a build secret, never a layer or a build arg
    RUN --mount=type=secret,id=hf_token,env=HF_TOKEN python builder/fetch_models.py --models t2i

    # Network volume, from a pod (a pod mounts the volume at /workspace; serverless workers at /runpod-volume, where
    # the worker looks in <volume>/.cache/huggingface/hub)
    python builder/fetch_models.py --models t2i,edit-plus,lightning-8step \
        --cache-dir /workspace/.cache/huggingface/hub

What lands on disk is huggingface_hub's own cache layout, which the worker resolves offline (src/qwen_worker/models.py):
``<cache>/models--<org>--<name>/snapshots/<commit>/`` plus ``refs/main`` naming that commit. The cache is
huggingface_hub's default (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``) unless
``--cache-dir`` names the hub cache folder itself (the one that holds the ``models--*`` folders).

For a pipeline or model repo, only what ``from_pretrained`` reads is fetched: ``model_index.json`` and, per
component, its JSON/text configs, tokenizer files and ``*.safetensors`` weights (shards and their index). Pickled or
other-framework weights (``*.bin``, ``*.pt``, ``*.ckpt``, ``*.onnx``, ``*.msgpack``, ``*.h5``, ``*.gguf``), precision
variants (``*.fp16.safetensors`` ...: the worker loads the plain files, without ``variant=``), READMEs and images are
skipped. A single file (``--file``, the Lightning names) is fetched as named and checked to be a safetensors file.

Re-running is cheap and safe: files already in the cache are not fetched again (with huggingface_hub 2.x a re-run
costs one API call per repo). The unit of resumption is the file: huggingface_hub retries a broken transfer in-process
with HTTP Range requests, but a file whose download was killed starts again from zero on the next run. Leftover
partial files of killed runs (``blobs/*.incomplete``) are removed once they are an hour old.

After each download the snapshot is verified (every component of ``model_index.json`` has its folder, a config file,
weights where it is a model, and every shard its ``*.safetensors.index.json`` names), and per-component sizes are
printed. The token is read from the ``HF_TOKEN`` environment variable only (never a stored login) and never printed.

Exit status: 0 everything fetched and verified (or ``--models none``), 1 a download or verification failed, 2 usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Entry:
    """One thing the worker serves, by the name ``--models`` takes.

    ``kind``: "pipeline" (a diffusers folder with model_index.json), "model" (config.json and weights at the root, a
    ControlNet) or "file" (the ``files`` of a LoRA repo). ``variable`` is the worker setting it fills, and the
    Dockerfile build argument of the same name bakes it. ``revision`` is None (the repo's main) where no commit has been
    checked: pinning one we have not seen would fail a build instead of protecting it; ``--revision NAME=REV`` pins.
    """

    name: str
    kind: str
    repo: str
    variable: str
    files: tuple[str, ...] = ()
    revision: str | None = None
    research_license: bool = False


# Where each name comes from (read 2026-12-03; re-check a repo's "Files" page before changing one):
# - the Qwen/* pipeline ids: Qwen's model cards on huggingface.co, the ids diffusers' QwenImage* docs load;
# - InstantX/Qwen-Image-ControlNet-Union: diffusers' QwenImageControlNetModel docs (config.json +
#   diffusion_pytorch_model.safetensors at the root); DiffSynth's ControlNet "patches" are another format, not loadable;
# - lightx2v/Qwen-Image-Lightning: ModelTC/Qwen-Image-Lightning's README (its release list links each file; 8-step
#   V1.1 and 4-step V1.0 are the ones its performance report compares; V2.0 files exist beside them, --file fetches
#   those); the Edit-2509 files sit in the repo's Qwen-Image-Edit-2509/ folder;
# - lightx2v/Qwen-Image-Edit-2511-Lightning: the repo of the 2511 files (its 8- and 4-step bf16 files).
LIGHTNING = "lightx2v/Qwen-Image-Lightning"
LIGHTNING_2511 = "lightx2v/Qwen-Image-Edit-2511-Lightning"
CATALOGUE: tuple[Entry, ...] = (
    Entry("t2i", "pipeline", "Qwen/Qwen-Image", "QWEN_IMAGE_MODEL"),
    Entry("t2i-2512", "pipeline", "Qwen/Qwen-Image-2512", "QWEN_IMAGE_MODEL"),
    Entry("qwen-image-2.1", "pipeline", "Qwen/Qwen-Image-2.1", "QWEN_IMAGE_MODEL", research_license=True),
    Entry("edit", "pipeline", "Qwen/Qwen-Image-Edit", "QWEN_IMAGE_EDIT_MODEL"),
    Entry("edit-plus", "pipeline", "Qwen/Qwen-Image-Edit-2509", "QWEN_IMAGE_EDIT_MODEL"),
    Entry("edit-plus-2511", "pipeline", "Qwen/Qwen-Image-Edit-2511", "QWEN_IMAGE_EDIT_MODEL"),
    Entry("layered", "pipeline", "Qwen/Qwen-Image-Layered", "QWEN_IMAGE_LAYERED_MODEL"),
    Entry("controlnet-union", "model", "InstantX/Qwen-Image-ControlNet-Union", "QWEN_IMAGE_CONTROLNET_MODEL"),
    Entry("lightning-8step", "file", LIGHTNING, "LIGHTNING_LORA", ("Qwen-Image-Lightning-8steps-V1.1.safetensors",)),
    Entry(
        "lightning-4step", "file", LIGHTNING, "LIGHTNING_LORA_4STEP", ("Qwen-Image-Lightning-4steps-V1.0.safetensors",)
    ),
    Entry(
        "lightning-edit-8step", "file", LIGHTNING, "LIGHTNING_EDIT_LORA",
        ("Qwen-Image-Edit-Lightning-8steps-V1.0.safetensors",),
    ),
    Entry(
        "lightning-edit-4step", "file", LIGHTNING, "LIGHTNING_EDIT_LORA_4STEP",
        ("Qwen-Image-Edit-Lightning-4steps-V1.0.safetensors",),
    ),
    Entry(
        "lightning-edit-2509-8step", "file", LIGHTNING, "LIGHTNING_EDIT_LORA",
        ("Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16.safetensors",),
    ),
    Entry(
        "lightning-edit-2509-4step", "file", LIGHTNING, "LIGHTNING_EDIT_LORA_4STEP",
        ("Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors",),
    ),
    Entry(
        "lightning-edit-2511-8step", "file", LIGHTNING_2511, "LIGHTNING_EDIT_LORA",
        ("Qwen-Image-Edit-2511-Lightning-8steps-V1.0-bf16.safetensors",),
    ),
    Entry(
        "lightning-edit-2511-4step", "file", LIGHTNING_2511, "LIGHTNING_EDIT_LORA_4STEP",
        ("Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors",),
    ),
)
ENTRIES = {entry.name: entry for entry in CATALOGUE}
MODEL_CHOICES = tuple(ENTRIES)
# The three names that had their own --<name>-repo / --revision-<name> options first; they stay.
DEFAULT_REPOS = {name: ENTRIES[name].repo for name in ("t2i", "edit", "edit-plus")}
RESEARCH_LICENSE = "Qwen Research License (research and evaluation only, not commercial use)"


def setting(entry: Entry) -> str:
    """What the worker's variable (and the Dockerfile build argument of the same name) is set to for ``entry``."""
    return f"{entry.repo}:{entry.files[0]}" if entry.kind == "file" else entry.repo

# What a diffusers pipeline folder needs. fnmatch's "*" also matches "/", so "*/x" covers any depth below the root;
# the root itself only holds model_index.json (plus README/LICENSE/images we do not want).
PIPELINE_ALLOW_PATTERNS = [
    "model_index.json",
    "*/*.json",  # config.json, scheduler_config.json, tokenizer/processor configs, *.safetensors.index.json
    "*/*.txt",  # merges.txt
    "*/*.safetensors",
    "*/*.model",  # sentencepiece tokenizers
    "*/*.jinja",  # chat templates kept outside tokenizer_config.json
    "*/*.tiktoken",
]
# --extra-repo may name a plain model repo (config.json and weights at the root), so the root counts too there.
MODEL_ALLOW_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.model", "*.jinja", "*.tiktoken"]
IGNORE_PATTERNS = [
    # Weights in other formats: safetensors is what we load (and the only format that cannot run code on load).
    "*.bin",
    "*.bin.index.json",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.onnx",
    "*.onnx_data",
    "*.msgpack",
    "*.h5",
    "*.gguf",
    "*.tflite",
    # Precision variants (diffusers/transformers name them model.fp16.safetensors, model-00001-of-00002.fp16.safetensors
    # and model.safetensors.index.fp16.json). The worker calls from_pretrained without variant=, which reads only the
    # plain files; a repo shipping nothing but variants fails verification below instead of being half-fetched.
    "*.fp16.safetensors",
    "*.fp32.safetensors",
    "*.bf16.safetensors",
    "*.non_ema.safetensors",
    "*.safetensors.index.fp16.json",
    "*.safetensors.index.fp32.json",
    "*.safetensors.index.bf16.json",
    "*.safetensors.index.non_ema.json",
]

# Files that make a folder loadable by from_pretrained (any one of them).
CONFIG_FILES = (
    "config.json",
    "scheduler_config.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "feature_extractor_config.json",
)
# Components that always carry weights, whatever their class is called.
MODEL_COMPONENTS = frozenset({"transformer", "vae", "text_encoder", "unet", "image_encoder"})
# Classes without weights: tokenizers, processors, schedulers.
_WEIGHTLESS_CLASS_SUFFIXES = (
    "Tokenizer", "TokenizerFast", "Processor", "ProcessorFast", "FeatureExtractor", "Scheduler",
)
_COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")
STALE_PARTIAL_SECONDS = 3600

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
OFFLINE_MESSAGE = (
    "HF_HUB_OFFLINE is set, so huggingface_hub refuses to download; run this command with HF_HUB_OFFLINE=0 "
    "(the worker itself keeps it set)"
)


class FetchError(RuntimeError):
    """A download or verification failure, with a message meant for the operator."""


class VerificationError(FetchError):
    """A downloaded folder is not a complete pipeline/model."""


class UsageError(ValueError):
    pass


@dataclass(frozen=True)
class Target:
    label: str  # a catalogue name, "extra" (--extra-repo) or "file" (--file)
    repo_id: str
    revision: str | None
    kind: str = "pipeline"  # "pipeline", "model" or "file", as in Entry
    files: tuple[str, ...] = ()  # kind "file": the files to fetch


# --------------------------------------------------------------------------------------------------------- download


def fetch(
    repo_id: str,
    revision: str | None = None,
    cache_dir: Path | None = None,
    *,
    pipeline: bool = True,
) -> Path:
    """Download ``repo_id`` at ``revision`` (default: main) into the cache, verify it and return the snapshot folder.

    ``pipeline=False`` (for ``--extra-repo``) also fetches files at the repo root and only checks a diffusers layout
    when the repo has a ``model_index.json``. Raises FetchError (VerificationError) with a message naming the repo.
    """
    from huggingface_hub import constants, snapshot_download

    if constants.is_offline_mode():
        raise FetchError(OFFLINE_MESSAGE)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    token = _token()
    print(
        f"==> {repo_id} @ {revision or 'main'} into {cache} "
        f"({'with' if token else 'without'} HF_TOKEN, from {constants.ENDPOINT})",
        flush=True,
    )
    _remove_stale_partials(cache / ("models--" + repo_id.replace("/", "--")))
    started = time.monotonic()
    progress = _progress_class()
    try:
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache,
                token=token or False,  # False: never fall back to a login stored on this machine
                allow_patterns=PIPELINE_ALLOW_PATTERNS if pipeline else MODEL_ALLOW_PATTERNS,
                ignore_patterns=IGNORE_PATTERNS,
                tqdm_class=progress,
            )
        )
    except Exception as err:  # noqa: BLE001 - every failure becomes one operator-facing message
        raise FetchError(_describe_error(err, repo_id, revision, token)) from None
    finally:
        _close_bars(progress)
    if revision not in (None, "main"):
        try:
            _pin_main(folder)
        except OSError as err:
            raise FetchError(f"downloaded {repo_id} to {folder} but could not write refs/main: {err}") from None
    print(f"    downloaded in {time.monotonic() - started:.1f} s", flush=True)
    if pipeline or (folder / "model_index.json").is_file():
        verify_pipeline_folder(folder)
    else:
        verify_model_folder(folder)
    return folder


def fetch_files(
    repo_id: str, files: tuple[str, ...], revision: str | None = None, cache_dir: Path | None = None
) -> list[Path]:
    """Download single ``files`` of ``repo_id`` (LoRA files) into the cache, check each is a safetensors file, and
    return their paths in the snapshot. Raises FetchError naming the repo and file."""
    from huggingface_hub import constants, hf_hub_download

    if constants.is_offline_mode():
        raise FetchError(OFFLINE_MESSAGE)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    token = _token()
    print(
        f"==> {repo_id} @ {revision or 'main'}: {', '.join(files)} into {cache} "
        f"({'with' if token else 'without'} HF_TOKEN, from {constants.ENDPOINT})",
        flush=True,
    )
    _remove_stale_partials(cache / ("models--" + repo_id.replace("/", "--")))
    paths = []
    for filename in files:
        started = time.monotonic()
        try:
            path = Path(
                hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache, token=token or False)
            )
        except Exception as err:  # noqa: BLE001 - every failure becomes one operator-facing message
            raise FetchError(_describe_error(err, repo_id, revision, token) + f" (file {filename})") from None
        verify_safetensors_file(path, f"{repo_id}:{filename}")
        print(f"    {filename}: {human_size(path.stat().st_size)} in {time.monotonic() - started:.1f} s", flush=True)
        paths.append(path)
    snapshot = paths[0]
    for _ in Path(files[0]).parts:
        snapshot = snapshot.parent
    if revision not in (None, "main"):
        try:
            _pin_main(snapshot)
        except OSError as err:
            raise FetchError(f"downloaded {repo_id} to {snapshot} but could not write refs/main: {err}") from None
    print(f"    snapshot {snapshot}: verified OK", flush=True)
    return paths


def verify_safetensors_file(path: Path, what: str) -> None:
    """A safetensors file starts with an 8-byte little-endian header length and that much JSON: check both, read
    nothing else (a LoRA saved as a pickle or an HTML error page fails here, not in the worker)."""
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 2 <= length <= 100_000_000 or length + 8 > path.stat().st_size:
                raise ValueError(f"header length {length} does not fit the file's {path.stat().st_size} bytes")
            header = json.loads(handle.read(length))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
    except (OSError, ValueError) as err:
        raise VerificationError(f"{what} is not a safetensors file: {err}") from None


def _token() -> str | None:
    return os.environ.get("HF_TOKEN", "").strip() or None


def _pin_main(snapshot: Path) -> None:
    """Point ``refs/main`` at the snapshot just fetched.

    huggingface_hub records a branch or tag download as ``refs/<revision>`` and a commit-hash download as no ref at
    all, leaving ``refs/main`` as it was (absent, or naming whatever main was last time). The worker resolves a repo
    id offline through ``refs/main`` (else the only snapshot present), exactly like ``from_pretrained`` without a
    revision does, so an explicitly requested revision would otherwise be ignored or ambiguous. Pinning ``refs/main``
    makes the offline worker load precisely the revision this command was asked for.
    """
    commit = snapshot.name
    ref = snapshot.parent.parent / "refs" / "main"
    ref.parent.mkdir(parents=True, exist_ok=True)
    if ref.is_file() and ref.read_text().strip() == commit:
        return
    tmp = ref.with_name(f"main.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref)  # atomic: a concurrent reader never sees an empty ref
    print(f"    refs/main -> {commit} (pinned to the requested revision)", flush=True)


def _remove_stale_partials(repo_dir: Path) -> None:
    """Delete ``blobs/*.incomplete`` left by killed runs (each run writes its own, so they are never reused).

    A live download rewrites its file every chunk, so an hour-old one is dead.
    """
    blobs = repo_dir / "blobs"
    if not blobs.is_dir():
        return
    now = time.time()
    for partial in blobs.glob("*.incomplete"):
        try:
            if now - partial.stat().st_mtime > STALE_PARTIAL_SECONDS:
                size = partial.stat().st_size
                partial.unlink()
                print(f"    removed a stale partial download {partial.name} ({human_size(size)})", flush=True)
        except OSError:
            pass


_PROGRESS_CLASS: type | None = None


def _progress_class() -> type:
    """huggingface_hub's tqdm, but drawn on a non-TTY too (a docker build log): plain lines, throttled to 30 s.

    huggingface_hub leaves ``disable=None`` (tqdm: no bar unless stderr is a terminal), so a build would show nothing
    for many minutes. HF_HUB_DISABLE_PROGRESS_BARS=1 still turns the bars off.
    """
    global _PROGRESS_CLASS
    if _PROGRESS_CLASS is None:
        from huggingface_hub.utils import tqdm as hf_tqdm

        class BuildLogProgress(hf_tqdm):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                if kwargs.get("disable") is None:
                    kwargs["disable"] = False
                if not _stderr_is_tty():
                    kwargs.setdefault("mininterval", 30.0)
                    kwargs["position"] = 0  # no cursor-up escapes ("\x1b[A") between stacked bars in a log file
                super().__init__(*args, **kwargs)

        BuildLogProgress.set_lock(threading.RLock())
        _PROGRESS_CLASS = BuildLogProgress
    return _PROGRESS_CLASS


def _close_bars(progress: type) -> None:
    """Close the bars snapshot_download leaves open (it never closes its byte bars), so that they print their final
    state now, once, instead of again at exit and glued to whatever line comes next."""
    for bar in list(getattr(progress, "_instances", ())):
        if isinstance(bar, progress):
            with contextlib.suppress(Exception):  # a progress bar must never fail a download
                bar.close()


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _describe_error(err: BaseException, repo_id: str, revision: str | None, token: str | None) -> str:
    """One clear line for a failed snapshot_download (never containing the token)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision or 'main'}"
    chain = _exception_chain(err)
    status = next(
        (
            e.response.status_code
            for e in chain
            if isinstance(e, HfHubHTTPError) and getattr(e, "response", None) is not None
        ),
        None,
    )
    token_hint = "HF_TOKEN is not set" if token is None else "the token in HF_TOKEN was refused"

    if any(isinstance(e, GatedRepoError) for e in chain):
        message = (
            f"HF_TOKEN missing or lacks access to {repo_id}: it is a gated repo; accept its terms on its Hub page "
            f"with the account that owns the token ({token_hint})"
        )
    elif any(isinstance(e, RevisionNotFoundError) for e in chain):
        message = f"repo or revision not found: {repo_id} has no revision {revision or 'main'!r}"
    elif any(isinstance(e, RemoteEntryNotFoundError) for e in chain):
        message = f"a file listed in {where} could not be found on the Hub: {_first_line(err)}"
    elif status in (401, 403):
        # The Hub answers 401 for private and gated repos without a valid token, and for repos that do not exist.
        message = (
            f"HF_TOKEN missing or lacks access to {repo_id} (HTTP {status}: {token_hint}; "
            "or the repo does not exist)"
        )
    elif status == 404 or any(isinstance(e, RepositoryNotFoundError) for e in chain):
        message = f"repo or revision not found: {where} (HTTP {status or 404})"
    elif status is not None:
        message = f"the Hub answered HTTP {status} for {where}: {_first_line(err)}"
    elif isinstance(err, LocalEntryNotFoundError):
        message = f"could not reach the Hub for {where} and it is not in the cache: {_first_line(err)}"
    elif isinstance(err, OSError):
        message = f"download of {where} failed: {err}"
    else:
        message = f"download of {where} failed: {type(err).__name__}: {_first_line(err)}"
    return _scrub(message, token)


def _exception_chain(err: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _first_line(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text[:500]


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


# ----------------------------------------------------------------------------------------------------- verification


def verify_pipeline_folder(folder: Path, *, report: bool = True) -> dict[str, Any]:
    """Check that ``folder`` is a complete diffusers pipeline and return its sizes.

    Every component that ``model_index.json`` lists as a ``[library, class]`` pair must have its folder with a config
    file; model components (transformer, vae, text encoder, ...) also need ``*.safetensors`` weights, and each
    ``*.safetensors.index.json`` must find every shard it names. Raises VerificationError listing everything missing.

    Returns ``{"path", "revision", "components": {name: {"class", "bytes", "files"}}, "total_bytes"}`` and, unless
    ``report=False``, prints it.
    """
    folder = Path(folder)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise VerificationError(f"{folder}: no model_index.json, so this is not a diffusers pipeline folder")
    try:
        index = json.loads(index_file.read_text())
        if not isinstance(index, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise VerificationError(f"{index_file} is not valid JSON: {err}") from None

    problems: list[str] = []
    components: dict[str, dict[str, Any]] = {}
    for name, value in index.items():
        if name.startswith("_") or not _is_component(value):
            continue
        library, class_name = value
        sub = folder / name
        components[name] = {"class": f"{library}.{class_name}", "bytes": 0, "files": 0}
        if not sub.is_dir():
            problems.append(f"{name}/ ({class_name}) is missing")
            continue
        if not any((sub / config).is_file() for config in CONFIG_FILES):
            problems.append(f"{name}/ has no config file (one of {', '.join(CONFIG_FILES)})")
        needs_weights = name in MODEL_COMPONENTS or not class_name.endswith(_WEIGHTLESS_CLASS_SUFFIXES)
        problems.extend(_weight_problems(sub, f"{name}/", needs_weights))
        sizes = _sizes(sub)
        components[name].update(bytes=sum(sizes.values()), files=len(sizes))
    if not components:
        problems.append("model_index.json lists no components")
    if problems:
        raise VerificationError(f"{folder} is incomplete: " + "; ".join(problems))

    result = {
        "path": str(folder),
        "revision": folder.name if _COMMIT_HASH.match(folder.name) else None,
        "components": components,
        "total_bytes": sum(_sizes(folder).values()),
    }
    if report:
        print(format_report(result), flush=True)
    return result


def verify_model_folder(folder: Path, *, report: bool = True) -> dict[str, Any]:
    """The check for a plain (non-pipeline) repo fetched with --extra-repo: files present, shards complete."""
    folder = Path(folder)
    sizes = _sizes(folder)
    problems = [] if sizes else ["nothing was downloaded (no file matched the patterns)"]
    for sub in sorted({folder, *(p.parent for p in folder.rglob("*.safetensors.index.json"))}):
        rel = "" if sub == folder else f"{sub.relative_to(folder).as_posix()}/"
        problems.extend(_weight_problems(sub, rel, needs_weights=False))
    if problems:
        raise VerificationError(f"{folder} is incomplete: " + "; ".join(problems))
    result = {
        "path": str(folder),
        "revision": folder.name if _COMMIT_HASH.match(folder.name) else None,
        "components": {},
        "total_bytes": sum(sizes.values()),
    }
    if report:
        print(format_report(result), flush=True)
    return result


def _is_component(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(part, str) and part for part in value)
    )


def _weight_problems(sub: Path, label: str, needs_weights: bool) -> list[str]:
    problems = []
    indexes = sorted(sub.glob("*.safetensors.index.json"))
    for index_path in indexes:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            problems.append(f"{label}{index_path.name} is not a valid shard index ({err})")
            continue
        missing = [shard for shard in shards if not (sub / shard).is_file()]
        problems.extend(f"{label}{shard} (listed in {label}{index_path.name}) is missing" for shard in missing)
    if needs_weights and not indexes and not any(p.is_file() for p in sub.glob("*.safetensors")):
        problems.append(f"{label} has no *.safetensors weights (only safetensors are fetched)")
    return problems


def _sizes(folder: Path) -> dict[str, int]:
    """Size of every file under ``folder`` (following the cache's symlinks to blobs); broken links are skipped."""
    sizes = {}
    for path in folder.rglob("*"):
        try:
            if path.is_file():
                sizes[path.relative_to(folder).as_posix()] = path.stat().st_size
        except OSError:
            pass
    return sizes


def format_report(result: dict[str, Any]) -> str:
    lines = [f"    snapshot {result['path']}", f"    revision {result['revision'] or 'n/a (not a cache snapshot)'}"]
    for name, info in result["components"].items():
        lines.append(f"      {name:<14} {human_size(info['bytes']):>10}  {info['files']:>3} files  {info['class']}")
    lines.append(f"    total {human_size(result['total_bytes'])} ({result['total_bytes']} bytes): verified OK")
    return "\n".join(lines)


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


# -------------------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fetch_models.py",
        description="Download what the Qwen-Image worker serves (safetensors only) into a Hugging Face cache and "
        "verify it. The token comes from the HF_TOKEN environment variable.",
        epilog="Exit status: 0 ok, 1 download/verification failed, 2 usage error.",
    )
    parser.add_argument(
        "--models",
        default="t2i",
        metavar="LIST",
        help=f"comma-separated names ({', '.join(MODEL_CHOICES)}), or none to fetch nothing (default: t2i); "
        "--list shows what each is",
    )
    parser.add_argument(
        "--list", action="store_true", help="print every name, its repo and the worker variable it fills"
    )
    parser.add_argument(
        "--repo", action="append", default=[], metavar="NAME=REPO", help="another repo for a name (repeatable)"
    )
    parser.add_argument(
        "--revision",
        action="append",
        default=[],
        metavar="NAME=REV",
        help="branch, tag or commit for a name (repeatable; default: the repo's main)",
    )
    parser.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="REPO[@REV]:FILE",
        help="one file of a repo, e.g. a LoRA (repeatable; the spelling LIGHTNING_LORA takes)",
    )
    parser.add_argument(
        "--accept-research-license",
        action="store_true",
        help=f"needed to fetch qwen-image-2.1: the {RESEARCH_LICENSE}",
    )
    # The first three names' own options (the Dockerfile and older scripts use them).
    parser.add_argument("--t2i-repo", default=DEFAULT_REPOS["t2i"], metavar="REPO", help="default: %(default)s")
    parser.add_argument("--edit-repo", default=DEFAULT_REPOS["edit"], metavar="REPO", help="default: %(default)s")
    parser.add_argument(
        "--edit-plus-repo", default=DEFAULT_REPOS["edit-plus"], metavar="REPO", help="default: %(default)s"
    )
    parser.add_argument("--revision-t2i", metavar="REV", help="branch, tag or commit (default: main)")
    parser.add_argument("--revision-edit", metavar="REV")
    parser.add_argument("--revision-edit-plus", metavar="REV")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="hub cache folder (holds models--*), e.g. /workspace/.cache/huggingface/hub on a pod's network volume "
        "(default: HF_HUB_CACHE, else HF_HOME/hub)",
    )
    parser.add_argument(
        "--extra-repo",
        action="append",
        default=[],
        metavar="REPO[@REV]",
        help="another repo to fetch the same way (repeatable)",
    )
    return parser


def catalogue_table() -> str:
    """``--list``: each name and the worker variable (= Dockerfile build argument) it fills, with its value."""
    lines = []
    for entry in CATALOGUE:
        note = "  (needs --accept-research-license)" if entry.research_license else ""
        lines.append(f"{entry.name:<26} {entry.variable}={setting(entry)}{note}")
    return "\n".join(lines)


def plan(args: argparse.Namespace) -> list[Target]:
    """The repos to fetch, in order, from parsed arguments. Raises UsageError."""
    names = [part.strip() for part in args.models.split(",") if part.strip()]
    if not names or names == ["none"]:
        names = []
    elif "none" in names:
        raise UsageError("--models: 'none' cannot be combined with other models")
    unknown = [name for name in names if name not in MODEL_CHOICES]
    if unknown:
        raise UsageError(f"--models: unknown {', '.join(unknown)} (choose from {', '.join(MODEL_CHOICES)}, or none)")
    repos = {entry.name: entry.repo for entry in CATALOGUE}
    repos.update({"t2i": args.t2i_repo, "edit": args.edit_repo, "edit-plus": args.edit_plus_repo})
    repos.update(_named_values(args.repo, "--repo"))
    revisions: dict[str, str | None] = {entry.name: entry.revision for entry in CATALOGUE}
    own = {"t2i": args.revision_t2i, "edit": args.revision_edit, "edit-plus": args.revision_edit_plus}
    revisions.update({name: value for name, value in own.items() if value})
    revisions.update(_named_values(args.revision, "--revision"))

    targets = []
    for name in dict.fromkeys(names):
        entry = ENTRIES[name]
        option = f"--{name}-repo" if name in DEFAULT_REPOS else f"--repo {name}="
        targets.append(
            Target(name, _repo_id(repos[name], option), revisions[name] or None, entry.kind, entry.files)
        )
    for spec in args.file:
        repo, revision, filename = parse_file_spec(spec)
        targets.append(Target("file", repo, revision, "file", (filename,)))
    for spec in args.extra_repo:
        repo, _, rev = spec.partition("@")
        targets.append(Target("extra", _repo_id(repo, "--extra-repo"), rev.strip() or None, "model"))

    research = {entry.repo for entry in CATALOGUE if entry.research_license}
    for target in targets:
        if target.repo_id in research and not args.accept_research_license:
            raise UsageError(
                f"{target.repo_id} is under the {RESEARCH_LICENSE}: pass --accept-research-license to fetch it "
                "(build arg QWEN_IMAGE_ACCEPT_RESEARCH_LICENSE=true); the worker serves it only with "
                "QWEN_IMAGE_ACCEPT_RESEARCH_LICENSE=true"
            )

    unique: dict[str, Target] = {}
    for target in targets:
        seen = unique.get(target.repo_id)
        if seen is None:
            unique[target.repo_id] = target
            continue
        if (seen.revision or "main") != (target.revision or "main"):
            raise UsageError(
                f"{target.repo_id} is asked for at two revisions ({seen.revision or 'main'} and "
                f"{target.revision or 'main'}); a cache can pin only one as refs/main"
            )
        if (seen.kind == "file") != (target.kind == "file"):
            raise UsageError(f"{target.repo_id} is asked for both whole and as single files; ask for one of them")
        if target.kind == "file":  # several files of one repo: one download step, one pinned revision
            files = tuple(dict.fromkeys(seen.files + target.files))
            unique[target.repo_id] = Target(seen.label, seen.repo_id, seen.revision, "file", files)
    return list(unique.values())


def parse_file_spec(spec: str) -> tuple[str, str | None, str]:
    """``REPO[@REV]:FILE`` -> (repo, revision, file). Raises UsageError."""
    head, sep, filename = spec.strip().partition(":")
    repo, _, revision = head.partition("@")
    filename = filename.strip()
    parts = filename.split("/")
    if not sep or not filename or filename.startswith("/") or ".." in parts or "" in parts:
        raise UsageError(f"--file: {spec!r} is not REPO[@REV]:FILE (a file path inside the repo)")
    return _repo_id(repo, "--file"), revision.strip() or None, filename


def _named_values(values: list[str], option: str) -> dict[str, str]:
    named = {}
    for value in values:
        name, sep, setting_ = value.partition("=")
        name = name.strip()
        if not sep or name not in ENTRIES or not setting_.strip():
            raise UsageError(f"{option}: {value!r} is not NAME=VALUE with NAME one of {', '.join(MODEL_CHOICES)}")
        named[name] = setting_.strip()
    return named


def _repo_id(value: str, option: str) -> str:
    value = value.strip()
    parts = value.split("/")
    if not value or len(parts) > 2 or not all(parts) or any(" " in part for part in parts):
        raise UsageError(f"{option}: {value!r} is not a Hugging Face repo id (org/name)")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: 2 on a usage error, 0 for --help
        return int(exit_.code or 0)
    if args.list:
        print(catalogue_table())
        return EXIT_OK
    try:
        targets = plan(args)
    except UsageError as err:
        parser.print_usage(sys.stderr)
        print(f"fetch_models.py: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if not targets:
        print("--models none: nothing to fetch (models come from a network volume or Runpod's model cache)")
        return EXIT_OK
    from huggingface_hub import constants

    if constants.is_offline_mode():
        print(f"error: {OFFLINE_MESSAGE}", file=sys.stderr)
        return EXIT_FAILED

    failures: list[str] = []
    for target in targets:
        try:
            if target.kind == "file":
                fetch_files(target.repo_id, target.files, target.revision, args.cache_dir)
            else:
                fetch(target.repo_id, target.revision, args.cache_dir, pipeline=target.kind == "pipeline")
        except FetchError as err:
            message = _scrub(f"{target.label} {target.repo_id}: {err}", _token())
            failures.append(message)
            print(f"error: {message}", file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            print("interrupted: re-run the same command to resume (finished files are kept)", file=sys.stderr)
            return 130
    if failures:
        print(f"{len(failures)} of {len(targets)} repo(s) failed:", file=sys.stderr)
        for message in failures:
            print(f"  - {message}", file=sys.stderr)
        return EXIT_FAILED
    print(f"done: {len(targets)} repo(s) fetched and verified")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
