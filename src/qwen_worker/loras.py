"""Per-job LoRAs: finding the file a request names, and applying it to a pipeline for one job only.

Two halves, kept apart so each can be tested alone; neither knows about HTTP handlers or S3, and of the request
schema only ``LoraRequest`` (one ``loras[i]`` entry) is read:

``LoraStore.resolve(request, field)`` turns a ``LoraRequest.path`` into a verified local ``.safetensors`` file:

- ``https://`` / ``http://`` URL: downloaded through ``downloads.download``, exactly as input images are (its
  docstring says how SSRF is prevented). Files land in a size-capped cache: ``<sha256(url)>.safetensors`` plus a
  JSON sidecar (url hash, content sha256, size, the URL without its query string). A URL seen before is served from
  disk without any network request. Least-recently-used entries are evicted when the cache grows past its cap;
  "used" is the file's mtime, set on each hit.
- absolute path: a regular ``.safetensors`` file on the worker's disk (e.g. baked into the image).
- relative path: a file under the network volume (``/runpod-volume``); ``..`` is refused, symlinks are resolved and
  the target must stay inside the volume.
- ``org/name:path/in/repo.safetensors``: a file of a Hugging Face repo, found offline in the caches the models come
  from (``models.resolve_repo_file``; ``builder/fetch_models.py --file`` puts it there).

Whatever the source, the file's safetensors header is parsed before use. Nothing is ever unpickled: a ``.ckpt`` /
``.pt`` file renamed to ``.safetensors`` fails that check, and diffusers is called with ``use_safetensors=True`` so its
own pickle fallback is off too.

``applied_loras(pipeline, [(path, scale), ...], cache)`` is a context manager that loads each file as a peft adapter
under a fresh name, activates them with their scales, yields, and afterwards removes them so the next job meets
exactly the transformer it would have met without LoRAs: the same module classes (no leftover peft wrapper layers),
the same ``state_dict`` keys and tensors, the same attributes. Adapters are never fused into the base weights, so
removal involves no arithmetic and is exact (see ``_remove``). An empty list never touches peft. Files are read,
parsed and converted once (``prepare_lora``) and kept in host memory by content hash (``PreparedLoraCache``), so a
repeated LoRA is injected straight from memory. Adapters marked resident (the Lightning copies of ``adapters.py``)
stay active beside the job's and are never removed.

diffusers (0.42) converts the common Qwen-Image LoRA layouts itself (``QwenImageLoraLoaderMixin.lora_state_dict``):
diffusers/peft (``transformer.<module>.lora_A.weight``, with its optional ``lora_adapter_metadata`` header), kohya
(``lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight`` + ``.alpha``), ComfyUI/musubi
(``diffusion_model.<module>.lora_A|lora_down.weight``) and the Lightning-style bare ``<module>.lora_down.weight`` +
``.alpha``. One layout it silently skips, bare ``<module>.lora_A.weight`` without alphas (what
``transformer.save_lora_adapter`` writes), is loaded here through the transformer directly.

Assumes one job at a time per pipeline (the worker's model): adapters live on the shared pipeline object.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import torch
from safetensors import safe_open

from .downloads import DownloadError, download, host_of
from .enums import LoraRequest  # one loras[i] entry: path and scale (range checked by the schema)
from .errors import ConfigError, LoraError
from .models import parse_repo_file, resolve_repo_file

log = logging.getLogger(__name__)

LORA_SUFFIX = ".safetensors"
_URL_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
# Temporary downloads older than this are leftovers of a killed process; younger ones may be another worker's
# download in progress (the cache folder can be shared, e.g. on the network volume).
_STALE_TEMP_SECONDS = 3600.0


@dataclass(frozen=True)
class _CacheEntry:
    key: str
    files: tuple[Path, ...]
    size: int
    last_used_ns: int


class LoraStore:
    """Resolves ``LoraRequest.path`` to a verified local safetensors file, downloading URLs into a bounded cache.

    ``protect_recent``: eviction never removes the most recently used entries, so the LoRAs of the job being prepared
    (resolved one after another, each touched on use) are not evicted by each other before they are loaded. The cache
    may therefore exceed ``max_cache_bytes`` by at most those entries; the default matches the schema's three LoRAs
    per job.
    """

    def __init__(
        self,
        cache_dir: Path,
        max_cache_bytes: int,
        max_file_bytes: int,
        volume_path: Path,
        timeout_seconds: float,
        *,
        protect_recent: int = 3,
        prepared: PreparedLoraCache | None = None,
        baked_cache: Path | None = None,
    ) -> None:
        if max_cache_bytes < 0 or max_file_bytes <= 0 or timeout_seconds <= 0 or protect_recent < 0:
            raise ValueError("LoraStore limits must be positive")
        self.cache_dir = Path(cache_dir)
        self.max_cache_bytes = max_cache_bytes
        self.max_file_bytes = max_file_bytes
        self.volume_path = Path(volume_path)
        self.baked_cache = baked_cache  # the image's HF cache: with the volume's, where "org/name:file" is looked up
        self.timeout_seconds = timeout_seconds
        self.protect_recent = protect_recent
        self.prepared = prepared
        # Serialises cache reads, downloads and eviction within this process; across processes the cache relies on
        # atomic renames (a reader sees a whole file or none).
        self._lock = threading.Lock()
        self._last_touch_ns = 0
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()

    # ------------------------------------------------------------------------------------------------- public

    def resolve(self, request: LoraRequest, field: str) -> Path:
        """The local safetensors file for ``request``. Raises ``LoraError(field, reason)``."""
        reference = request.path.strip()
        if not reference:
            raise LoraError(field, "path is empty")
        if "\x00" in reference:
            raise LoraError(field, "path contains a NUL character")
        scheme_match = _URL_SCHEME.match(reference)
        if scheme_match:
            scheme = scheme_match.group(1).lower()
            if scheme in ("http", "https") and reference[len(scheme) + 1 :].startswith("//"):
                path = self._from_url(reference, field)
            else:
                raise LoraError(
                    field,
                    f"{scheme}: paths are not supported; use an https:// URL, an absolute path on the worker, "
                    "or a path relative to the network volume",
                )
        elif reference.startswith("/"):
            path = self._local_file(Path(reference), field)
        elif parse_repo_file(reference) is not None:
            path = self._hub_file(reference, field)
        else:
            path = self._volume_file(reference, field)
        # A file the memory cache already holds (same identity: no read needed to know) was checked when it was
        # prepared; any other is checked now, before a job is started on it.
        if self.prepared is None or not self.prepared.knows(path):
            verify_safetensors(path, field)
        return path

    # -------------------------------------------------------------------------------------------- local files

    def _local_file(self, path: Path, field: str) -> Path:
        if path.suffix.lower() != LORA_SUFFIX:
            raise LoraError(field, f"{path} is not a {LORA_SUFFIX} file (only safetensors LoRAs are accepted)")
        if not path.exists():
            raise LoraError(field, f"no file at {path}")
        if not path.is_file():
            raise LoraError(field, f"{path} is not a regular file")
        return path

    def _hub_file(self, reference: str, field: str) -> Path:
        """``org/name:file.safetensors`` from the Hugging Face caches the models come from (builder/fetch_models.py
        --file fills them): offline, never downloaded."""
        if PurePosixPath(reference).suffix.lower() != LORA_SUFFIX:
            raise LoraError(field, f"{reference} is not a {LORA_SUFFIX} file (only safetensors LoRAs are accepted)")
        try:
            return resolve_repo_file(
                reference, volume_path=self.volume_path, baked_cache=self.baked_cache, what="LoRA"
            )
        except ConfigError as err:
            raise LoraError(field, str(err)) from None

    def _volume_file(self, reference: str, field: str) -> Path:
        relative = PurePosixPath(reference)
        # Refused outright, not merely contained: a request has no business walking the volume's tree upwards, and
        # "a/../../x" style names are how escapes are usually attempted.
        if ".." in relative.parts:
            raise LoraError(field, "'..' is not allowed in a path on the network volume")
        if relative.suffix.lower() != LORA_SUFFIX:
            raise LoraError(field, f"{reference} is not a {LORA_SUFFIX} file (only safetensors LoRAs are accepted)")
        volume = self.volume_path
        if not volume.is_dir():
            raise LoraError(field, f"{reference} is a relative path but no network volume is mounted at {volume}")
        candidate = volume / relative
        try:
            resolved = candidate.resolve(strict=True)
        except FileNotFoundError:
            raise LoraError(field, f"no file {reference} on the network volume ({volume})") from None
        except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop
            reason = f"{reference} cannot be opened on the network volume ({type(err).__name__})"
            raise LoraError(field, reason) from None
        # Symlinks are followed, so the containment check is made on the real target, not on the spelling.
        if not resolved.is_relative_to(volume.resolve()):
            raise LoraError(field, f"{reference} points outside the network volume")
        if not resolved.is_file():
            raise LoraError(field, f"{reference} on the network volume is not a regular file")
        return resolved

    # ------------------------------------------------------------------------------------------------- URLs

    def _from_url(self, url: str, field: str) -> Path:
        # surrogatepass: a malformed URL must reach the download guard and be refused there, not crash the hash.
        key = hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()
        target = self.cache_dir / f"{key}{LORA_SUFFIX}"
        sidecar = self.cache_dir / f"{key}.json"
        with self._lock:
            if self._cached(target, sidecar):
                self._touch(target)
                log.info("LoRA %s: cache hit (%s)", field, _public_url(url))
                return target
            self._download(url, key, target, sidecar, field)
            self._touch(target)
            self._evict()
        return target

    def _cached(self, target: Path, sidecar: Path) -> bool:
        """A hit needs both files and a size that matches the sidecar (a torn entry is downloaded again)."""
        try:
            record = json.loads(sidecar.read_text(encoding="utf-8"))
            return target.is_file() and target.stat().st_size == int(record["size"])
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def _download(self, url: str, key: str, target: Path, sidecar: Path, field: str) -> None:
        host = host_of(url)
        started = time.perf_counter()
        digest = hashlib.sha256()
        size = 0
        temporary: Path | None = None
        try:
            # Written beside the target and renamed into place: a crash or a refused download never leaves a
            # partial file under the name a later job would trust.
            with (
                download(
                    url,
                    max_bytes=self.max_file_bytes,
                    timeout=self.timeout_seconds,
                    accept="application/octet-stream, */*",
                ) as chunks,
                tempfile.NamedTemporaryFile(
                    dir=self.cache_dir, prefix=".download-", suffix=LORA_SUFFIX, delete=False
                ) as handle,
            ):
                temporary = Path(handle.name)
                for chunk in chunks:
                    handle.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
            # Checked before it enters the cache, so the cache only ever holds usable safetensors files.
            verify_safetensors(temporary, field, source=f"the file downloaded from {host}")
            os.replace(temporary, target)
            record = {
                "url_sha256": key,
                "content_sha256": digest.hexdigest(),
                "size": size,
                "url": _public_url(url),
                "downloaded_at": int(time.time()),
            }
            _write_atomically(sidecar, json.dumps(record, indent=2) + "\n")
        except DownloadError as err:
            too_large = f"the file is larger than the LoRA download limit of {self.max_file_bytes} bytes"
            raise LoraError(field, too_large if err.too_large else err.reason) from None
        except OSError as err:
            raise LoraError(field, f"the file could not be saved in the LoRA cache ({err.strerror or err})") from None
        finally:
            if temporary is not None:
                temporary.unlink(missing_ok=True)  # gone already when the rename succeeded
        log.info(
            "LoRA %s: downloaded %d bytes from %s in %.1f s (sha256 %s)",
            field,
            size,
            _public_url(url),
            time.perf_counter() - started,
            digest.hexdigest()[:16],
        )

    # ----------------------------------------------------------------------------------------------- cache

    def _touch(self, path: Path) -> None:
        # Explicit, strictly increasing times: file systems stamp with a coarse clock, and two uses within one tick
        # would otherwise tie and make the LRU order arbitrary.
        now = max(time.time_ns(), self._last_touch_ns + 1)
        self._last_touch_ns = now
        os.utime(path, ns=(now, now))

    def _entries(self) -> list[_CacheEntry]:
        grouped: dict[str, list[Path]] = {}
        for path in self.cache_dir.iterdir():
            if path.name.startswith(".") or path.suffix not in (LORA_SUFFIX, ".json"):
                continue  # temporaries in flight, and anything that is not ours
            grouped.setdefault(path.stem, []).append(path)
        entries = []
        for key, files in grouped.items():
            try:
                stats = {path: path.stat() for path in files}
            except FileNotFoundError:
                continue  # removed by another process meanwhile
            main = self.cache_dir / f"{key}{LORA_SUFFIX}"
            last_used = stats[main].st_mtime_ns if main in stats else min(s.st_mtime_ns for s in stats.values())
            entries.append(_CacheEntry(key, tuple(files), sum(s.st_size for s in stats.values()), last_used))
        return entries

    def cache_bytes(self) -> int:
        """Bytes the cache holds now (LoRA files and their sidecars)."""
        with self._lock:
            return sum(entry.size for entry in self._entries())

    def _evict(self) -> None:
        entries = sorted(self._entries(), key=lambda e: (e.last_used_ns, e.key))
        total = sum(entry.size for entry in entries)
        protected = {entry.key for entry in entries[max(0, len(entries) - self.protect_recent) :]}
        for entry in entries:
            if total <= self.max_cache_bytes:
                break
            if entry.key in protected:
                continue
            for path in entry.files:
                path.unlink(missing_ok=True)
            total -= entry.size
            log.info("LoRA cache: evicted %s (%d bytes), %d bytes left", entry.key[:16], entry.size, total)
        if total > self.max_cache_bytes:
            log.warning(
                "LoRA cache holds %d bytes, over its %d byte cap, because the most recent LoRAs are kept",
                total,
                self.max_cache_bytes,
            )

    def _remove_stale_temporaries(self) -> None:
        cutoff = time.time() - _STALE_TEMP_SECONDS
        for pattern in (".download-*", ".sidecar-*"):  # what a killed download or sidecar write leaves behind
            for path in self.cache_dir.glob(pattern):
                try:
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                except OSError:
                    pass


# ----------------------------------------------------------------------------------------------- verification


def verify_safetensors(path: Path, field: str, *, source: str | None = None) -> list[str]:
    """Parse the file's safetensors header (no tensor is read) and return its tensor names.

    A pickle, a zip or random bytes fail here, so nothing but a safetensors header parser ever sees them.
    """
    what = source or str(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception:  # the parser's errors (SafetensorError, OSError, ...) all mean the same to the caller
        raise LoraError(field, f"{what} is not a safetensors file (pickled .ckpt/.pt/.bin LoRAs are refused)") from None
    if not keys:
        raise LoraError(field, f"{what} contains no tensors")
    if not any("lora" in key.lower() for key in keys):
        raise LoraError(field, f"{what} contains no LoRA weights (no tensor name mentions lora)")
    return keys


# ------------------------------------------------------------------------------------------------ application


@dataclass(frozen=True)
class PreparedLora:
    """A LoRA file read, parsed and converted to diffusers' transformer layout once, ready to load from memory.

    ``state_dict`` keys are what diffusers' Qwen-Image converter returns (``transformer.<module>.lora_A.weight``), or
    the file's own bare ``<module>.lora_A.weight`` keys, which the transformer's loader takes as they are.
    ``metadata`` is the file's ``lora_adapter_metadata`` (it carries a trained adapter's ``lora_alpha``).
    """

    name: str  # the file name, for logs
    content_sha256: str
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any] | None
    nbytes: int
    # Forms derived from it once and kept as long as it is (lora_slots.py's per-layer factors).
    derived: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)


def prepare_lora(path: Path, field: str) -> PreparedLora:
    """Read ``path`` once (one disk read), check it, and convert its keys. Raises ``LoraError(field, ...)``."""
    from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin
    from safetensors.torch import load as load_safetensors

    verify_safetensors(path, field)
    try:
        data = path.read_bytes()
        tensors = load_safetensors(data)
        metadata = _adapter_metadata(data)
        # Every Qwen-Image pipeline class shares this mixin's converter: kohya, ComfyUI, musubi and Lightning
        # layouts become diffusers' transformer.<module>.lora_A/B keys, with alphas folded into the weights.
        state_dict = QwenImageLoraLoaderMixin.lora_state_dict(tensors)
    except LoraError:
        raise
    except Exception as err:
        raise LoraError(field, _load_failure_reason(err)) from None
    if not all("lora" in key for key in state_dict):
        raise LoraError(field, f"{path.name} holds tensors that are not LoRA weights; it is not a LoRA file")
    nbytes = sum(tensor.numel() * tensor.element_size() for tensor in state_dict.values())
    return PreparedLora(path.name, hashlib.sha256(data).hexdigest(), state_dict, metadata, nbytes)


def _adapter_metadata(data: bytes) -> dict[str, Any] | None:
    """diffusers' ``lora_adapter_metadata`` from the safetensors header in ``data`` (8-byte length, then JSON)."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    raw = (header.get("__metadata__") or {}).get(LORA_ADAPTER_METADATA_KEY)
    return json.loads(raw) if raw else None


class PreparedLoraCache:
    """Prepared LoRAs kept in host memory, least recently used first out, bounded in bytes (LORA_MEMORY_CACHE_BYTES).

    Keyed by content sha256, so one LoRA reached by a URL and by a volume path is held once. A file is recognised
    again by its identity (device, inode, size, modification time: one ``stat``, no read), so a repeated LoRA costs
    no disk read, no safetensors parse and no key conversion. A file rewritten in place gets a new modification time
    and is read again. ``max_bytes`` 0 turns the cache off (every job prepares its files, as before).
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, PreparedLora] = OrderedDict()
        self._files: dict[tuple[int, int, int, int, str], str] = {}  # file identity -> content sha256
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def knows(self, path: Path) -> bool:
        """True when ``path`` is a file already prepared and still cached (its header need not be checked again)."""
        with self._lock:
            return self._lookup(path) is not None

    def get(self, path: Path, field: str) -> PreparedLora:
        with self._lock:
            prepared = self._lookup(path)
            if prepared is not None:
                self.hits += 1
                self._entries.move_to_end(prepared.content_sha256)
                return prepared
        prepared = prepare_lora(path, field)
        with self._lock:
            self.misses += 1
            # The same content under another name (a URL and a volume path): keep and return the one copy.
            prepared = self._entries.get(prepared.content_sha256, prepared)
            self._store(path, prepared)
        return prepared

    def _lookup(self, path: Path) -> PreparedLora | None:
        try:
            identity = _file_identity(path)
        except OSError:
            return None
        digest = self._files.get(identity)
        return None if digest is None else self._entries.get(digest)

    def _store(self, path: Path, prepared: PreparedLora) -> None:
        if prepared.nbytes > self.max_bytes:
            return  # larger than the whole cache: used for this job only
        if prepared.content_sha256 not in self._entries:
            self._entries[prepared.content_sha256] = prepared
            self._bytes += prepared.nbytes
        self._files[_file_identity(path)] = prepared.content_sha256
        while self._bytes > self.max_bytes:
            _digest, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes
            log.info("LoRA memory cache: evicted %s (%d bytes)", evicted.name, evicted.nbytes)
        live = set(self._entries)
        self._files = {identity: digest for identity, digest in self._files.items() if digest in live}


def _file_identity(path: Path) -> tuple[int, int, int, int, str]:
    stat = path.stat()
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, str(path))


# Attribute a transformer carries when adapters live on it for good (the Lightning copies of adapters.py): name ->
# weight. Per-job LoRAs are activated beside them and removed again; resident ones are never touched.
RESIDENT_ADAPTERS = "_qwen_worker_resident_adapters"


def prepared_loras(
    loras: Sequence[tuple[Path, float]], cache: PreparedLoraCache | None = None
) -> list[tuple[PreparedLora, float]]:
    """Each ``(file, scale)`` of a job prepared (``prepare_cached``). Raises LoraError."""
    return [(prepare_cached(Path(path), f"loras[{index}]", cache), scale) for index, (path, scale) in enumerate(loras)]


def prepare_cached(path: Path, field: str, cache: PreparedLoraCache | None) -> PreparedLora:
    """``path`` prepared: through ``cache`` (which prepares and keeps it on a miss), or read now without one."""
    return cache.get(path, field) if cache is not None else prepare_lora(path, field)


@contextmanager
def applied_loras(
    pipeline: Any, loras: Sequence[tuple[Path | PreparedLora, float]], cache: PreparedLoraCache | None = None
) -> Iterator[list[str]]:
    """Apply ``loras`` (``(file or prepared LoRA, scale)`` in ``loras[i]`` order) to ``pipeline`` for the block.

    Yields the adapter names. On exit, normal or not, every adapter this call added is removed. A file that cannot be
    applied (shapes for another model, no weights for this transformer) raises ``LoraError("loras[i]", ...)`` after
    the pipeline has been restored. With no LoRAs nothing at all happens. ``cache`` serves files prepared before
    (no disk read, parse or conversion); without one each file is prepared for this call.
    """
    if not loras:
        yield []
        return

    transformer = pipeline.transformer
    had_peft_flag = "_hf_peft_config_loaded" in vars(transformer)
    resident: dict[str, float] = dict(getattr(transformer, RESIDENT_ADAPTERS, {}))
    # A fresh suffix per call: an adapter left behind by a crash can never collide with, or be mistaken for, ours.
    call_id = uuid.uuid4().hex[:8]
    names: list[str] = []
    try:
        for index, (item, _scale) in enumerate(loras):
            field = f"loras[{index}]"
            prepared = item if isinstance(item, PreparedLora) else prepare_cached(Path(item), field, cache)
            name = f"job_{call_id}_{index}"
            names.append(name)  # before loading: a half-injected adapter must be cleaned up too
            load_prepared(pipeline, transformer, prepared, name, field)
        try:
            pipeline.set_adapters(
                [*resident, *names], adapter_weights=[*resident.values(), *(float(scale) for _path, scale in loras)]
            )
        except Exception as err:
            raise LoraError("loras", f"the LoRAs could not be activated ({type(err).__name__}: {err})") from None
        log.info("applied LoRAs %s", ", ".join(f"{item.name}@{s:g}" for item, s in loras))
        yield names
    finally:
        _remove(pipeline, names, had_peft_flag, resident)


def load_prepared(pipeline: Any, transformer: Any, prepared: PreparedLora, name: str, field: str) -> None:
    """Inject ``prepared`` into ``transformer`` as adapter ``name``; no file is read."""
    keys = list(prepared.state_dict)
    # Keys without any prefix (transformer.save_lora_adapter's layout) are taken as they are by the model-level
    # loader; everything else went through the pipeline converter and carries "transformer.".
    prefix = "transformer" if any(key.startswith("transformer.") for key in keys) else None
    if prefix is None and not _is_bare_transformer_layout(transformer, keys):
        # diffusers would only log a warning when nothing in the file addresses the transformer (a text-encoder-only
        # LoRA, another model's naming); applying nothing silently would be a wrong result, not a success.
        raise LoraError(
            field,
            f"{prepared.name} has no weights for this model's transformer (is it a LoRA for a different model?)",
        )
    try:
        with warnings.catch_warnings():
            # peft warns on every adapter after the first that "multiple adapters" are in the model: that is the point.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            # diffusers' own clean-up of an adapter that failed to load; the failure itself is reported below.
            warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted")
            # On a TRANSFORMER_QUANT transformer: the LoRA runs unmerged, and nothing is ever merged into those layers.
            warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
            # A shallow copy: the loader filters and renames keys, and the cached dict must stay as it is.
            # low_cpu_mem_usage: peft creates the LoRA layers empty and takes these tensors, instead of initialising
            # random weights only to overwrite them (what diffusers' own load_lora_weights does by default too).
            transformer.load_lora_adapter(
                dict(prepared.state_dict),
                prefix=prefix,
                adapter_name=name,
                metadata=prepared.metadata,
                _pipeline=pipeline,
                low_cpu_mem_usage=True,
            )
    except Exception as err:
        raise LoraError(field, _load_failure_reason(err)) from None
    if not _has_adapter(transformer, name):
        raise LoraError(
            field,
            f"{prepared.name} has no weights for this model's transformer (is it a LoRA for a different model?)",
        )


def _remove(pipeline: Any, names: Sequence[str], had_peft_flag: bool, resident: dict[str, float]) -> None:
    """Remove our adapters and, when none is left, the peft wrapper layers themselves.

    ``delete_adapters`` alone is not enough: it drops the LoRA weights but leaves every targeted ``nn.Linear`` wrapped
    in a peft ``lora.Linear`` (other module classes, ``base_layer.`` state_dict keys, an extra Python call per layer).
    ``unload_lora_weights`` swaps each wrapper back for its original ``base_layer`` module, the very same object
    with the very same tensors, since nothing was fused into them. On a transformer with resident adapters (a
    Lightning copy), only the job's adapters go, the wrappers they alone needed are unwrapped, and the resident
    adapters are active again at their own weights.
    """
    if not names:
        return
    transformer = pipeline.transformer
    loaded = list(getattr(transformer, "peft_config", None) or {})
    others = [name for name in loaded if name not in names]
    try:
        if not others:
            # Also strips the wrappers of an adapter whose loading failed half-way (diffusers forgets its name
            # but leaves the injected layers behind).
            pipeline.unload_lora_weights()
            # unload leaves an instance attribute (None) shadowing the class default (False); drop it so the
            # transformer's attributes read exactly as before.
            if not had_peft_flag:
                vars(transformer).pop("_hf_peft_config_loaded", None)
            return
        unknown = [name for name in others if name not in resident]
        if unknown:
            # Never the case in the worker's own use; said loudly rather than guessed at.
            log.warning("LoRA removal: adapters %s were not added for this job and stay loaded", unknown)
        pipeline.delete_adapters([name for name in names if name in loaded])
        _unwrap_empty_layers(transformer)
        if resident:
            pipeline.set_adapters(list(resident), adapter_weights=list(resident.values()))
    except Exception:
        # Raised even over the job's own error: a pipeline that could not be restored would silently carry this
        # job's LoRAs into the next one, which is worse than a failed job.
        log.exception("LoRA removal failed; the pipeline may still carry adapters %s", list(names))
        raise


def _unwrap_empty_layers(transformer: Any) -> None:
    """Put back the base layer of every peft wrapper that holds no adapter any more (only a job's LoRA targeted it)."""
    from peft.tuners.lora import LoraLayer

    empty = [
        (name, module)
        for name, module in transformer.named_modules()
        if isinstance(module, LoraLayer) and not any(module.lora_A) and not any(module.lora_B)
    ]
    for name, module in empty:
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        setattr(parent, child, module.get_base_layer())


def _has_adapter(transformer: Any, name: str) -> bool:
    return name in (getattr(transformer, "peft_config", None) or {})


def _is_bare_transformer_layout(transformer: Any, keys: Sequence[str]) -> bool:
    """Every key starts with one of the transformer's own top-level modules (``transformer_blocks.0...``)."""
    children = {child for child, _module in transformer.named_children()}
    return bool(keys) and all(key.split(".", 1)[0] in children for key in keys)


def _load_failure_reason(err: Exception) -> str:
    text = str(err)
    mismatch = re.search(r"size mismatch for ([\w.]+?)\.lora_[AB]\.", text)
    if mismatch:
        return (
            f"its weights do not fit this model's layers (size mismatch at {mismatch.group(1)}); "
            "it was probably made for a different model"
        )
    if type(err).__name__ == "NoMatchingPeftModuleError" or "not found in the base model" in text:
        return "its layers do not exist in this model; it was probably made for a different model"
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    return f"it could not be loaded ({type(err).__name__}: {first_line[:200]})"


# ---------------------------------------------------------------------------------------------------- helpers


def _public_url(url: str) -> str:
    """The URL without credentials, query string or fragment: what may be logged and kept in a sidecar."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host  # IPv6 literals keep their brackets
        if parts.port is not None:
            netloc += f":{parts.port}"
    except ValueError:
        return "?"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _write_atomically(path: Path, text: str) -> None:
    # Not a with-block: the name must outlive the handle, for the rename and for the clean-up in finally.
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115
        "w", dir=path.parent, prefix=".sidecar-", suffix=".json", delete=False, encoding="utf-8"
    )
    try:
        with handle:
            handle.write(text)
        os.replace(handle.name, path)
    finally:
        Path(handle.name).unlink(missing_ok=True)
