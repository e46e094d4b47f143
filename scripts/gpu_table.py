"""Print the README's GPU table: which setup fits which GPU size, and with which plan, by the worker's own planner.

    python scripts/gpu_table.py [FOLDER]

Writes the real-size stand-ins of ``builder/real_size_models.py`` (the published checkpoints' safetensors headers,
no data; a few MB of disk) into FOLDER (default: a temporary folder) and runs ``qwen_worker.memory_plan`` on each
setup with MEMORY_PLAN=auto against each GPU size, as ``python handler.py --check --gpu-memory GB`` would.
tests/test_memory_plan.py checks that the README holds exactly this output.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "builder"), str(ROOT / "src")]

GPU_SIZES = (24, 48, 80, 141)  # GB: L4 / RTX 4090, L40S / A6000, H100 / A100 80GB, H200

# setup -> the variables it sets (values name real_size_models' folders; "" passes the text through)
SETUPS: dict[str, dict[str, str]] = {
    "t2i (Qwen-Image or 2512)": {},
    "t2i + Lightning 8-step": {"LIGHTNING_LORA": "lightning-8step"},
    "t2i, LoRA slots off": {"LORA_SLOT_RANK": "=0"},
    "t2i + ControlNet-Union": {"QWEN_IMAGE_CONTROLNET_MODEL": "qwen-image-controlnet"},
    "edit (Edit, Edit-Plus)": {"QWEN_IMAGE_MODEL": "=none", "QWEN_IMAGE_EDIT_MODEL": "qwen-image-edit"},
    "both (t2i + edit)": {"QWEN_IMAGE_EDIT_MODEL": "qwen-image-edit"},
    "layers (Layered)": {"QWEN_IMAGE_MODEL": "=none", "QWEN_IMAGE_LAYERED_MODEL": "qwen-image-layered"},
    "t2i + layers": {"QWEN_IMAGE_LAYERED_MODEL": "qwen-image-layered"},
    "2.1 (t2i and edit)": {"QWEN_IMAGE_MODEL": "qwen-image-2.1", "QWEN_IMAGE_ACCEPT_RESEARCH_LICENSE": "=true"},
}


def setup_env(real: dict[str, Path], variables: dict[str, str]) -> dict[str, str]:
    env = {"QWEN_IMAGE_MODEL": str(real["qwen-image"]), "SAFETY_CHECKER_MODEL": str(real["safety-checker"]),
           "MEMORY_PLAN": "auto"}
    for name, value in variables.items():
        env[name] = value[1:] if value.startswith("=") else str(real[value])
    return env


def gpu_table(real: dict[str, Path]) -> str:
    """The markdown table, one row per setup, one column per GPU size."""
    from qwen_worker.app import configured_pipelines, memory_setup, offload_blockers
    from qwen_worker.config import Settings
    from qwen_worker.memory_plan import GB, make_report

    lines = [
        "| setup | " + " | ".join(f"{size} GB" for size in GPU_SIZES) + " |",
        "| --- |" + " --- |" * len(GPU_SIZES),
    ]
    for name, variables in SETUPS.items():
        settings = Settings.from_env(setup_env(real, variables))
        setup = memory_setup(settings, configured_pipelines(settings))
        cells = []
        for size in GPU_SIZES:
            report = make_report(
                setup, element_bytes=2, available=size * GB, available_source=f"{size} GB", mode="auto",
                configured_quant="none", fp8_supported=True, offload_blockers=offload_blockers(settings),
            )
            if report.chosen is None:
                smallest = min(plan.gpu_bytes for plan in report.candidates)
                cells.append(f"no ({smallest / GB:.0f} GB at least)")
            else:
                cells.append(f"{report.chosen.name}, {report.chosen.gpu_bytes / GB:.0f} GB")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    import logging

    logging.disable(logging.INFO)  # the models' "found at" lines
    from real_size_models import build_all

    if argv:
        print(gpu_table(build_all(Path(argv[0]))), end="")
        return 0
    with tempfile.TemporaryDirectory() as folder:
        print(gpu_table(build_all(Path(folder))), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
