"""What the benchmark measures beside the worker's own clock: the matmul peak, every transformer forward (shapes, and
CUDA events on the GPU timeline), the worker's log lines, memory allocated."""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from typing import Any

import torch

MATMUL_N = 8192


TINY_MATMUL_N = 256


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    device: torch.device, dtype: torch.dtype, n: int, batches: int = 7, per_batch: int = 10
) -> dict[str, Any]:
    """Median TFLOP/s of n^3 matrix products (random data) on ``device``: the yardstick for achieved TFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    synchronize(device)
    samples = []
    for _ in range(batches):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(per_batch):
                torch.mm(a, b, out=out)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000 / per_batch
        else:
            started = time.perf_counter()
            for _ in range(per_batch):
                torch.mm(a, b, out=out)
            seconds = (time.perf_counter() - started) / per_batch
        samples.append(2 * n**3 / seconds / 1e12)
    del a, b, out
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "products_per_sample": per_batch,
        "tflops_samples": [round(x, 2) for x in samples],
        "tflops_median": statistics.median(samples),
    }


class ForwardProbe:
    """Hooks on the transformer, beside the worker's own: the shapes of every forward (for the FLOP count) and, on
    CUDA, events on the GPU timeline at the call's start, around every forward and at its end."""

    def __init__(self, pipeline: Any, device: torch.device, trees: tuple[Any, ...] = ()) -> None:
        self.pipeline = pipeline
        # The pipeline's own transformer and the worker's resident Lightning copies: a fast job runs on a copy.
        self.transformers = list({id(t): t for t in (pipeline.transformer, *trees)}.values())
        self.cuda = device.type == "cuda"
        self.forwards: list[dict[str, Any]] = []
        self.state: dict[str, Any] = {}

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _elapsed_ms(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1000

    def __enter__(self) -> ForwardProbe:
        self.start = self._mark()
        self._hooks = [
            hook
            for transformer in self.transformers
            for hook in (
                transformer.register_forward_pre_hook(self._before, with_kwargs=True),
                transformer.register_forward_hook(self._after),
            )
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        self.end = self._mark()
        for hook in self._hooks:
            hook.remove()

    def _before(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if not self.forwards:
            # What the worker set up for this job, read at the first forward (host-side only, no GPU sync).
            scheduler = self.pipeline.scheduler.config
            self.state = {
                # the tree that runs: the pipeline's own transformer, or a resident Lightning copy
                "lora_layers": sum(1 for m in module.modules() if hasattr(m, "lora_A")),
                "adapters": list(getattr(module, "peft_config", None) or {}),
                "scheduler": {k: scheduler.get(k) for k in ("base_shift", "max_shift", "shift_terminal")},
            }
        self.forwards.append(
            {"image_tokens": int(hidden.shape[1]), "text_tokens": int(text.shape[1]), "batch": int(hidden.shape[0]),
             "kv_cache_mode": kwargs.get("kv_cache_mode"), "start": self._mark()}
        )

    def _after(self, *_args: Any) -> None:
        self.forwards[-1]["end"] = self._mark()

    def summary(self) -> dict[str, Any]:
        if self.cuda:
            self.end.synchronize()
        forwards = [
            {"image_tokens": f["image_tokens"], "text_tokens": f["text_tokens"], "batch": f["batch"],
             "kv_cache_mode": f["kv_cache_mode"], "ms": self._elapsed_ms(f["start"], f["end"])}
            for f in self.forwards
        ]
        out: dict[str, Any] = {"forwards": forwards, "clock": "cuda events" if self.cuda else "host perf_counter",
                               "at_first_forward": self.state}
        if self.forwards:
            out["before_first_forward_ms"] = self._elapsed_ms(self.start, self.forwards[0]["start"])
            out["denoise_ms"] = self._elapsed_ms(self.forwards[0]["start"], self.forwards[-1]["end"])
            out["after_last_forward_ms"] = self._elapsed_ms(self.forwards[-1]["end"], self.end)
            out["forward_ms_sum"] = sum(f["ms"] for f in forwards)
        return out


# The worker's loggers of the LoRA step (trees.job_tree): its INFO lines are kept in each run's lora_step.
LORA_STEP_LOGGERS = ("qwen_worker.trees", "qwen_worker.lora_slots", "qwen_worker.loras", "qwen_worker.lora_files")


@contextlib.contextmanager
def captured_log(names: tuple[str, ...]) -> Any:
    """The messages the named loggers emit in the block, INFO included (INFO stops here; warnings reach the log)."""
    lines: list[str] = []

    def capture(record: logging.LogRecord) -> bool:
        lines.append(record.getMessage())
        return record.levelno >= logging.WARNING

    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.INFO)
        logger.addFilter(capture)
    try:
        yield lines
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeFilter(capture)
            logger.setLevel(level)


def allocated_bytes(device: torch.device) -> int | None:
    """Bytes of tensors allocated on the GPU now (None on a CPU)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None
