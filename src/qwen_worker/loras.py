"""Per-job LoRAs applied to a pipeline for one job only; finding and reading the files is ``lora_files.py``.

``applied_loras(pipeline, [(path, scale), ...], cache)`` is a context manager that loads each file as a peft adapter
under a fresh name, activates them with their scales, yields, and afterwards removes them so the next job meets
exactly the transformer it would have met without LoRAs: the same module classes (no leftover peft wrapper layers),
the same ``state_dict`` keys and tensors, the same attributes. Adapters are never fused into the base weights, so
removal involves no arithmetic and is exact (see ``_remove``). An empty list never touches peft. Files are prepared
once (``lora_files.prepare_lora``) and served from host memory (``PreparedLoraCache``) when a cache is given.
Adapters resident on the tree (a Lightning copy's, ``trees.Tree.resident``) stay active beside the job's and are never
removed.

Assumes one job at a time per pipeline (the worker's model): adapters live on the shared pipeline object.
"""

from __future__ import annotations

import logging
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import LoraError
from .lora_files import PreparedLora, PreparedLoraCache, load_failure_reason, prepare_cached

log = logging.getLogger(__name__)

@contextmanager
def applied_loras(
    pipeline: Any,
    loras: Sequence[tuple[Path | PreparedLora, float]],
    cache: PreparedLoraCache | None = None,
    *,
    resident: Mapping[str, float] | None = None,
) -> Iterator[list[str]]:
    """Apply ``loras`` (``(file or prepared LoRA, scale)`` in ``loras[i]`` order) to ``pipeline`` for the block.

    Yields the adapter names. On exit, normal or not, every adapter this call added is removed. A file that cannot be
    applied (shapes for another model, no weights for this transformer) raises ``LoraError("loras[i]", ...)`` after
    the pipeline has been restored. With no LoRAs nothing at all happens. ``cache`` serves files prepared before
    (no disk read, parse or conversion); without one each file is prepared for this call. ``resident``: the adapters
    that live on the pipeline's transformer for good (name -> weight, ``trees.Tree.resident``), kept active beside the
    job's and never removed.
    """
    if not loras:
        yield []
        return

    transformer = pipeline.transformer
    had_peft_flag = "_hf_peft_config_loaded" in vars(transformer)
    kept: dict[str, float] = dict(resident or {})
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
                [*kept, *names], adapter_weights=[*kept.values(), *(float(scale) for _path, scale in loras)]
            )
        except Exception as err:
            raise LoraError("loras", f"the LoRAs could not be activated ({type(err).__name__}: {err})") from None
        log.info("applied LoRAs %s", ", ".join(f"{item.name}@{s:g}" for item, s in loras))
        yield names
    finally:
        _remove(pipeline, names, had_peft_flag, kept)


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
        raise LoraError(field, load_failure_reason(err)) from None
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


