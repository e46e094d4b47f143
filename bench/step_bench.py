#!/usr/bin/env python3
"""What a denoising step costs the host, per mode: the worker's job beside stock diffusers' call (`make bench-step`).

A benchmark, not a test: it counts, and asserts nothing (``tests/test_bench_step.py`` holds the goals on the tiny
pipelines). Part of what decides GPU speed is a property of the code, not of the chip, and is counted exactly here
on the CPU:

(a) **host syncs**: what would make the host wait for the GPU: ``.item()``, ``bool()``/``int()``/``float()`` of a
    tensor (``aten.item``, ``aten.is_nonzero``, ``aten._local_scalar_dense``), ``aten.equal``, ``nonzero``,
    ``masked_select``, boolean indexing, ``repeat_interleave`` with tensor repeats and no ``output_size``,
    ``unique``, and copies to the host (``.cpu()``, ``.numpy()``, ``.tolist()``), each with the Python line that
    asked for it (the innermost frame outside torch). On the CPU every tensor lives on the host, so each is counted
    whatever the tensor's device: an upper bound. The scheduler keeps its ``sigmas`` on the host on purpose, so its
    scalar reads of them are not syncs on a GPU; ``--cuda-sync-debug`` on a GPU (``torch.cuda.set_sync_debug_mode``)
    gives CUDA's own verdict. Worker against stock is exact either way: both are counted the same way.
(b) **operations dispatched per transformer forward** (aten ops seen by a ``TorchDispatchMode``; each is at least one
    kernel launch on a GPU), and per step outside the forwards (scheduler, CFG combination, ControlNet);
(c) the same **once per call**, before the loop (prompt encoding, latents, VAE encoding) and after it (decoding).

Per mode the worker serves: text-to-image, edit, edit-plus with 2 references, image-to-image, inpainting,
outpainting, ControlNet, layers, fast 8- and 4-step (Lightning), a user LoRA through the LoRA slot, int8
(TRANSFORMER_QUANT). The worker side is the whole job through ``Worker.handle`` (runsync's input, images as data
URIs, built by ``app.build_worker`` from the environment as in production), counted over the diffusers pipeline call
it makes; the stock side is the same pipeline object called again with the very arguments the worker passed
(recorded at the call; generators re-seeded), the way a diffusers user would: for fast modes the Lightning file loaded
with ``load_lora_weights`` and the Lightning scheduler, for the LoRA the user file loaded with ``load_lora_weights``,
for int8 the same quantized transformer. Images are compared: identical arguments must give identical images.

Models: ``--tiny`` runs the tiny pipelines of ``builder/tiny_models.py`` (``--models``, default models/tiny). Without
it the transformer (and the ControlNet) is the real one (``bench/configs/transformer_config.json``: 24 heads x 128,
MLP 4x, its RoPE axes) cut to ``--blocks`` blocks, with ``joint_attention_dim`` set to the tiny text encoder's width
(only ``txt_in``'s input width; nothing counted depends on it); text encoder, VAE and tokenizer stay tiny. Counts do
not depend on the width or the image size; dispatches scale with the blocks (per block figures are printed).

``--compile`` (COMPILE=regional, inductor) also reports, per mode, graph breaks and new compiled graphs (recompiles)
after the worker's warm-up (``COMPILE_WARMUP_SIZES``: ``--size``). Slow on a CPU: use it with ``--tiny``.

    make bench-step                                    # = .venv/bin/python bench/step_bench.py (real width, 1 block)
    .venv/bin/python bench/step_bench.py --tiny --json /tmp/step.json
    .venv/bin/python bench/step_bench.py --tiny --compile --modes text-to-image fast-8
    python3 bench/step_bench.py --device cuda --cuda-sync-debug   # on a GPU: CUDA's own sync detection too
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gc
import io
import json
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "builder"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

SIZE = 256
STEPS = 2  # the tiny tests' steps; counts per step do not depend on it (the first step is listed apart)
LORA_RANK = 32  # the user LoRA's rank (fits the worker's default slot)
TOP_LEVEL_MODELS = ("QwenImageTransformer2DModel", "QwenImage21Transformer2DModel")
CONTROLNET_MODELS = ("QwenImageControlNetModel", "QwenImageMultiControlNetModel")

# aten ops that make the host wait for the device (the result is read on the host, or its shape depends on data).
SYNC_OPS = {
    "item": ".item() / float() / int() of a tensor",
    "_local_scalar_dense": ".item() / float() / int() of a tensor",
    "is_nonzero": "bool() of a tensor",
    "equal": "torch.equal (a bool on the host)",
    "nonzero": "nonzero (data-dependent shape)",
    "masked_select": "masked_select (data-dependent shape)",
    "_unique2": "unique (data-dependent shape)",
    "unique_consecutive": "unique_consecutive (data-dependent shape)",
    "unique_dim": "unique (data-dependent shape)",
}
# Tensor methods that copy to the host (seen at the Python level: on the CPU they dispatch nothing telling).
HOST_COPIES = {"numpy": ".numpy()", "tolist": ".tolist()", "cpu": ".cpu()"}
_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS = os.path.abspath(__file__)


def _python_line() -> str:
    """The innermost frame outside torch and this script: the line that asked for the sync."""
    for frame in reversed(traceback.extract_stack()):
        name = os.path.abspath(frame.filename)
        if name.startswith(_TORCH_DIR) or name == _THIS or "/contextlib.py" in name:
            continue
        return f"{_short(name)}:{frame.lineno} ({frame.name}): {(frame.line or '').strip()[:100]}"
    return "?"


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/src/", "/bench/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _sync_reason(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    name = func.overloadpacket.__name__
    if name in SYNC_OPS:
        return SYNC_OPS[name]
    if name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1:
        indices = args[1] if isinstance(args[1], list | tuple) else ()
        if any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices):
            return "boolean indexing (nonzero inside)"
    if name == "repeat_interleave" and kwargs.get("output_size") is None and str(func).endswith("Tensor"):
        return "repeat_interleave with tensor repeats (data-dependent shape)"
    return None


@dataclass
class CallCounts:
    """What one pipeline call dispatched, split by phase."""

    forwards: int = 0
    forward_ops: int = 0
    forward_views: int = 0  # of forward_ops, views (expand, view, t...): metadata only, no kernel on a GPU
    controlnet_ops: int = 0
    steps_done: int = 0
    loop_started: bool = False
    ops_by_step: Counter[int] = field(default_factory=Counter)  # step index -> ops in the loop (forwards included)
    forward_ops_by_step: Counter[int] = field(default_factory=Counter)
    pre_ops: int = 0
    # the second step's ops by name, in and outside the transformer forwards (to see where two counts differ)
    step_ops: dict[str, Counter[str]] = field(default_factory=lambda: {"forward": Counter(), "outside": Counter()})
    syncs: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        steps = self.steps_done
        loop_ops = sum(v for k, v in self.ops_by_step.items() if k < steps)
        post_ops = sum(v for k, v in self.ops_by_step.items() if k >= steps)
        for sync in self.syncs:  # the loop ends with the last step: what follows is decoding, once per call
            if sync["phase"] != "before":
                sync["phase"] = "loop" if sync["step"] < steps else "after"
        loop_syncs = [s for s in self.syncs if s["phase"] == "loop"]
        steady = [k for k in range(1, steps)]
        outside = [self.ops_by_step[k] - self.forward_ops_by_step[k] for k in steady]
        return {
            "steps": steps,
            "forwards": self.forwards,
            "dispatches_per_forward": self.forward_ops / self.forwards if self.forwards else None,
            "kernels_per_forward": (self.forward_ops - self.forward_views) / self.forwards if self.forwards else None,
            "dispatches_per_step_outside_forwards": sum(outside) / len(outside) if outside else None,
            "controlnet_dispatches_per_step": self.controlnet_ops / steps if steps else None,
            "loop_dispatches": loop_ops,
            "once_before_loop_dispatches": self.pre_ops,
            "once_after_loop_dispatches": post_ops,
            "syncs_in_loop": len(loop_syncs),
            "syncs_per_step": len(loop_syncs) / steps if steps else None,
            "syncs_once": len(self.syncs) - len(loop_syncs),
            "sync_lines": _grouped(self.syncs),
            "second_step_ops": {key: dict(ops) for key, ops in self.step_ops.items()},
        }


def _grouped(syncs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    counts: Counter[tuple[str, str, str]] = Counter((s["phase"], s["reason"], s["line"]) for s in syncs)
    return [{"phase": p, "reason": r, "line": line, "count": n} for (p, r, line), n in counts.items()]


class _Counter(TorchDispatchMode):
    def __init__(self, counts: CallCounts) -> None:
        super().__init__()
        self.counts = counts
        self.in_forward = 0
        self.in_controlnet = 0
        self.in_host_copy = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            # Seen whole only where autograd is off (inference_mode): run through its C++ composite kernel, as
            # the dispatcher would (not torch._decomp's Python one, which clones in dropout), so both count the
            # ops that really run (``to`` of the same dtype: none).
            with self:
                return func._op_dk(torch._C.DispatchKey.CompositeImplicitAutograd, *args, **kwargs)
        c = self.counts
        if not c.loop_started:
            c.pre_ops += 1
        else:
            c.ops_by_step[c.steps_done] += 1
            if c.steps_done == 1:
                key = "forward" if self.in_forward else "outside"
                c.step_ops[key][func.overloadpacket.__name__] += 1
            if self.in_forward:
                c.forward_ops_by_step[c.steps_done] += 1
        if self.in_forward:
            c.forward_ops += 1
            c.forward_views += func.is_view
        elif self.in_controlnet:
            c.controlnet_ops += 1
        if not self.in_host_copy:
            reason = _sync_reason(func, args, kwargs)
            if reason is not None:
                self.record(reason)
        return func(*args, **kwargs)

    def record(self, reason: str) -> None:
        c = self.counts
        phase = "started" if c.loop_started else "before"
        c.syncs.append({"phase": phase, "step": c.steps_done, "reason": reason, "line": _python_line()})


class _HostCopies(TorchFunctionMode):
    def __init__(self, counter: _Counter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in HOST_COPIES and args and isinstance(args[0], torch.Tensor):
            self.counter.record(f"copy to the host ({HOST_COPIES[name]})")
            self.counter.in_host_copy += 1
            try:
                return func(*args, **(kwargs or {}))
            finally:
                self.counter.in_host_copy -= 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting(counts: CallCounts) -> Iterator[None]:
    """Count everything dispatched inside: forwards of the top-level transformer (whichever tree runs: global module
    hooks) and steps (the scheduler's ``step``, wrapped on its class)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    counter = _Counter(counts)

    def before(module: Any, *_: Any) -> None:
        kind = type(module).__name__
        if kind in TOP_LEVEL_MODELS:
            if counter.in_forward == 0:
                counts.loop_started = True
                counts.forwards += 1
            counter.in_forward += 1
        elif kind in CONTROLNET_MODELS:
            counter.in_controlnet += 1

    def after(module: Any, *_: Any) -> None:
        kind = type(module).__name__
        if kind in TOP_LEVEL_MODELS:
            counter.in_forward -= 1
        elif kind in CONTROLNET_MODELS:
            counter.in_controlnet -= 1

    original_step = FlowMatchEulerDiscreteScheduler.step

    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original_step(self, *args, **kwargs)
        if counts.loop_started:
            counts.steps_done += 1
        return result

    hooks = [
        torch.nn.modules.module.register_module_forward_pre_hook(before),
        torch.nn.modules.module.register_module_forward_hook(after),
    ]
    FlowMatchEulerDiscreteScheduler.step = step  # type: ignore[method-assign]
    try:
        with _HostCopies(counter), counter:
            yield
    finally:
        FlowMatchEulerDiscreteScheduler.step = original_step  # type: ignore[method-assign]
        for hook in hooks:
            hook.remove()


class CallRecorder:
    """Wraps the ``__call__`` of the pipeline classes the worker runs: the worker's one pipeline call is counted (not
    its request parsing, safety check or encoding), and its arguments and output are kept for the stock call."""

    def __init__(self, classes: set[type]) -> None:
        self.classes = classes
        self.kwargs: dict[str, Any] | None = None
        self.output: Any = None
        self.counts: CallCounts | None = None
        self.pipeline: Any = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[CallRecorder]:
        originals = {cls: cls.__call__ for cls in self.classes}
        recorder = self

        def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
            def call(pipeline: Any, *args: Any, **kwargs: Any) -> Any:
                recorder.kwargs, recorder.pipeline = dict(kwargs), pipeline
                recorder.counts = CallCounts()
                with counting(recorder.counts):
                    recorder.output = original(pipeline, *args, **kwargs)
                return recorder.output

            return call

        for cls, original in originals.items():
            cls.__call__ = wrap(original)
        try:
            yield self
        finally:
            for cls, original in originals.items():
                cls.__call__ = original


# ------------------------------------------------------------------------------------------------------- modes


@dataclass(frozen=True)
class ModeCase:
    name: str
    worker: str  # which worker set-up serves it (WORKERS)
    request: Callable[[dict[str, Any]], dict[str, Any]]  # runsync input, from the shared fixtures
    stock: str = "plain"  # plain | lightning-8 | lightning-4 | lora


def _uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def fixtures(size: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    other = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return {"image": _uri(photo), "other": _uri(other), "mask": _uri(mask), "size": size}


def _base(f: dict[str, Any], steps: int, **extra: Any) -> dict[str, Any]:
    return {"prompt": "a red lighthouse on a cliff", "seed": 7, "num_inference_steps": steps,
            "size": f"{f['size']}*{f['size']}", **extra}  # fmt: skip


MODES: tuple[ModeCase, ...] = (
    ModeCase("text-to-image", "main", lambda f: _base(f, f["steps"])),
    ModeCase("edit", "main", lambda f: _base(f, f["steps"], image=f["image"])),
    ModeCase("edit-plus-2", "edit-plus", lambda f: _base(f, f["steps"], images=[f["image"], f["other"]])),
    ModeCase("image-to-image", "main", lambda f: _base(f, f["steps"] * 2, image=f["image"], strength=0.5)),
    ModeCase("inpainting", "main", lambda f: {**_base(f, f["steps"] * 2, image=f["image"], mask_image=f["mask"]),
                                             "size": None}),
    ModeCase("outpainting", "main", lambda f: {**_base(f, f["steps"] * 2, image=f["image"],
                                                       expand={"left": 32, "right": 32}), "size": None}),
    ModeCase("controlnet", "main", lambda f: _base(f, f["steps"], control_image=f["image"])),
    ModeCase("layers", "main", lambda f: {**_base(f, f["steps"], image=f["image"], layers=2), "size": None}),
    ModeCase("fast-8", "main", lambda f: {**_base(f, 8, go_fast=True), "num_inference_steps": None},
             stock="lightning-8"),
    ModeCase("fast-4", "main", lambda f: {**_base(f, 4, acceleration="high"), "num_inference_steps": None},
             stock="lightning-4"),
    ModeCase("lora-slot", "main", lambda f: _base(f, f["steps"], loras=[{"path": f["user_lora"], "scale": 1.0}]),
             stock="lora"),
    ModeCase("int8", "int8", lambda f: _base(f, f["steps"])),
)
MODE_NAMES = tuple(case.name for case in MODES)


def _request(case: ModeCase, f: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in case.request(f).items() if value is not None}


# ------------------------------------------------------------------------------------------------------ models


def real_width_folders(tiny: Path, out: Path, blocks: int) -> Path:
    """The tiny model folders with the transformer (and ControlNet) replaced by the real one cut to ``blocks``."""
    from diffusers import QwenImageControlNetModel, QwenImageTransformer2DModel

    config = json.loads((ROOT / "bench/configs/transformer_config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    text_width = json.loads((tiny / "qwen-image/transformer/config.json").read_text())["joint_attention_dim"]
    config.update(num_layers=blocks, joint_attention_dim=text_width)
    for name in ("qwen-image", "qwen-image-edit", "qwen-image-edit-plus", "qwen-image-layered"):
        folder = out / name
        folder.mkdir(parents=True)
        for entry in (tiny / name).iterdir():
            if entry.name != "transformer":
                (folder / entry.name).symlink_to(entry.resolve())
        layered = name == "qwen-image-layered"
        torch.manual_seed(0)
        model = QwenImageTransformer2DModel(**{**config, "use_layer3d_rope": layered,
                                               "use_additional_t_cond": layered})  # fmt: skip
        _randomise(model)
        model.save_pretrained(folder / "transformer")
        del model
    import inspect

    accepted = inspect.signature(QwenImageControlNetModel.__init__).parameters
    torch.manual_seed(1)
    controlnet = QwenImageControlNetModel(**{k: v for k, v in config.items() if k in accepted})
    _randomise(controlnet)
    controlnet.save_pretrained(out / "qwen-image-controlnet")
    return out


def _randomise(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
            elif "norm" in name:
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02)


def write_loras(folder: Path, transformer: Any) -> dict[str, str]:
    from gpu_bench import LIGHTNING_RANK, TINY_LORA_RANK, write_synthetic_lora

    dtype = next(transformer.parameters()).dtype
    cpu = torch.device("cpu")
    rank = TINY_LORA_RANK if transformer.config.num_attention_heads * transformer.config.attention_head_dim < 1024 \
        else LIGHTNING_RANK
    paths = {"lightning-8": folder / "lightning-8.safetensors", "lightning-4": folder / "lightning-4.safetensors",
             "user": folder / "user.safetensors"}  # fmt: skip
    write_synthetic_lora(paths["lightning-8"], transformer, rank, cpu, dtype, lightning=True, seed=1)
    write_synthetic_lora(paths["lightning-4"], transformer, rank, cpu, dtype, lightning=True, seed=2)
    write_synthetic_lora(paths["user"], transformer, LORA_RANK, cpu, dtype, lightning=False, seed=3)
    return {name: str(path) for name, path in paths.items()}


def worker_env(
    kind: str, models: Path, loras: dict[str, str], extra: dict[str, str], modes: set[str]
) -> dict[str, str]:
    """The worker's environment for one set-up, with only the models the requested modes need loaded (the edit
    model also decides the inpainting route: the edit-inpaint pipeline when it is there, as in production)."""
    env = {"SAFETY_CHECKER": "off", "SAFETY_CHECKER_MODEL": "none", "QWEN_IMAGE_MODEL": "none", **extra}
    if kind == "main":
        env.update(QWEN_IMAGE_MODEL=str(models / "qwen-image"), LIGHTNING_LORA=loras["lightning-8"],
                   LIGHTNING_LORA_4STEP=loras["lightning-4"])  # fmt: skip
        if modes & {"edit", "inpainting", "outpainting"}:
            env.update(QWEN_IMAGE_EDIT_MODEL=str(models / "qwen-image-edit"))
        if "layers" in modes:
            env.update(QWEN_IMAGE_LAYERED_MODEL=str(models / "qwen-image-layered"))
        if "controlnet" in modes:
            env.update(QWEN_IMAGE_CONTROLNET_MODEL=str(models / "qwen-image-controlnet"))
    elif kind == "edit-plus":
        env.update(QWEN_IMAGE_EDIT_MODEL=str(models / "qwen-image-edit-plus"))
    elif kind == "int8":
        env.update(QWEN_IMAGE_MODEL=str(models / "qwen-image"), TRANSFORMER_QUANT="int8")
    return env


def build(env: dict[str, str]) -> Any:
    from qwen_worker.app import build_worker
    from qwen_worker.config import Settings

    return build_worker(Settings.from_env(env))


# ------------------------------------------------------------------------------------------------------- stock


def _reseeded(kwargs: dict[str, Any]) -> dict[str, Any]:
    call = dict(kwargs)
    call.pop("callback_on_step_end", None)  # the worker's progress report (none without a webhook)
    generators = call.get("generator")
    if isinstance(generators, list):
        call["generator"] = [torch.Generator("cpu").manual_seed(g.initial_seed()) for g in generators]
    elif generators is not None:
        call["generator"] = torch.Generator("cpu").manual_seed(generators.initial_seed())
    return call


@contextlib.contextmanager
def stock_state(pipeline: Any, stock: str, loras: dict[str, str]) -> Iterator[None]:
    """What a diffusers user does for the mode: fast modes load the Lightning file and use its scheduler settings;
    the LoRA mode loads the user file; plain modes call the pipeline as it is."""
    if stock == "plain":
        yield
        return
    import warnings

    from qwen_worker.runner import LIGHTNING_SCHEDULER_OVERRIDES

    original = pipeline.scheduler
    path = loras["user"] if stock == "lora" else loras[stock]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline.load_lora_weights(path, adapter_name="stock")
    if stock != "lora":
        pipeline.scheduler = type(original).from_config({**original.config, **LIGHTNING_SCHEDULER_OVERRIDES})
    try:
        yield
    finally:
        pipeline.scheduler = original
        pipeline.unload_lora_weights()
        vars(pipeline.transformer).pop("_hf_peft_config_loaded", None)


def _images(output: Any, layers: bool) -> list[np.ndarray]:
    images = output.images[0] if layers else output.images
    return [np.asarray(image) for image in images]


def run_mode(worker: Any, case: ModeCase, f: dict[str, Any], loras: dict[str, str]) -> dict[str, Any]:
    from qwen_worker.schema import Mode

    runner = worker.runner
    classes = {type(runner.served(mode).pipeline) for mode in Mode if _serves(runner, mode)}
    recorder = CallRecorder(classes)
    request = _request(case, f)
    # A first job fills what the process caches (RoPE tables, the prepared LoRA): both counted calls run warm.
    first = worker.handle({"id": f"warm-{case.name}", "input": request})
    if "error" in first:
        raise RuntimeError(f"{case.name}: the worker answered {first['error']}")
    with recorder.installed():
        answer = worker.handle({"id": f"bench-{case.name}", "input": request})
    if "error" in answer:
        raise RuntimeError(f"{case.name}: the worker answered {answer['error']}")
    assert recorder.counts is not None and recorder.kwargs is not None
    worker_counts = recorder.counts.summary()
    layers = case.name == "layers"
    worker_images = _images(recorder.output, layers)
    pipeline = recorder.pipeline
    stock_counts = CallCounts()
    with stock_state(pipeline, case.stock, loras), counting(stock_counts):
        stock_output = pipeline(**_reseeded(recorder.kwargs))
    stock_images = _images(stock_output, layers)
    diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(worker_images, stock_images,
                                                                               strict=True))  # fmt: skip
    return {
        "mode": case.name,
        "pipeline": type(pipeline).__name__,
        "stock": case.stock,
        "worker": worker_counts,
        "diffusers": stock_counts.summary(),
        "image_max_abs_diff": diff,
        "images_identical": diff == 0,
        "call_arguments": sorted(k for k in recorder.kwargs if k != "callback_on_step_end"),
    }


def compile_mode(worker: Any, case: ModeCase, f: dict[str, Any]) -> dict[str, Any]:
    """COMPILE=regional: two jobs of the mode through the worker, counted by dynamo only (graph breaks, graphs)."""
    for attempt in range(2):
        answer = worker.handle({"id": f"compile-{case.name}-{attempt}", "input": _request(case, f)})
        if "error" in answer:
            raise RuntimeError(f"{case.name}: the worker answered {answer['error']}")
    return {"mode": case.name, "stock": case.stock}


def _serves(runner: Any, mode: Any) -> bool:
    from qwen_worker.errors import TaskNotServedError

    try:
        runner.route_for(mode)
    except TaskNotServedError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------- compile


def compile_counters() -> dict[str, Any]:
    from torch._dynamo.utils import counters

    return {
        "graph_breaks": sum(counters["graph_break"].values()),
        "break_reasons": dict(counters["graph_break"]),
        "unique_graphs": counters["stats"]["unique_graphs"],
        "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else 0,
    }


def _delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    reasons = {k: v - before["break_reasons"].get(k, 0) for k, v in after["break_reasons"].items()}
    return {
        "graph_breaks": after["graph_breaks"] - before["graph_breaks"],
        "break_reasons": {k: v for k, v in reasons.items() if v},
        "new_graphs": after["unique_graphs"] - before["unique_graphs"],
    }


# ------------------------------------------------------------------------------------------------------ report


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(report: dict[str, Any]) -> None:
    blocks = report["blocks"]
    print()
    print(f"Per mode: the worker's job (W) beside stock diffusers' call with the same arguments (D); "
          f"{report['model_kind']}, {blocks} transformer block(s), {report['size']}px")  # fmt: skip
    print("| mode | who | steps | fwd | dispatches/fwd | non-view/fwd | per block | dispatches/step outside fwd | "
          "syncs in loop (/step) | once: dispatches before / after | once: syncs | same image |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in report["results"]:
        if "error" in row:
            print(f"| {row['mode']} | FAILED: {row['error'][:150]} |")
            continue
        if "worker" not in row:
            continue
        for who, key in (("W", "worker"), ("D", "diffusers")):
            c = row[key]
            per_block = (c["dispatches_per_forward"] / blocks) if c["dispatches_per_forward"] else None
            same = ("yes" if row["images_identical"] else f"max diff {row['image_max_abs_diff']}") if who == "W" else ""
            print(f"| {row['mode']} | {who} | {c['steps']} | {c['forwards']} | {_fmt(c['dispatches_per_forward'])} | "
                  f"{_fmt(c['kernels_per_forward'])} | {_fmt(per_block)} | "
                  f"{_fmt(c['dispatches_per_step_outside_forwards'], '.1f')} | "
                  f"{c['syncs_in_loop']} ({_fmt(c['syncs_per_step'], '.2f')}) | "
                  f"{c['once_before_loop_dispatches']} / {c['once_after_loop_dispatches']} | {c['syncs_once']} | "
                  f"{same} |")
    print()
    print("Host syncs (or sync candidates: on the CPU every tensor is on the host) and the line that caused them:")
    for row in report["results"]:
        if "error" in row or "worker" not in row:
            continue
        for who in ("worker", "diffusers"):
            for sync in row[who]["sync_lines"]:
                print(f"  {row['mode']:<15} {who:<9} {sync['phase']:<6} x{sync['count']:<3} {sync['reason']}: "
                      f"{sync['line']}")
    if report.get("compile"):
        print()
        print("COMPILE=regional: graph breaks and new graphs per mode after the warm-up")
        print("| mode | graph breaks | new compiled graphs |")
        print("|---|---:|---:|")
        for row in report["results"]:
            if "compile" in row:
                print(f"| {row['mode']} | {row['compile']['graph_breaks']} | {row['compile']['new_graphs']} |")
        print(f"start-up (warm-up at {report['size']}px): {report['compile'].get('warmup')}")
    print()
    print("Goals (issue 25):")
    for line in goals(report):
        print(f"- {line}")


def goals(report: dict[str, Any]) -> list[str]:
    lines = []
    for row in report["results"]:
        if "error" in row:
            lines.append(f"{row['mode']}: FAILED")
            continue
        if "compile" in row:
            c = row["compile"]
            lines.append(f"{row['mode']} (COMPILE=regional): {c['graph_breaks']} graph breaks "
                         f"({'met' if c['graph_breaks'] == 0 else 'NOT met'}), {c['new_graphs']} graphs compiled "
                         "after start-up")  # fmt: skip
            continue
        w, d = row["worker"], row["diffusers"]
        worker_lines = [s for s in w["sync_lines"] if s["phase"] == "loop" and "qwen_worker/" in s["line"]]
        extra = w["syncs_in_loop"] - d["syncs_in_loop"]
        sync_ok = extra <= 0 and not worker_lines
        more = (w["dispatches_per_forward"] or 0) - (d["dispatches_per_forward"] or 0)
        more_kernels = (w["kernels_per_forward"] or 0) - (d["kernels_per_forward"] or 0)
        lora = row["stock"] == "lora"
        # Views (expand, view, t) only rewrite a tensor's metadata: no kernel runs, so the gate counts the others.
        dispatch_ok = more_kernels <= 0 or lora
        note = f" (the LoRA slot's {more_kernels:+.0f} per forward, reported apart)" if lora else ""
        lines.append(f"{row['mode']}: syncs in the loop {w['syncs_in_loop']} vs {d['syncs_in_loop']} "
                     f"({'met' if sync_ok else 'NOT met'}); non-view dispatches per forward "
                     f"{_fmt(w['kernels_per_forward'])} vs {_fmt(d['kernels_per_forward'])} "
                     f"({'met' if dispatch_ok else 'NOT met'}){note}; all dispatches {more:+.0f}")  # fmt: skip
    return lines


# -------------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="builder/tiny_models.py's pipelines (the test's setting)")
    parser.add_argument("--models", type=Path, default=ROOT / "models/tiny", help="the tiny model folders")
    parser.add_argument("--blocks", type=int, default=1, help="real-width transformer blocks (default 1)")
    parser.add_argument("--size", type=int, default=SIZE, help=f"image side (default {SIZE})")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"steps of the non-fast modes (default {STEPS})")
    parser.add_argument("--modes", nargs="+", default=list(MODE_NAMES), choices=MODE_NAMES)
    parser.add_argument("--compile", action="store_true", help="COMPILE=regional: graph breaks and recompiles too")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda (the GPU recipe)")
    parser.add_argument("--cuda-sync-debug", action="store_true",
                        help="on a GPU: torch.cuda.set_sync_debug_mode('warn') during the calls; warnings counted")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is counted apart)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    extra: dict[str, str] = {}
    if args.compile:
        extra.update(COMPILE="regional", COMPILE_WARMUP_SIZES=f"{args.size}*{args.size}")
    report: dict[str, Any] = {
        "schema": "qwen-worker step_bench 1",
        "model_kind": "tiny pipelines" if args.tiny else "real-width transformer (cut)",
        "blocks": None, "size": args.size, "steps": args.steps, "modes": args.modes, "results": [],
        "compile": {} if args.compile else None,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "device": args.device},
    }  # fmt: skip
    from gpu_bench import _ensure_runpod_importable

    stub = _ensure_runpod_importable()  # the lent GPU machines have no runpod SDK: LoRAs here are local files
    if stub:
        report["notes"] = [stub]
    with tempfile.TemporaryDirectory(prefix="step-bench-") as tmp:
        folder = Path(tmp)
        models = args.models if args.tiny else real_width_folders(args.models, folder / "models", args.blocks)
        from diffusers import QwenImageTransformer2DModel

        transformer = QwenImageTransformer2DModel.from_pretrained(models / "qwen-image" / "transformer")
        report["blocks"] = len(transformer.transformer_blocks)
        report["machine"]["diffusers"] = sys.modules["diffusers"].__version__
        loras = write_loras(folder, transformer)
        del transformer
        f = {**fixtures(args.size), "steps": args.steps, "user_lora": loras["user"]}
        by_worker: dict[str, list[ModeCase]] = {}
        for case in MODES:
            if case.name in args.modes:
                by_worker.setdefault(case.worker, []).append(case)
        for kind, cases in by_worker.items():
            before = compile_counters() if args.compile else None
            started = time.perf_counter()
            worker = build(worker_env(kind, models, loras, extra, set(args.modes)))
            if args.compile:
                report["compile"].setdefault("warmup", {})[kind] = {
                    **_delta(compile_counters(), before), "seconds": round(time.perf_counter() - started, 1)}
            for case in cases:
                print(f"{case.name} ...", flush=True)
                before = compile_counters() if args.compile else None
                started = time.perf_counter()
                try:
                    if args.compile:
                        # Not counted: a dispatch mode around compiled code would change what dynamo does.
                        row = compile_mode(worker, case, f)
                        row["compile"] = _delta(compile_counters(), before)
                    else:
                        cuda_syncs: list[str] = []
                        with _sync_debug(args, cuda_syncs):
                            row = run_mode(worker, case, f, loras)
                        if args.cuda_sync_debug:  # CUDA's verdict over the three calls (warm-up, worker, stock)
                            row["cuda_syncs"] = dict(Counter(cuda_syncs))
                    row["seconds"] = round(time.perf_counter() - started, 1)
                except Exception as err:  # one failed mode must not lose the others
                    row = {"mode": case.name, "error": f"{type(err).__name__}: {err}"}
                report["results"].append(row)
                if args.json:
                    args.json.write_text(json.dumps(report, indent=2))
            del worker
            gc.collect()
    print_table(report)
    report["goals"] = goals(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


@contextlib.contextmanager
def _sync_debug(args: argparse.Namespace, found: list[str]) -> Iterator[None]:
    """On a GPU with --cuda-sync-debug: CUDA's own sync detection; each warning's Python location into ``found``."""
    if not args.cuda_sync_debug:
        yield
        return
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for warning in caught:
            if "synchroniz" in str(warning.message).lower():
                found.append(f"{_short(warning.filename)}:{warning.lineno}: {str(warning.message)[:80]}")
    finally:
        torch.cuda.set_sync_debug_mode("default")


if __name__ == "__main__":
    sys.exit(main())
