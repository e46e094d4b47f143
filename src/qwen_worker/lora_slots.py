"""LoRA slots: user LoRAs with no per-job module injection, and no recompilation of a compiled transformer.

At start-up each transformer tree a job can run on (the pipeline's own, and each Lightning copy of ``adapters.py``)
gets a weight-sharing copy (``adapters.share_weights_copy``) carrying one more peft adapter, the *slot*: rank
``LORA_SLOT_RANK`` on every linear layer of the transformer blocks, all its weights zero. A job with LoRAs runs on
the slot copy of its tree, after its LoRAs have been written into the slot's weights, in place:

- One job's LoRAs are stacked along the rank. Where LoRA i has ``A_i`` (r_i x in), ``B_i`` (out x r_i) and peft's
  scaling ``c_i`` (alpha / r from its config, as peft would compute it) at the request's scale ``s_i``, the slot
  holds the rows ``[A_1; A_2; ...]`` and the columns ``[c_1 s_1 B_1, c_2 s_2 B_2, ...]``, zero elsewhere, so
  ``B_slot A_slot = sum_i c_i s_i B_i A_i``: the LoRAs' sum, up to rounding (the scale multiplies B instead of the
  layer's output).
- Layers none of the job's LoRAs targets hold zeros, and add exactly nothing.

So a LoRA job costs a copy of its LoRA weights into the slot (from the host-memory cache of ``loras.py``: no disk
read, parse or key conversion), creates no module and calls no peft loader; a plain job runs the untouched
transformer (the slot lives on a copy); and no module ever changes: under ``COMPILE=regional`` the slot copies are
compiled and warmed at start-up like the other trees, and a LoRA job only changes tensor values, which dynamo does
not guard on, so nothing recompiles.

A LoRA that does not fit the slot (its rank, or the job's ranks added up, over ``LORA_SLOT_RANK`` at some layer;
layers outside the transformer blocks; DoRA or LoRA biases, which a plain low-rank pair cannot hold) is refused,
naming the rank or the layers, when the transformer is compiled (loading it per job would recompile); otherwise it
is loaded per job as before (``loras.applied_loras``), and the log says so.

Costs: memory, ``rank x (in + out)`` parameters per linear layer per slot copy (590 M parameters, 1.18 GB in bf16,
at rank 64 on Qwen-Image's 840 block layers, per tree); and a LoRA job runs the slot's rank-R matmuls on every block
layer, whatever its own LoRA's rank and targets (0.42 GFLOP per token at rank 64, ~2.5 % of a 1024² forward's
1.7e10 per token; computed, not measured). ``LORA_SLOT_RANK=0`` builds no slots.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .adapters import FastModes, share_weights_copy, swapped_transformer
from .enums import FastMode
from .errors import LoraError
from .loras import RESIDENT_ADAPTERS, PreparedLora

log = logging.getLogger(__name__)

SLOT_ADAPTER = "slot"
TRANSFORMER_PREFIX = "transformer."

# Per layer, the (A, B, factor) blocks one job's LoRAs stack into the slot, in loras[i] order.
Plan = dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]


@dataclass(frozen=True)
class SlotFactors:
    """One LoRA in slot form, computed once per prepared LoRA: per layer, ``(A, B, peft's scaling)``.

    ``unfit``: why the LoRA cannot live in a slot at all (None when it can)."""

    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    unfit: str | None = None


def slot_factors(prepared: PreparedLora) -> SlotFactors:
    """``prepared`` as per-layer factors, with the scaling peft would give each layer; kept on ``prepared``."""
    cached = prepared.derived.get(SLOT_ADAPTER)
    if not isinstance(cached, SlotFactors):
        cached = prepared.derived[SLOT_ADAPTER] = _factors(prepared)
    return cached


def _factors(prepared: PreparedLora) -> SlotFactors:
    from diffusers.utils.peft_utils import _create_lora_config
    from peft.utils.other import get_pattern_key

    # What load_prepared hands diffusers' load_lora_adapter: keys (and metadata) under "transformer." with that
    # prefix removed, or a bare layout's keys as they are. The config is then built by diffusers' own function
    # (private in the pinned 0.42.1), from the same inputs, so each layer's scaling is the one the per-job loader
    # would give it; tests/test_lora_slots.py compares the images of both for alphas from kohya files and metadata.
    metadata = prepared.metadata
    if any(key.startswith(TRANSFORMER_PREFIX) for key in prepared.state_dict):
        state_dict = {
            key.removeprefix(TRANSFORMER_PREFIX): tensor
            for key, tensor in prepared.state_dict.items()
            if key.startswith(TRANSFORMER_PREFIX)
        }
        if metadata is not None:
            metadata = {
                key.removeprefix(TRANSFORMER_PREFIX): value
                for key, value in metadata.items()
                if key.startswith(TRANSFORMER_PREFIX)
            }
    else:
        state_dict = dict(prepared.state_dict)
    if not state_dict:
        return SlotFactors({}, "it has no weights for this model's transformer (is it a LoRA for a different model?)")
    ranks = {f"^{key}": tensor.shape[1] for key, tensor in state_dict.items() if "lora_B" in key and tensor.ndim > 1}
    try:
        config = _create_lora_config(state_dict, None, metadata, ranks)
    except Exception as err:  # a config diffusers cannot build would fail the per-job loader too
        return SlotFactors({}, f"its LoRA configuration cannot be read ({type(err).__name__})")
    if config.use_dora:
        return SlotFactors({}, "it is a DoRA adapter, which a LoRA slot cannot hold")
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for key, down in state_dict.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removesuffix(".lora_A.weight")
        up = state_dict.get(f"{name}.lora_B.weight")
        if up is None or down.ndim != 2 or up.ndim != 2 or f"{name}.lora_B.bias" in state_dict:
            return SlotFactors({}, f"its layer {name} is not a plain low-rank pair, which a LoRA slot cannot hold")
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        layers[name] = (down, up, float(scaling))
    stray = [key for key in state_dict if not key.endswith((".lora_A.weight", ".lora_B.weight"))]
    if stray:
        return SlotFactors({}, f"it holds tensors a LoRA slot cannot hold ({_listed(stray)})")
    return SlotFactors(layers)


@dataclass
class _SlotTree:
    """One slot copy: its layers' slot weights, and how many rank rows of each the last job filled."""

    tree: Any
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (lora_A weight, lora_B weight), rank rows
    filled: dict[str, int] = field(default_factory=dict)


@dataclass
class LoraSlots:
    """The slot copies of one pipeline's transformer trees, keyed by the fast mode whose tree each copies."""

    rank: int
    shapes: dict[str, tuple[int, int]]  # layer -> (out_features, in_features)
    _trees: dict[FastMode, _SlotTree]

    def transformers(self) -> list[Any]:
        return [slot.tree for slot in self._trees.values()]

    def tree_for(self, mode: FastMode) -> Any:
        """The slot copy a job of ``mode`` runs on (a fused mode runs on the pipeline's own tree's copy)."""
        return self._slot(mode).tree

    def _slot(self, mode: FastMode) -> _SlotTree:
        return self._trees.get(mode, self._trees[FastMode.NONE])

    def plan(self, loras: Sequence[tuple[PreparedLora, float]]) -> Plan:
        """Per layer, the ``(A, B, factor)`` blocks a job's LoRAs put in the slot. Raises LoraError naming the field
        and the rank or layers when they do not fit; writes nothing."""
        per_layer: Plan = {}
        for index, (prepared, scale) in enumerate(loras):
            field_name = f"loras[{index}]"
            factors = slot_factors(prepared)
            if factors.unfit is not None:
                raise LoraError(field_name, factors.unfit)
            outside = sorted(name for name in factors.layers if name not in self.shapes)
            if outside:
                raise LoraError(
                    field_name,
                    f"it targets layers outside the LoRA slot, which covers the linear layers of the transformer "
                    f"blocks: {_listed(outside)}",
                )
            for name, (down, up, scaling) in factors.layers.items():
                out_features, in_features = self.shapes[name]
                if down.shape[1] != in_features or up.shape[0] != out_features or down.shape[0] != up.shape[1]:
                    raise LoraError(
                        field_name,
                        f"its weights do not fit this model's layers (size mismatch at {name}); it was probably made "
                        "for a different model",
                    )
                per_layer.setdefault(name, []).append((down, up, scaling * float(scale)))
        over = {name: sum(down.shape[0] for down, _up, _f in blocks) for name, blocks in per_layer.items()}
        over = {name: rank for name, rank in over.items() if rank > self.rank}
        if over:
            name, rank = max(over.items(), key=lambda item: item[1])
            if len(loras) == 1:
                raise LoraError("loras[0]", f"its rank {rank} (at {name}) is over the LoRA slot's rank, "
                                f"LORA_SLOT_RANK={self.rank}")  # fmt: skip
            raise LoraError("loras", f"the LoRAs' ranks add up to {rank} at {name}, over the LoRA slot's rank, "
                            f"LORA_SLOT_RANK={self.rank}")  # fmt: skip
        return per_layer

    @contextmanager
    def applied(self, pipeline: Any, mode: FastMode, plan: Plan) -> Iterator[None]:
        """Run the block on ``mode``'s slot copy holding ``plan`` (``plan(loras)``); the pipeline's own transformer
        is put back after."""
        slot = self._slot(mode)
        started = time.perf_counter()
        _fill(slot, plan)
        log.info(
            "LoRAs written into the LoRA slot of the %s tree in %.1f ms",
            _tree_label(mode, fused=mode not in self._trees), (time.perf_counter() - started) * 1000,
        )  # fmt: skip
        with swapped_transformer(pipeline, slot.tree):
            yield


@torch.no_grad()
def _fill(slot: _SlotTree, plan: Plan) -> None:
    """Write ``plan`` into the slot, and zero whatever the previous job left beyond it."""
    for name, (slot_down, slot_up) in slot.weights.items():
        blocks = plan.get(name, ())
        offset = 0
        for down, up, factor in blocks:
            rank = down.shape[0]
            slot_down[offset : offset + rank].copy_(down)
            target = slot_up[:, offset : offset + rank]
            target.copy_(up)
            if factor != 1.0:
                target.mul_(factor)
            offset += rank
        before = slot.filled.get(name, 0)
        if before > offset:  # rows the last job used and this one does not: back to zero
            slot_down[offset:before].zero_()
            slot_up[:, offset:before].zero_()
        if offset:
            slot.filled[name] = offset
        else:
            slot.filled.pop(name, None)


def build_slots(pipeline: Any, fast: FastModes, rank: int, model_id: str) -> LoraSlots | None:
    """The slot copies of ``pipeline``'s trees (its own transformer and each Lightning copy); None when ``rank`` is 0
    or the transformer names no repeated blocks. Runs after quantization and Lightning, before hooks and compiling.
    """
    if rank <= 0:
        return None
    started = time.perf_counter()
    shapes = block_linear_layers(pipeline.transformer)
    if not shapes:
        log.warning("%s: its transformer names no repeated blocks; user LoRAs are loaded per job", model_id)
        return None
    from peft import LoraConfig

    trees: dict[FastMode, _SlotTree] = {}
    sources = {FastMode.NONE: pipeline.transformer, **fast.copies}
    for mode, source in sources.items():
        tree = share_weights_copy(source)
        resident: dict[str, float] = dict(getattr(source, RESIDENT_ADAPTERS, {}))
        # lora_alpha = r: peft's scaling is 1.0, so the slot's output is exactly B_slot A_slot x.
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(shapes), lora_dropout=0.0)
        with warnings.catch_warnings():
            # On a TRANSFORMER_QUANT transformer: the slot runs unmerged, and nothing is ever merged into those layers.
            warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
            # A Lightning copy already has its adapter: a second one beside it is the point.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            tree.add_adapter(config, adapter_name=SLOT_ADAPTER)
        tree.set_adapters([*resident, SLOT_ADAPTER], weights=[*resident.values(), 1.0])
        weights = {}
        for name in shapes:
            layer = tree.get_submodule(name)
            down, up = layer.lora_A[SLOT_ADAPTER].weight, layer.lora_B[SLOT_ADAPTER].weight
            with torch.no_grad():
                down.zero_()
                up.zero_()
            weights[name] = (down, up)
        trees[mode] = _SlotTree(tree, weights)
    per_tree = sum(rank * (out_f + in_f) for out_f, in_f in shapes.values())
    element_bytes = next(iter(trees[FastMode.NONE].weights.values()))[0].element_size()
    log.info(
        "%s: LoRA slots of rank %d on %d block layers, %d tree(s), %.0f MB each, built in %.1f s",
        model_id, rank, len(shapes), len(trees), per_tree * element_bytes / 1e6, time.perf_counter() - started,
    )  # fmt: skip
    return LoraSlots(rank, shapes, trees)


def block_linear_layers(transformer: Any) -> dict[str, tuple[int, int]]:
    """Every linear layer inside the transformer's repeated blocks (``_repeated_blocks``): name -> (out, in)."""
    block_classes = set(getattr(transformer, "_repeated_blocks", None) or ())
    shapes: dict[str, tuple[int, int]] = {}
    for block_name, block in transformer.named_modules():
        if type(block).__name__ not in block_classes:
            continue
        for name, module in block.named_modules():
            if isinstance(module, torch.nn.Linear):
                shapes[f"{block_name}.{name}"] = (module.out_features, module.in_features)
    return shapes


def _tree_label(mode: FastMode, *, fused: bool) -> str:
    if mode is FastMode.NONE:
        return "plain"
    return f"fast ({mode.value}{', fused' if fused else ''})"


def _listed(names: Sequence[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
