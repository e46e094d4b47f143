"""Child process of tests/test_image_corpus.py: decodes corpus files the way the worker does and reports each.

Run as ``python image_corpus_probe.py FILE...``. A separate process so that the parent can kill it when a file takes
too long (a C decoder cannot be interrupted from Python) and can read this process's memory across the corpus.
Prints one JSON object per line: {"start": name} before each file, then its result:

    {"file", "path": "decode" | "data_uri", "field", "outcome": "ok" | "refused" | "escaped", "detail",
     "seconds", "rss"}

and after a second pass over every file {"pass2_rss": bytes, "peak_rss": bytes}: memory after decoding the whole
corpus twice must be about what it was after once.
"""

from __future__ import annotations

import base64
import json
import resource
import sys
import time
from pathlib import Path

from qwen_worker.config import Settings
from qwen_worker.errors import InputImageError
from qwen_worker.media import ImageLimits, decode_image, load_image

# The worker's defaults (MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS).
LIMITS = ImageLimits(Settings.max_image_bytes, Settings.max_image_pixels, timeout_seconds=5)
# Generic fields: what the worker passes for one image, for several, and what a future mask input would.
FIELDS = ("image", "images[0]", "images[2]", "mask_image")


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    """This address space's high-water mark (VmHWM). Not getrusage's ru_maxrss: that survives exec, so a probe forked
    from a large pytest process (gigabytes late in a full run) would report the parent's peak as its own."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def attempt(path: str, data: bytes, field: str) -> tuple[str, str]:
    try:
        if path == "decode":
            image = decode_image(data, LIMITS, field=field)
        else:
            image = load_image("data:image/png;base64," + base64.b64encode(data).decode(), LIMITS, field=field)
    except InputImageError as err:
        return "refused", str(err)
    except BaseException as err:  # noqa: BLE001 - exactly what this probe exists to catch
        return "escaped", f"{type(err).__name__}: {err}"[:500]
    detail = json.dumps({"mode": image.mode, "width": image.width, "height": image.height})
    image.close()
    return "ok", detail


def main(files: list[str]) -> None:
    for index, name in enumerate(files):
        data = Path(name).read_bytes()
        field = FIELDS[index % len(FIELDS)]
        for path in ("decode", "data_uri"):
            emit({"start": name, "path": path})
            started = time.perf_counter()
            outcome, detail = attempt(path, data, field)
            emit(
                {
                    "file": name, "path": path, "field": field, "outcome": outcome, "detail": detail,
                    "seconds": time.perf_counter() - started, "rss": current_rss(),
                }
            )
    after_first = current_rss()
    for name in files:  # the second pass: a leak shows as growth over the first
        emit({"start": name, "path": "pass2"})
        attempt("decode", Path(name).read_bytes(), "image")
    emit(
        {
            "pass1_rss": after_first,
            "pass2_rss": current_rss(),
            "peak_rss": peak_rss(),
        }
    )


if __name__ == "__main__":
    main(sys.argv[1:])
