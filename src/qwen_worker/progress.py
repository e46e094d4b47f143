"""Progress while denoising, sent to Runpod so that /status shows how far a job is.

The SDK's ``progress_update`` posts from a fire-and-forget thread. To keep those posts from delaying or racing the
final result, updates are rate-limited to every ``every_fraction`` of the steps and the last step is never reported:
after it come decoding, encoding and upload, so the final result always follows the last progress post by the time
those stages take.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Sender = Callable[[Mapping[str, Any], Any], None]


class StepProgress:
    """Turns per-step callbacks into at most ~1/every_fraction progress updates for one job."""

    def __init__(self, job: Mapping[str, Any], send: Sender, every_fraction: float = 0.1) -> None:
        self.job = job
        self.send = send
        self.every_fraction = every_fraction
        self._last_fraction = 0.0

    def __call__(self, done: int, total: int) -> None:
        if done >= total:
            return
        fraction = done / total
        if fraction - self._last_fraction + 1e-9 < self.every_fraction:
            return
        self._last_fraction = fraction
        update = {"stage": "denoising", "step": done, "total_steps": total, "percent": round(fraction * 100)}
        self.send(self.job, update)


def runpod_sender() -> Sender:
    from .runpod_sdk import progress_update

    sender: Sender = progress_update  # (job, update) -> None, as the SDK documents it
    return sender
