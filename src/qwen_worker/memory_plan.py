"""MEMORY_PLAN: what the configured models will take on the GPU, added up before anything is loaded.

Each component's bytes come from its safetensors headers (8 bytes of length, then a JSON header naming each tensor's
dtype and shape; nothing past the header is read), in the dtype the worker loads it in (bf16 on a GPU, float32 on a
CPU; integer tensors as stored). To that the plan adds what the worker builds at start-up, from the same headers: a
resident Lightning copy per configured file (its LoRA weights), the LoRA slots (``LORA_SLOT_RANK`` x (in + out) per
block layer, per tree: ``lora_slots.py``), and an activation reserve for the largest job the loaded models accept
(``activation_reserve``). A component two pipelines share (``SHARE_COMPONENTS``, identical files) counts once.

The total is compared with the GPU's free memory (``torch.cuda.mem_get_info``), or with ``MEMORY_PLAN_GPU_GB`` when
set. The plans, least lossy first (``PLANS``):

    bf16          everything on the GPU as configured (TRANSFORMER_QUANT as set)
    fp8 / int8    the transformers quantized (fp8 where the GPU has compute capability 8.9+, else int8)
    + text encoder on the CPU     the text encoder runs on the CPU (prompt encoding slower), the rest on the GPU
    + model CPU offload           diffusers' enable_model_cpu_offload: one model on the GPU at a time (every job
                                  moves the transformer in and out: much slower)

``MEMORY_PLAN=check`` (default): when the configured setup does not fit, the worker does not start and every job says
what it needs, what the GPU has and what would fit. ``auto``: the first plan that fits is loaded, and the log and
every result's ``notes`` say which. ``off``: no comparison (the plan is still logged).

The activation reserve is an estimate (``activation_reserve``), not a measurement: a GPU run of
``bench/gpu_bench.py`` records the real peak.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .models import ResolvedModel

log = logging.getLogger(__name__)

GB = 1000**3
MEMORY_PLANS = ("check", "auto", "off")

# safetensors dtype names -> bytes per element; the floating ones are cast to the load dtype.
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
FLOATING = frozenset({"F64", "F32", "F16", "BF16"})
MAX_HEADER_BYTES = 100 * 1000**2  # a real header is a few hundred KB; more is a corrupt or foreign file

# torchao's quantized linear weight: 1 byte per element, plus per output row 5 bytes for int8 weight-only (measured
# on the pinned torchao with quantization.linear_weight_bytes) and at most a float32 scale for fp8 (assumed).
QUANT_ROW_BYTES = {"int8": 5, "fp8": 4}

# A block's linear layers, the ones LORA_SLOT_RANK covers: "<name>blocks.<n>.<...>.weight", two-dimensional.
_BLOCK_LAYER = re.compile(r"^(?:[a-z_]*\.)?[a-z_]*blocks\.\d+\.")

# Activation reserve (an estimate, see activation_reserve): live bytes per transformer token per hidden unit in
# bf16 (hidden states, q/k/v, attention output, the 4x MLP and its activation, modulation: ~16 values), per decoded
# pixel per VAE base channel (~8 full-resolution feature maps alive in the decoder), and a fixed allowance for cuBLAS
# and attention workspaces and the allocator's slack.
TOKEN_VALUES_PER_HIDDEN = 16
VAE_MAPS_PER_BASE_CHANNEL = 8
WORKSPACE_BYTES = int(1.5 * GB)
TEXT_TOKENS = 1024  # the prompt template and the longest prompt the encoders keep, rounded up
REFERENCE_PIXELS = 1024 * 1024  # the edit pipelines resize each reference to ~1 MP for the VAE (VAE_IMAGE_SIZE)


@dataclass(frozen=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]

    @property
    def elements(self) -> int:
        count = 1
        for side in self.shape:
            count *= side
        return count


def read_header(path: Path) -> dict[str, Tensor]:
    """The tensors a safetensors file declares (name -> dtype, shape), read from its header alone.

    Raises ConfigError naming the file when it is not a safetensors file."""
    return _read_header(path)[0]


def _read_header(path: Path) -> tuple[dict[str, Tensor], int]:
    """The tensors, and the length the header says the file has (8 + header + data)."""
    try:
        with open(path, "rb") as handle:
            length_bytes = handle.read(8)
            if len(length_bytes) < 8:
                raise ConfigError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
            length = int.from_bytes(length_bytes, "little")
            if not 2 <= length <= MAX_HEADER_BYTES:
                raise ConfigError(f"{path} is not a safetensors file (header length {length})")
            raw = handle.read(length)
    except OSError as err:
        raise ConfigError(f"{path} cannot be read ({err.strerror or err})") from None
    if len(raw) < length:
        raise ConfigError(f"{path} is cut short inside its header (an incomplete download?)")
    try:
        header = json.loads(raw)
        tensors = {
            name: Tensor(str(entry["dtype"]), tuple(int(side) for side in entry["shape"]))
            for name, entry in header.items()
            if name != "__metadata__"
        }
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"{path} has a malformed safetensors header ({type(err).__name__})") from None
    unknown = sorted({tensor.dtype for tensor in tensors.values()} - set(DTYPE_BYTES))
    if unknown:
        raise ConfigError(f"{path} holds tensors of dtype {', '.join(unknown)}, which this plan does not know")
    data = sum(tensor.elements * DTYPE_BYTES[tensor.dtype] for tensor in tensors.values())
    return tensors, 8 + length + data


@dataclass(frozen=True)
class Weights:
    """One component's weight files, as their headers describe them."""

    folder: Path
    files: tuple[Path, ...]
    tensors: Mapping[str, Tensor]
    short_files: tuple[Path, ...] = ()  # shorter than their header says: an incomplete download, most likely
    estimated: bool = False  # no safetensors: sized from the files' lengths, in their stored dtype

    @property
    def file_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)

    def load_bytes(self, element_bytes: int) -> int:
        """Bytes once loaded: floating tensors at ``element_bytes`` each, the others as stored."""
        if self.estimated:
            return self.file_bytes
        return sum(
            tensor.elements * (element_bytes if tensor.dtype in FLOATING else DTYPE_BYTES[tensor.dtype])
            for tensor in self.tensors.values()
        )

    def quantized_bytes(self, element_bytes: int, quant: str) -> int:
        """Bytes once TRANSFORMER_QUANT=``quant`` has quantized the linear weights (2-D floating ``.weight``)."""
        if quant == "none":
            return self.load_bytes(element_bytes)
        total = 0
        for name, tensor in self.tensors.items():
            if tensor.dtype in FLOATING and len(tensor.shape) == 2 and name.endswith(".weight"):
                total += tensor.elements + tensor.shape[0] * QUANT_ROW_BYTES[quant]
            else:
                total += tensor.elements * (element_bytes if tensor.dtype in FLOATING else DTYPE_BYTES[tensor.dtype])
        return total

    def block_layers(self) -> dict[str, tuple[int, int]]:
        """The linear layers of the repeated blocks (those the LoRA slots cover): name -> (out, in)."""
        return {
            name.removesuffix(".weight"): (tensor.shape[0], tensor.shape[1])
            for name, tensor in self.tensors.items()
            if len(tensor.shape) == 2 and name.endswith(".weight") and _BLOCK_LAYER.match(name)
            and tensor.dtype in FLOATING
        }

    def identity(self) -> tuple[Any, ...]:
        """What two identical components have alike, read for free: in a Hugging Face cache each file's blob (named
        by its content hash, so exact); elsewhere file names and lengths and every tensor's name, dtype and shape
        (the loader's ComponentPool then hashes plain folders' contents before it shares)."""
        return (
            tuple((path.name, path.stat().st_size, _blob(path)) for path in self.files),
            tuple(sorted((name, tensor.dtype, tensor.shape) for name, tensor in self.tensors.items())),
        )


def _blob(path: Path) -> str | None:
    """The content-hash blob a Hugging Face cache links ``path`` to, or None outside a cache."""
    target = path.resolve()
    return target.name if path.is_symlink() and target.parent.name == "blobs" else None


WEIGHT_STEMS = ("diffusion_pytorch_model", "model")


def component_weights(folder: Path) -> Weights:
    """The weights ``from_pretrained`` would load from ``folder``: a sharded set named by its index, else the one
    ``.safetensors`` file, else (an older layout) a ``.bin`` sized by its length. Raises ConfigError when none."""
    for stem in WEIGHT_STEMS:
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ConfigError(f"{index} is not a valid safetensors index") from None
            missing = [name for name in names if not (folder / name).is_file()]
            if missing:
                raise ConfigError(f"{folder} lacks {len(missing)} of the shards its index names: {', '.join(missing)}")
            return _from_files(folder, [folder / name for name in names])
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return _from_files(folder, [single])
    bins = sorted(folder.glob("*.bin"))
    if bins:
        return Weights(folder, tuple(bins), {}, estimated=True)
    raise ConfigError(f"{folder} holds no weights (no *.safetensors, no index, no *.bin)")


def _from_files(folder: Path, files: Sequence[Path]) -> Weights:
    tensors: dict[str, Tensor] = {}
    short = []
    for path in files:
        own, declared_length = _read_header(path)
        tensors.update(own)
        if path.stat().st_size < declared_length:
            short.append(path)
    return Weights(folder, tuple(files), tensors, tuple(short))


# ------------------------------------------------------------------------------------------------ the setup


@dataclass(frozen=True)
class Item:
    """One line of the plan: a component (or what the worker builds) and its GPU bytes per quantization."""

    label: str
    kind: str  # transformer | text_encoder | vae | controlnet | safety_checker | lightning | lora_slots | reserve
    bytes_by_quant: Mapping[str, int]  # "none" | "int8" | "fp8" -> bytes (only transformers differ)
    source: str = ""
    pipeline: str | None = None  # the variable of the pipeline it belongs to; None: shared or pipeline-independent
    pipelines: tuple[str, ...] = ()  # every pipeline that uses it (a shared component lists several)

    def at(self, quant: str) -> int:
        return self.bytes_by_quant.get(quant, self.bytes_by_quant["none"])


@dataclass(frozen=True)
class PipelineSetup:
    """One configured pipeline, as the plan needs it."""

    variable: str  # QWEN_IMAGE_MODEL, ...
    model_id: str
    folder: Path
    source: str  # where the model was found (models.py)
    components: Mapping[str, tuple[str, Path]]  # name -> (class name, folder)
    lightning: Sequence[Path] = ()  # resident Lightning files (not fused)
    max_size: tuple[int, int] = (2048, 2048)
    references: int = 0  # reference images an edit adds to the transformer's tokens (each ~1 MP)
    frames: int = 1  # layered: the layers and the input, decoded and denoised together


def pipeline_setup(
    model: ResolvedModel, variable: str, lightning: Sequence[Path] = (), *, serves_edits: bool = False
) -> PipelineSetup:
    """``model`` as the plan sees it: its large components (model_index.json) and the largest job its profile
    accepts. ``lightning``: its resident Lightning files (none when fused: a fused file adds nothing).
    ``serves_edits``: it also serves the edits (2.1 with no edit model configured), so its references count."""
    from .loading import MODEL_COMPONENT_NAMES
    from .profiles import PROFILES
    from .schema import MAX_LAYERS, Task

    try:
        index = json.loads((model.path / "model_index.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{model.path / 'model_index.json'} cannot be read ({err})") from None
    components = {
        name: (str(entry[1]), model.path / name)
        for name, entry in index.items()
        # a malformed entry is left to the loader, which names it
        if name in MODEL_COMPONENT_NAMES and isinstance(entry, list) and len(entry) == 2
        and all(isinstance(part, str) and part for part in entry)
    }
    profile = PROFILES.get(model.pipeline_class)
    if profile is None:
        return PipelineSetup(variable, model.model_id, model.path, model.source, components, tuple(lightning))
    if Task.LAYERS in profile.tasks:
        # the layered pipeline sizes from its resolution bucket (at most 1024) and denoises every layer and the input
        return PipelineSetup(variable, model.model_id, model.path, model.source, components, tuple(lightning),
                             (1024, 1024), 0, MAX_LAYERS + 1)
    side = profile.sizes.max_side
    edits = profile.tasks[0] is Task.EDIT or serves_edits
    references = profile.max_reference_images if edits else 0
    return PipelineSetup(variable, model.model_id, model.path, model.source, components, tuple(lightning),
                         (side, side), references)


@dataclass(frozen=True)
class Setup:
    pipelines: Sequence[PipelineSetup]
    controlnet: Path | None = None
    safety_checker: Path | None = None
    lora_slot_rank: int = 0
    share_components: bool = True
    batched_cfg: bool = False


@dataclass(frozen=True)
class Plan:
    """One way to load the setup: the transformers' quantization and what runs off the GPU."""

    quant: str  # none | int8 | fp8
    offload: str = "none"  # none | text_encoder | model
    gpu_bytes: int = 0

    @property
    def name(self) -> str:
        base = {"none": "bf16", "int8": "int8", "fp8": "fp8"}[self.quant]
        return base + {"none": "", "text_encoder": " + text encoder on the CPU", "model": " + model CPU offload"}[
            self.offload
        ]

    @property
    def settings(self) -> str:
        """How an operator gets this plan."""
        quant = f"TRANSFORMER_QUANT={self.quant}"
        if self.offload == "none":
            return quant
        where = "text encoder on the CPU" if self.offload == "text_encoder" else "model CPU offload"
        return f"MEMORY_PLAN=auto ({quant}, {where})"


@dataclass
class MemoryReport:
    setup: Setup
    items: list[Item]
    available: int | None  # bytes of GPU memory planned against; None: no GPU and no size given
    available_source: str
    mode: str  # MEMORY_PLAN
    configured: Plan
    candidates: list[Plan] = field(default_factory=list)  # the ladder, least lossy first, bytes filled in
    chosen: Plan | None = None  # what the worker loads; None: nothing fits (or nothing to compare with)
    alternatives: list[tuple[str, int]] = field(default_factory=list)  # "without QWEN_IMAGE_EDIT_MODEL" -> bytes
    warnings: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.available is None or self.mode == "off" or self.chosen is not None

    def total(self, plan: Plan) -> int:
        return plan_bytes(self.items, plan)

    def note(self) -> str | None:
        """What every result says under MEMORY_PLAN=auto when the plan is not the configured one."""
        if self.chosen is None or self.chosen == self.configured:
            return None
        return (
            f"memory plan: {self.chosen.name} (MEMORY_PLAN=auto; {self.configured.name} needs "
            f"{_gb(self.configured.gpu_bytes)}, the GPU has {_gb(self.available)})"
        )

    def failure(self) -> str:
        """The start-up error when nothing the mode allows fits."""
        needed = self.configured.gpu_bytes
        message = (
            f"the configured models need {_gb(needed)} of GPU memory ({self.configured.name}: "
            + ", ".join(f"{item.label} {_gb(item.at(self.configured.quant))}" for item in self._shown(self.configured))
            + f"), this GPU has {_gb(self.available)} ({self.available_source})"
        )
        fitting = [plan for plan in self.candidates if plan != self.configured and self._fits(plan.gpu_bytes)]
        options = [f"{plan.settings} -> {_gb(plan.gpu_bytes)}" for plan in fitting[:2]]
        options += [f"{what} -> {_gb(size)}" for what, size in self.alternatives if self._fits(size)][:2]
        if options:
            message += ". What would fit: " + "; or ".join(options)
            if fitting:
                message += " (MEMORY_PLAN=auto picks the first)"
        else:
            smallest = min(self.candidates, key=lambda plan: plan.gpu_bytes)
            message += (f". Nothing this worker can do fits (the smallest plan, {smallest.name}, needs "
                        f"{_gb(smallest.gpu_bytes)}): use a GPU with more memory or serve fewer models")
        return message

    def _fits(self, size: int) -> bool:
        return self.available is not None and size <= self.available

    def _shown(self, plan: Plan) -> list[Item]:
        return [item for item in self.items if _on_gpu(item, plan) and item.at(plan.quant) > 0]

    def describe(self) -> str:
        """A table of what goes on the GPU under the chosen (else the configured) plan, for the log and --check."""
        plan = self.chosen or self.configured
        lines = [f"memory plan ({plan.name}; MEMORY_PLAN={self.mode}):"]
        for item in self.items:
            where = "GPU" if _on_gpu(item, plan) else "CPU"
            lines.append(f"  {item.label:<58} {_gb(item.at(plan.quant)):>9}  {where}  {item.source}".rstrip())
        total = "total on the GPU" + (" (peak, one model at a time)" if plan.offload == "model" else "")
        lines.append(f"  {total:<58} {_gb(plan_bytes(self.items, plan)):>9}")
        if self.available is None:
            lines.append(f"  GPU memory: {self.available_source}")
        else:
            lines.append(f"  GPU memory: {_gb(self.available)} ({self.available_source})")
        for candidate in self.candidates:
            verdict = "fits" if self._fits(candidate.gpu_bytes) else "does not fit" if self.available else ""
            lines.append(f"  plan {candidate.name:<40} {_gb(candidate.gpu_bytes):>9}  {verdict}".rstrip())
        lines += [f"  warning: {warning}" for warning in self.warnings]
        return "\n".join(lines)


def _gb(size: int | None) -> str:
    return "?" if size is None else f"{size / GB:.1f} GB"


def _on_gpu(item: Item, plan: Plan) -> bool:
    return not (plan.offload == "text_encoder" and item.kind == "text_encoder")


# What model CPU offload keeps off the GPU between uses: the pipeline's own models (diffusers' offload sequence);
# the safety checker and the ControlNet stay resident.
OFFLOADED_KINDS = ("transformer", "text_encoder", "vae")


def plan_bytes(items: Sequence[Item], plan: Plan) -> int:
    """GPU bytes of ``items`` under ``plan``: their sum, or with model offload the largest offloaded model at a time
    (per pipeline, with its Lightning copies and slots) plus what stays resident."""
    if plan.offload != "model":
        return sum(item.at(plan.quant) for item in items if _on_gpu(item, plan))
    # no LoRA slots under model offload (app.py builds none: they would sit beside a transformer that moves)
    resident = sum(item.at(plan.quant) for item in items if item.kind not in (*OFFLOADED_KINDS, "lora_slots"))
    largest = max((item.at(plan.quant) for item in items if item.kind in OFFLOADED_KINDS), default=0)
    return resident + largest


def build_items(setup: Setup, element_bytes: int, warnings: list[str] | None = None) -> list[Item]:
    """Every line of the plan for ``setup``, components in the order the worker loads them. Raises ConfigError for a
    component whose weights cannot be found or read."""
    warnings = warnings if warnings is not None else []
    items: list[Item] = []
    seen: dict[tuple[str, Any], int] = {}  # (class, identity) -> index in items, for shared components
    transformers: list[tuple[PipelineSetup, Weights]] = []
    for pipeline in setup.pipelines:
        for name, (class_name, folder) in pipeline.components.items():
            weights = component_weights(folder)
            warnings += [f"{path} is shorter than its header says (an incomplete download?)"
                         for path in weights.short_files]  # fmt: skip
            if weights.estimated:
                warnings.append(f"{folder} has no safetensors: sized from its files' lengths")
            key = (class_name, weights.identity())
            if setup.share_components and name != "transformer" and key in seen:
                index = seen[key]
                items[index] = replace(items[index], pipelines=(*items[index].pipelines, pipeline.variable),
                                       pipeline=None, label=items[index].label + " (shared)")
                continue
            if name == "transformer":
                by_quant = {quant: weights.quantized_bytes(element_bytes, quant) for quant in ("none", "int8", "fp8")}
                transformers.append((pipeline, weights))
            else:
                by_quant = {"none": weights.load_bytes(element_bytes)}
            seen[key] = len(items)
            items.append(Item(f"{pipeline.model_id} {name}", name, by_quant, _source(pipeline, weights),
                              pipeline.variable, (pipeline.variable,)))
    for pipeline, transformer in transformers:
        trees = 1
        for path in pipeline.lightning:
            lora = component_file_weights(path, "Lightning LoRA file")
            items.append(Item(f"Lightning copy ({path.name})", "lightning", {"none": lora.load_bytes(element_bytes)},
                              str(path), pipeline.variable, (pipeline.variable,)))
            trees += 1
        if setup.lora_slot_rank > 0:
            layers = transformer.block_layers()
            per_tree = sum(setup.lora_slot_rank * (out + inp) for out, inp in layers.values()) * element_bytes
            items.append(Item(
                f"LoRA slots (rank {setup.lora_slot_rank}, {len(layers)} layers x {trees} tree(s))", "lora_slots",
                {"none": per_tree * trees}, "LORA_SLOT_RANK", pipeline.variable, (pipeline.variable,)))
    if setup.controlnet is not None:
        weights = component_weights(setup.controlnet)
        items.append(Item(f"ControlNet {setup.controlnet.name}", "controlnet",
                          {"none": weights.load_bytes(element_bytes)}, str(setup.controlnet)))
    if setup.safety_checker is not None:
        weights = component_weights(setup.safety_checker)
        items.append(Item("safety checker", "safety_checker", {"none": weights.load_bytes(element_bytes)},
                          str(setup.safety_checker)))
    reserve = max((activation_reserve(pipeline, setup.batched_cfg) for pipeline in setup.pipelines), default=0)
    largest = max(setup.pipelines, key=lambda each: activation_reserve(each, setup.batched_cfg), default=None)
    if largest is not None:
        width, height = largest.max_size
        items.append(Item(f"activations ({largest.model_id} at {width}x{height}, estimated)", "reserve",
                          {"none": reserve}))
    return items


def component_file_weights(path: Path, what: str) -> Weights:
    """A single safetensors file (a LoRA) as Weights; ``what`` names it when it does not exist."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    return _from_files(path.parent, [path])


def _source(pipeline: PipelineSetup, weights: Weights) -> str:
    return f"{pipeline.source}: {weights.folder}"


def _config_value(folder: Path, *names: str, default: int) -> int:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return default
    for name in names:
        value = config.get(name)
        if isinstance(value, int):
            return value
    return default


def activation_reserve(pipeline: PipelineSetup, batched_cfg: bool) -> int:
    """Estimated peak working memory of the largest job ``pipeline`` accepts: the transformer's live activations
    over every token (image, references, layers, text) or the VAE decoding one frame at the largest size, whichever
    is larger (they run one after the other), plus a fixed workspace allowance. Not measured: see the module doc."""
    width, height = pipeline.max_size
    transformer = pipeline.components.get("transformer")
    vae = pipeline.components.get("vae")
    hidden = 3072
    if transformer is not None:
        heads = _config_value(transformer[1], "num_attention_heads", default=24)
        hidden = heads * _config_value(transformer[1], "attention_head_dim", default=128)
    tokens = (width * height // 256) * pipeline.frames + pipeline.references * REFERENCE_PIXELS // 256 + TEXT_TOKENS
    per_token = hidden * 2 * TOKEN_VALUES_PER_HIDDEN * (2 if batched_cfg else 1)
    base = _config_value(vae[1], "decoder_base_dim", "base_dim", default=96) if vae is not None else 96
    decode = width * height * base * 2 * VAE_MAPS_PER_BASE_CHANNEL
    return max(tokens * per_token, decode) + WORKSPACE_BYTES


# ------------------------------------------------------------------------------------------------ choosing


def ladder(configured_quant: str, fp8_supported: bool) -> list[Plan]:
    """The plans MEMORY_PLAN=auto tries, least lossy first. An operator's TRANSFORMER_QUANT is kept as the floor."""
    best = "fp8" if fp8_supported else "int8"
    quants = [configured_quant] if configured_quant != "none" else ["none", best]
    strongest = quants[-1]
    return [*(Plan(quant) for quant in quants), Plan(strongest, "text_encoder"), Plan(strongest, "model")]


def make_report(
    setup: Setup,
    *,
    element_bytes: int,
    available: int | None,
    available_source: str,
    mode: str,
    configured_quant: str,
    fp8_supported: bool,
    offload_blockers: Sequence[str] = (),
) -> MemoryReport:
    """The plan for ``setup`` against ``available`` bytes. ``offload_blockers``: why model CPU offload cannot serve
    this setup (resident Lightning copies, COMPILE), which takes it off the ladder."""
    warnings: list[str] = []
    items = build_items(setup, element_bytes, warnings)
    candidates = []
    for plan in ladder(configured_quant, fp8_supported):
        if plan.offload == "model" and offload_blockers:
            warnings.append(f"model CPU offload is not an option: {'; '.join(offload_blockers)}")
            continue
        candidates.append(replace(plan, gpu_bytes=plan_bytes(items, plan)))
    configured = candidates[0]
    report = MemoryReport(setup, items, available, available_source, mode, configured, candidates, warnings=warnings)
    if available is not None:
        allowed = candidates if mode == "auto" else [configured]
        report.chosen = next((plan for plan in allowed if plan.gpu_bytes <= available), None)
        if len(setup.pipelines) > 1:
            for pipeline in setup.pipelines:
                rest = [item for item in items if pipeline.variable not in item.pipelines or len(item.pipelines) > 1]
                report.alternatives.append(
                    (f"without {pipeline.variable} (one pipeline fewer)", plan_bytes(rest, configured))
                )
            report.alternatives.sort(key=lambda each: each[1])
    return report
