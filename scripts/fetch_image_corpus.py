"""Fetch Pillow's own test images, the corpus tests/test_image_corpus.py drives through the worker's decoder.

Pillow's sdist on PyPI ships its Tests/images folder: over a thousand files of every format it knows, among them
fuzzer crashers, truncated files, decompression bombs and exotic layouts. This downloads the sdist of the Pillow
version pinned in requirements.txt with pip (the project's own tooling; pip checks PyPI's hash, and we check the
archive against the sha256 pinned below), and extracts only Tests/images into a cache folder outside the repository:

    $IMAGE_CORPUS_DIR, else $XDG_CACHE_HOME/qwen-worker/pillow-<version>-images (~/.cache/... by default)

`make test` runs it first. Run by hand: `.venv/bin/python scripts/fetch_image_corpus.py` prints the folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The sdist's sha256 per Pillow version, as PyPI lists it. Bumping Pillow in requirements.txt means adding its line
# here: the corpus is test input we execute a decoder on, so it is pinned like any dependency.
SDIST_SHA256 = {
    "13.0.0": "cdcd1ba258178f7356d74170c9a81ba4eab6a5d55748bc402a5a2a6fe6be3510",
}
# Pillow 13.0.0's folder holds 1086 files; far fewer means a damaged or changed archive, not a smaller corpus.
MIN_FILES = 500
_COMPLETE = ".complete"


class CorpusError(Exception):
    """The corpus could not be fetched or verified."""


def pinned_pillow() -> str:
    match = re.search(r"^pillow==(\S+)\s*$", (ROOT / "requirements.txt").read_text(), re.M | re.I)
    if not match:
        raise CorpusError("requirements.txt pins no pillow==<version>")
    return match.group(1)


def corpus_dir(version: str | None = None) -> Path:
    override = os.environ.get("IMAGE_CORPUS_DIR")
    if override:
        return Path(override)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "qwen-worker" / f"pillow-{version or pinned_pillow()}-images"


def available() -> Path | None:
    """The extracted corpus folder, or None when it has not been fetched (completely)."""
    folder = corpus_dir()
    return folder if (folder / _COMPLETE).is_file() else None


def fetch() -> Path:
    version = pinned_pillow()
    folder = corpus_dir(version)
    if (folder / _COMPLETE).is_file():
        return folder
    expected = SDIST_SHA256.get(version)
    if expected is None:
        raise CorpusError(
            f"no sha256 pinned for the pillow {version} sdist: add it to SDIST_SHA256 in {Path(__file__).name}"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pillow-sdist-", dir=folder.parent) as scratch:
        scratch_path = Path(scratch)
        archive = _download(version, expected, scratch_path)
        extracted = scratch_path / "images"
        count = _extract_images(archive, version, extracted)
        (extracted / _COMPLETE).write_text(f"pillow {version} sdist sha256 {expected}: {count} files\n")
        shutil.rmtree(folder, ignore_errors=True)  # a partial earlier attempt
        extracted.rename(folder)  # same filesystem: the folder appears whole or not at all
    return folder


def _download(version: str, sha256: str, scratch: Path) -> Path:
    requirement = scratch / "requirement.txt"
    requirement.write_text(f"pillow=={version} --hash=sha256:{sha256}\n")
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
        "--require-hashes", "-r", str(requirement), "--dest", str(scratch),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise CorpusError(f"pip download of the pillow {version} sdist failed:\n{result.stderr.strip()[-2000:]}")
    archives = list(scratch.glob(f"pillow-{version}.tar.gz"))
    if len(archives) != 1:
        raise CorpusError(f"pip download left no pillow-{version}.tar.gz in {scratch}")
    digest = hashlib.sha256(archives[0].read_bytes()).hexdigest()
    if digest != sha256:
        raise CorpusError(f"pillow-{version}.tar.gz has sha256 {digest}, expected {sha256}")
    return archives[0]


def _extract_images(archive: Path, version: str, destination: Path) -> int:
    prefix = f"pillow-{version}/Tests/images/"
    with tarfile.open(archive, "r:gz") as tar:
        members = [member for member in tar.getmembers() if member.name.startswith(prefix) and member.isfile()]
        if len(members) < MIN_FILES:
            raise CorpusError(f"{archive.name} holds {len(members)} files under Tests/images, expected >= {MIN_FILES}")
        for member in members:
            member.name = member.name[len(prefix):]
        # The "data" filter refuses absolute paths, "..", links out of the folder and special files.
        tar.extractall(destination, members=members, filter="data")
    return len(members)


def main() -> int:
    try:
        print(fetch())
    except (CorpusError, OSError, subprocess.TimeoutExpired) as err:
        print(f"image corpus not fetched: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
