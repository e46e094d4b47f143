"""The one place the worker imports the runpod SDK, without the second Python interpreter its import starts.

``import runpod`` runs the SDK's whole package ``__init__``, and on the way ``runpod.serverless.utils.rp_debugger``
calls py-cpuinfo's ``get_cpu_info()`` at import time, which starts another interpreter (``cpuinfo.py --json``) to
find one string, the CPU's brand, shown only in the SDK's debugger output. That child was 1.2 s of the worker's cold
start on 2 cores (``python -X importtime``: ``rp_debugger``'s own time), most of what the worker spent above the
floor of importing torch and diffusers (docs/PERFORMANCE.md, cold start). Here the SDK is imported with
``get_cpu_info`` answering that string in-process (``/proc/cpuinfo``'s model name, else ``platform.processor()``),
and py-cpuinfo is restored right after: nothing else sees the change.

Import the SDK's names from here (``handler.py``, ``downloads.py``, ``progress.py``, ``app.py``), so whichever comes
first pays no child process.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from contextlib import contextmanager


def cpu_brand() -> dict[str, str]:
    """What rp_debugger reads from ``get_cpu_info()``: ``brand_raw``, the processor's marketing name."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return {"brand_raw": value.strip()}
    except OSError:  # not Linux: the SDK falls back the same way when the key is missing
        pass
    return {"brand_raw": platform.processor() or "Unable to get processor info."}


@contextmanager
def cpu_info_in_process() -> Iterator[None]:
    """py-cpuinfo's ``get_cpu_info`` replaced by ``cpu_brand`` for the duration (the SDK's import), then restored."""
    import cpuinfo

    original = cpuinfo.get_cpu_info
    cpuinfo.get_cpu_info = cpu_brand
    try:
        yield
    finally:
        cpuinfo.get_cpu_info = original


with cpu_info_in_process():
    import runpod
    from runpod.serverless import progress_update
    from runpod.serverless.modules.rp_logger import RunPodLogger
    from runpod.serverless.utils import rp_ssrf

__all__ = ["RunPodLogger", "progress_update", "rp_ssrf", "runpod"]
