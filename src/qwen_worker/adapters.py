"""Lightning fast mode without per-job loading: each Lightning file is read and applied once, at start-up.

Two ways, chosen by ``LIGHTNING_FUSE`` (the measurements behind the choice are in docs/PERFORMANCE.md):

- **Resident copy (default).** For each configured file, a second module tree of the transformer that shares every
  base weight tensor with the original (nothing of the 20B model is copied) and carries the Lightning LoRA as a
  resident peft adapter. A fast job runs on that tree, a plain job on the untouched original: switching is one
  attribute assignment on the pipeline, with no disk read, no parse, no module injection, and a plain job runs
  exactly the modules it would run without Lightning (no disabled peft wrapper in its way). The cost is the LoRA
  weights themselves (~0.85 GB in bf16 for the 8-step file) and, in a fast job, the LoRA's own matmuls.
- **Fused (``LIGHTNING_FUSE=true``).** For an endpoint that serves only fast jobs: the one configured Lightning file
  is merged into the transformer's weights at start-up and the adapter removed, so a fast job runs the plain
  graph, at plain speed. Plain requests (and the other fast mode) are then refused, never silently run fast. The
  merge happens once; fusing and unfusing per job is never done, as subtracting the delta in bf16 does not restore
  the weights exactly.

A fused *second* transformer beside the plain one was measured too and not taken: it saves the LoRA's matmuls in a
fast job (~2.5 % of the FLOPs at rank 64) for the memory of a whole second transformer (~41 GB in bf16).

Per-job LoRAs run on the LoRA-slot copy of the job's tree (``lora_slots.py``), or, when they do not fit a slot, are
added to the tree itself beside the resident Lightning adapter (``loras.applied_loras``) and removed afterwards.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .enums import FastMode
from .errors import ConfigError, LoraError
from .loras import RESIDENT_ADAPTERS, load_prepared, prepare_lora

log = logging.getLogger(__name__)

LIGHTNING_ADAPTER = "lightning"


@dataclass
class FastModes:
    """What a pipeline does for each fast mode, built once at load time (``resident_lightning`` or ``fuse_lightning``).

    ``copies``: the transformer tree to run per mode (resident adapters). ``fused``: the one mode merged into the
    pipeline's own transformer (``LIGHTNING_FUSE``); when set, that is the only mode served, and plain jobs are not.
    """

    copies: dict[FastMode, Any] = field(default_factory=dict)
    fused: FastMode | None = None

    def transformers(self) -> list[Any]:
        return list(self.copies.values())


def share_weights_copy(transformer: Any) -> Any:
    """A second module tree of ``transformer`` whose parameters and buffers are the very same tensor objects.

    ``deepcopy`` with every parameter and buffer pre-entered in its memo copies the Python module objects (so peft can
    wrap layers in the copy without touching the original) but never a weight. Must run before compilation and
    before any hook is attached (those are attached per tree by ``apply_acceleration``).
    """
    memo: dict[int, Any] = {id(tensor): tensor for tensor in transformer.parameters()}
    memo.update({id(tensor): tensor for tensor in transformer.buffers()})
    return copy.deepcopy(transformer, memo)


def fuse_lightning(pipeline: Any, files: dict[FastMode, Path], model_id: str) -> FastModes:
    """LIGHTNING_FUSE: merge the one configured file into the transformer's weights. Raises ConfigError.

    Runs before quantization (peft cannot merge into a quantized weight) and before compilation.
    """
    if len(files) != 1:
        raise ConfigError(
            f"LIGHTNING_FUSE=true merges one Lightning LoRA into {model_id}'s transformer, but "
            + ("none is configured" if not files else "both the 8-step and the 4-step file are configured")
            + "; configure exactly the one this endpoint serves"
        )
    ((mode, path),) = files.items()
    _fuse(pipeline, path, model_id)
    return FastModes(fused=mode)


def resident_lightning(pipeline: Any, files: dict[FastMode, Path], model_id: str) -> FastModes:
    """Read each Lightning file once onto its own weight-sharing copy of the transformer. Raises ConfigError.

    Runs after quantization (the copies share the quantized weights) and before any hook or compilation.
    """
    copies = {}
    for mode, path in files.items():
        started = time.perf_counter()
        prepared = _prepared(path, model_id)
        tree = share_weights_copy(pipeline.transformer)
        try:
            load_prepared(pipeline, tree, prepared, LIGHTNING_ADAPTER, str(path))
        except LoraError as err:
            raise ConfigError(f"Lightning LoRA {path} cannot be applied to {model_id}: {err.reason}") from None
        setattr(tree, RESIDENT_ADAPTERS, {LIGHTNING_ADAPTER: 1.0})
        copies[mode] = tree
        log.info(
            "%s: Lightning %s resident (%s, %.0f MB) in %.1f s",
            model_id,
            mode.value,
            path.name,
            prepared.nbytes / 1e6,
            time.perf_counter() - started,
        )
    return FastModes(copies=copies)


def _prepared(path: Path, model_id: str) -> Any:
    try:
        return prepare_lora(path, str(path))
    except LoraError as err:
        raise ConfigError(f"Lightning LoRA {path} for {model_id} cannot be read: {err.reason}") from None


def _fuse(pipeline: Any, path: Path, model_id: str) -> None:
    transformer = pipeline.transformer
    prepared = _prepared(path, model_id)
    try:
        load_prepared(pipeline, transformer, prepared, LIGHTNING_ADAPTER, str(path))
    except LoraError as err:
        raise ConfigError(f"Lightning LoRA {path} cannot be applied to {model_id}: {err.reason}") from None
    # Merged into the weights once, then the wrappers go: the transformer is a plain one with other weights.
    transformer.fuse_lora(lora_scale=1.0, adapter_names=[LIGHTNING_ADAPTER])
    transformer.unload_lora()
    vars(transformer).pop("_hf_peft_config_loaded", None)
    log.info("%s: Lightning %s fused into the transformer (LIGHTNING_FUSE=true)", model_id, path.name)


@contextmanager
def fast_transformer(pipeline: Any, fast: FastModes, mode: FastMode) -> Iterator[None]:
    """Run the block on the transformer tree of ``mode``, and always put the pipeline's own one back."""
    tree = fast.copies.get(mode)
    if tree is None:  # plain, or the fused mode: the pipeline's own transformer
        yield
        return
    with swapped_transformer(pipeline, tree):
        yield


@contextmanager
def swapped_transformer(pipeline: Any, tree: Any) -> Iterator[None]:
    """Run the block with ``tree`` as the pipeline's transformer, and always put the pipeline's own one back."""
    own = pipeline.transformer
    pipeline.transformer = tree
    try:
        yield
    finally:
        pipeline.transformer = own
