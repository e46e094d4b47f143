"""``python handler.py --check [--gpu-memory GB]``: would this worker start here, and in how much GPU memory?

Reads the environment as the worker does, finds every configured model offline, and prints what it would load,
from where, each component's size from its safetensors headers, the memory plan (``memory_plan.py``) against the
GPU present or the size given, the files that are missing and the variables left unset. Loads no weights. Exit
status 0 when the worker would start, 1 (with the reason and, for memory, a plan that would fit) when it would not.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

import torch

from .config import Settings
from .errors import ConfigError
from .memory_plan import GB, make_report
from .quantization import FP8_MIN_CAPABILITY

# Variables whose absence changes what the endpoint serves, and what that means.
UNSET_MEANINGS = (
    ("QWEN_IMAGE_EDIT_MODEL", "edit_model", "edits are not served (unless a 2.1 model serves them)"),
    ("QWEN_IMAGE_LAYERED_MODEL", "layered_model", "layer decomposition is not served"),
    ("QWEN_IMAGE_CONTROLNET_MODEL", "controlnet_model", "control_image requests are refused"),
    ("LIGHTNING_LORA", "lightning_lora", "no 8-step fast mode for text-to-image"),
    ("LIGHTNING_EDIT_LORA", "lightning_edit_lora", "no 8-step fast mode for edits"),
    ("BUCKET_NAME", "bucket", "results are returned inline (data URIs), not uploaded"),
)


def main(argv: Sequence[str], out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(prog="handler.py --check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", required=True)
    parser.add_argument("--gpu-memory", type=float, metavar="GB", help="plan against this many GB (default: the "
                        "free memory of the GPU present)")
    parser.add_argument("--compute-capability", type=float, metavar="X.Y", help="the GPU's compute capability "
                        "(fp8 needs 8.9; default: the GPU present's, else 8.9)")
    args = parser.parse_args(list(argv))
    from . import app  # the worker's own resolution and planning, imported here: --help needs none of it

    try:
        settings = Settings.from_env()
    except ConfigError as err:
        print(f"WOULD NOT START: {err}", file=out)
        return 1
    problems: list[str] = []
    print("models:", file=out)
    pipelines = app.configured_pipelines(settings, problems)  # every missing model, not only the first
    for each in pipelines:
        model = each.model
        print(f"  {each.variable}={model.model_id}: {model.pipeline_class} from {model.source} at {model.path}"
              + (f" (revision {model.revision})" if model.revision else ""), file=out)
    unset = [f"  {name}: {meaning}" for name, attribute, meaning in UNSET_MEANINGS
             if getattr(settings, attribute) is None]  # fmt: skip
    if unset:
        print("unset:", *unset, sep="\n", file=out)
    gpu = torch.cuda.is_available()
    if args.gpu_memory is not None:
        available, source = int(args.gpu_memory * GB), "--gpu-memory"
    elif gpu:
        free, total = torch.cuda.mem_get_info()
        available, source = free, f"free of {total / GB:.1f} GB on {torch.cuda.get_device_name()}"
    else:
        available, source = None, "no GPU here and no --gpu-memory: sizes only"
    if args.compute_capability is not None:
        major, minor = divmod(round(args.compute_capability * 10), 10)
        capability = (major, minor)
    else:
        capability = torch.cuda.get_device_capability() if gpu else FP8_MIN_CAPABILITY
    if settings.require_cuda and not gpu and args.gpu_memory is None:
        problems.append("REQUIRE_CUDA is set but no CUDA device is visible")
    if pipelines:  # the plan of what was found, even when something else is missing
        try:
            report = make_report(
                app.memory_setup(settings, pipelines),
                element_bytes=2,  # what a GPU worker loads: bf16
                available=available,
                available_source=source,
                mode=settings.memory_plan,
                configured_quant=settings.acceleration.quant,
                fp8_supported=capability >= FP8_MIN_CAPABILITY,
                offload_blockers=app.offload_blockers(settings),
            )
        except ConfigError as err:
            problems.append(str(err))
        else:
            print(report.describe(), file=out)
            if not report.fits:
                problems.append(report.failure())
            elif note := report.note():
                print(note, file=out)
    if problems:
        for problem in problems:
            print(f"WOULD NOT START: {problem}", file=out)
        return 1
    print("would start" + ("" if available is not None else " (memory not compared: no GPU size known)"), file=out)
    return 0
