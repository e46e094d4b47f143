"""The environment of a worker on the tiny pipelines: one definition for a worker process and an in-process worker,
so ``start_worker`` and ``make_worker`` (tests/conftest.py) start from the same configuration."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def tiny_worker_env(tiny_models: Mapping[str, Path], **env: str) -> dict[str, str]:
    """Text-to-image on the tiny pipeline, the tiny (never-flagging) safety checker, two steps; ``env`` on top.

    Add ``QWEN_IMAGE_EDIT_MODEL`` for editing, set ``QWEN_IMAGE_MODEL="none"`` for an edit-only worker, and
    ``SAFETY_CHECKER="off"`` to load no checker at all.
    """
    return {
        "QWEN_IMAGE_MODEL": str(tiny_models["qwen-image"]),
        "SAFETY_CHECKER_MODEL": str(tiny_models["safety-checker"]),
        "DEFAULT_STEPS": "2",
        **env,
    }
