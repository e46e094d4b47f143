"""The transformer tree a job runs on, chosen in one place.

Every tree is made at start-up (``loading.prepare_pipeline``); a job picks one, by its fast mode and its LoRAs:

- **plain**: the pipeline's own transformer, for a plain job (or the fused mode of LIGHTNING_FUSE, whose Lightning
  LoRA is in its weights);
- **Lightning copy**: the resident copy of ``adapters.py`` for a fast job;
- **slot copy**: the LoRA-slot copy of either (``lora_slots.py``) for a job with LoRAs that fit the slot, written into
  it in place;
- otherwise the job's LoRAs are **loaded per job** onto the plain tree or the Lightning copy (``loras.applied_loras``,
  slower; the result's notes say so), beside the adapters resident there, and removed after it; except on a compiled
  transformer, where that would recompile: there the job is refused, naming what did not fit.

The choice travels as one value, a ``Tree``: the module and the adapters that live on it for good, which a per-job
LoRA is activated beside and which are never removed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .enums import FastMode
from .errors import LoraError
from .lora_files import PreparedLora, PreparedLoraCache, prepared_loras
from .loras import applied_loras

if TYPE_CHECKING:
    from .loading import LoadedPipeline

log = logging.getLogger(__name__)

PLAIN = "plain"
LIGHTNING_COPY = "Lightning copy"
SLOT_COPY = "slot copy"


@dataclass(frozen=True)
class Tree:
    """A transformer module tree a job runs on, with the adapters resident on it (name -> weight), and its kind
    (``PLAIN``, ``LIGHTNING_COPY``, ``SLOT_COPY``: what the logs and the GPU benchmark call it)."""

    module: Any
    resident: Mapping[str, float] = field(default_factory=dict)
    kind: str = PLAIN


@contextmanager
def job_tree(
    pipeline: Any,
    loaded: LoadedPipeline,
    mode: FastMode,
    loras: Sequence[tuple[Path, float]],
    cache: PreparedLoraCache | None,
    notes: list[str],
) -> Iterator[Tree]:
    """Put on ``pipeline`` the tree for a job of fast mode ``mode`` with ``loras`` (read through ``cache``), yield
    it, and always put the pipeline's own transformer back. A LoRA loaded per job is said in ``notes``."""
    base = fast_tree(pipeline, loaded, mode)
    if not loras:
        with swapped_transformer(pipeline, base.module):
            yield base
        return
    prepared = prepared_loras(loras, cache)
    slot = _slot_tree(loaded, mode, prepared, notes)
    if slot is not None:
        with swapped_transformer(pipeline, slot.module):
            yield slot
        return
    with swapped_transformer(pipeline, base.module), applied_loras(pipeline, prepared, resident=base.resident):
        yield base


def fast_tree(pipeline: Any, loaded: LoadedPipeline, mode: FastMode) -> Tree:
    """The tree a job of ``mode`` runs on without LoRAs: its Lightning copy, else the pipeline's own transformer."""
    module = loaded.fast.copies.get(mode)
    if module is None:  # plain, or the fused mode
        return Tree(pipeline.transformer)
    return Tree(module, loaded.fast.resident(mode), LIGHTNING_COPY)


def _slot_tree(
    loaded: LoadedPipeline, mode: FastMode, loras: Sequence[tuple[PreparedLora, float]], notes: list[str]
) -> Tree | None:
    """The slot copy holding ``loras``, or None when there is no slot or they do not fit it (loaded per job then;
    refused when compiled)."""
    if loaded.slots is None:
        return None
    try:
        plan = loaded.slots.plan(loras)  # checks only: nothing is written when they do not fit
    except LoraError as err:
        if loaded.compiled_sizes is not None:
            raise LoraError(
                err.field, f"{err.reason}; this endpoint is compiled (COMPILE=regional), so LoRAs are served only "
                "through the LoRA slot"
            ) from None
        log.info("%s does not fit the LoRA slot (%s): loaded for this job", err.field, err.reason)
        notes.append(f"{err.field} does not fit this endpoint's LoRA slot ({err.reason}), so it was loaded for "
                     "this job, which takes longer")  # fmt: skip
        return None
    return loaded.slots.fill(mode, plan)


@contextmanager
def swapped_transformer(pipeline: Any, module: Any) -> Iterator[None]:
    """Run the block with ``module`` as the pipeline's transformer, and always put the pipeline's own one back."""
    own = pipeline.transformer
    pipeline.transformer = module
    try:
        yield
    finally:
        pipeline.transformer = own
