"""Every file in Pillow's own test corpus through the worker's input decoder: decoded, or refused in one sentence.

The corpus (Tests/images from the pinned Pillow's sdist: fuzzer crashers, truncated files, bombs, every format
Pillow knows) is fetched by scripts/fetch_image_corpus.py, which `make test` runs first. Without it these tests skip
loudly, and fail under CI=true.

Files are decoded in two child processes (tests/support/image_corpus_probe.py), so that a file hanging in a C decoder
can be killed and named, and so that memory is measured in a process that decoded nothing else.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import fetch_image_corpus  # scripts/, on pytest's pythonpath
import pytest
from support.images import photo_like, to_bytes
from support.responses import completed_output

PROCESSES = 2
PER_FILE_SECONDS = 5.0  # "none takes longer than a few seconds"; the slowest takes well under one here
MAX_PASS2_GROWTH = 64 * 1024 * 1024  # decoding the corpus a second time must not keep growing the process
MAX_PEAK_RSS = 2 * 1024**3  # MAX_IMAGE_PIXELS bounds any one decode: 40 MP, a few hundred MB at most
REFUSAL = re.compile(r"^Invalid image URL \((?P<field>image|images\[\d\]|mask_image)\): the (?P<reason>[^\n]{10,400})$")
# Files whose exceptions escaped the decoder before Pillow's errors were translated in one place.
KNOWN_ESCAPES = (
    "bmp/b/reallybig.bmp", "bmp/b/badwidth.bmp", "apng/chunk_no_fctl.png", "unimplemented_pixel_format.dds",
    "unimplemented_dxgi_format.dds", "unimplemented_pfflags.dds",
)


@pytest.fixture(scope="module")
def corpus() -> list[Path]:
    folder = fetch_image_corpus.available()
    if folder is None:
        message = (
            f"IMAGE CORPUS UNAVAILABLE at {fetch_image_corpus.corpus_dir()}: run "
            "`.venv/bin/python scripts/fetch_image_corpus.py` (make test does)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return sorted(path for path in folder.rglob("*") if path.is_file() and not path.name.startswith("."))


class Probe:
    """One child process decoding a share of the corpus; a watchdog kills it when one file runs too long."""

    def __init__(self, files: list[Path]) -> None:
        self.records: list[dict] = []
        self.current: tuple[str, float] | None = None
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - the child's stderr, closed with the probe
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "support" / "image_corpus_probe.py"), *map(str, files)],
            stdout=subprocess.PIPE,
            stderr=self.stderr,  # Pillow's warnings about the corrupt files
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            record = json.loads(line)
            if "start" in record:
                self.current = (f"{record['start']} ({record['path']})", time.monotonic())
            else:
                self.current = None
                self.records.append(record)

    def overdue(self) -> str | None:
        current = self.current
        if current is not None and time.monotonic() - current[1] > PER_FILE_SECONDS:
            return current[0]
        return None

    def stderr_tail(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def results(corpus) -> list[dict]:
    # Interleaved shares keep each child's mix of formats (and cost) alike.
    probes = [Probe(corpus[start::PROCESSES]) for start in range(PROCESSES)]
    try:
        while any(probe.process.poll() is None for probe in probes):
            for probe in probes:
                stuck = probe.overdue()
                if stuck:
                    pytest.fail(f"{stuck} took over {PER_FILE_SECONDS} s to decode (killed)")
            time.sleep(0.1)
        for probe in probes:
            probe.reader.join(timeout=10)
            assert probe.process.returncode == 0, f"probe died ({probe.process.returncode}):\n{probe.stderr_tail()}"
    finally:
        for probe in probes:
            if probe.process.poll() is None:
                probe.process.kill()
                probe.process.wait()
    records = [record for probe in probes for record in probe.records]
    memory = [record for record in records if "pass2_rss" in record]
    assert len(memory) == PROCESSES
    for record in memory:
        growth = record["pass2_rss"] - record["pass1_rss"]
        assert growth < MAX_PASS2_GROWTH, f"RSS grew {growth / 2**20:.0f} MB decoding the corpus a second time"
        assert record["peak_rss"] < MAX_PEAK_RSS, f"peak RSS {record['peak_rss'] / 2**20:.0f} MB"
    return [record for record in records if "file" in record]


def test_every_file_decodes_or_is_refused_in_one_readable_sentence(corpus, results):
    assert len(results) == 2 * len(corpus) >= 2 * fetch_image_corpus.MIN_FILES
    escaped = [f"{r['file']} ({r['path']}): {r['detail']}" for r in results if r["outcome"] == "escaped"]
    assert not escaped, "\n".join(escaped)
    for record in results:
        if record["outcome"] == "ok":
            image = json.loads(record["detail"])
            assert image["mode"] == "RGB", record
            assert 0 < image["width"] * image["height"] <= 40_000_000, record
        else:
            match = REFUSAL.match(record["detail"])
            assert match and match["field"] == record["field"], record
            assert "Traceback" not in record["detail"] and "<PIL." not in record["detail"], record


def test_both_input_paths_give_the_same_answer(results):
    by_file: dict[str, dict[str, dict]] = {}
    for record in results:
        by_file.setdefault(record["file"], {})[record["path"]] = record
    for name, paths in by_file.items():
        assert (paths["decode"]["outcome"], paths["decode"]["detail"]) == (
            paths["data_uri"]["outcome"],
            paths["data_uri"]["detail"],
        ), name


def test_the_corpus_really_exercises_both_answers(corpus, results):
    outcomes = Counter(record["outcome"] for record in results if record["path"] == "decode")
    formats = Counter(path.suffix.lower() for path in corpus)
    # Hundreds of files of dozens of formats; hundreds decoded, hundreds refused.
    assert len(formats) >= 30 and outcomes["ok"] >= 300 and outcomes["refused"] >= 200, (outcomes, formats)
    refused = {record["file"] for record in results if record["outcome"] == "refused"}
    for name in KNOWN_ESCAPES:
        assert any(path.endswith("/" + name) for path in refused), name


def test_no_file_takes_more_than_a_few_seconds(results):
    slowest = max(results, key=lambda record: record["seconds"])
    assert slowest["seconds"] < PER_FILE_SECONDS, slowest


# ---------------------------------------------------------------------------------------------- through the worker


def nastiest(results: list[dict], count: int = 30) -> list[Path]:
    """Refused files under 2 MB: the known escapes, then one per distinct reason, then one per other file type."""
    refused = sorted(
        (r for r in results if r["path"] == "decode" and r["outcome"] == "refused"),
        key=lambda r: (not any(r["file"].endswith("/" + name) for name in KNOWN_ESCAPES), r["file"]),
    )
    refused = [r for r in refused if Path(r["file"]).stat().st_size < 2_000_000]
    chosen: list[str] = []
    reasons, suffixes = set(), set()
    for record in refused:
        reason = re.sub(r"\d+", "N", REFUSAL.match(record["detail"])["reason"])
        if reason not in reasons:
            reasons.add(reason)
            chosen.append(record["file"])
    for record in refused:
        suffix = Path(record["file"]).suffix.lower()
        if suffix not in suffixes and record["file"] not in chosen:
            suffixes.add(suffix)
            chosen.append(record["file"])
    return [Path(name) for name in chosen[:count]]


@pytest.mark.slow
def test_the_nastiest_files_fail_their_job_and_the_worker_keeps_serving(results, tiny_models, start_worker):
    sample = nastiest(results)
    assert len(sample) >= 25
    good = "data:image/png;base64," + base64.b64encode(to_bytes(photo_like(64, 48))).decode()
    with start_worker(
        QWEN_IMAGE_EDIT_MODEL=str(tiny_models["qwen-image-edit-plus"]), SAFETY_CHECKER="off", DEFAULT_STEPS="1"
    ) as worker:
        for index, path in enumerate(sample):
            nasty = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
            # Alternate the single-image field and a position among several.
            payload = {"prompt": "x", "image": nasty} if index % 2 else {"prompt": "x", "images": [good, nasty]}
            field = "image" if index % 2 else "images[1]"
            body = worker.runsync(payload)
            assert body["status"] == "FAILED", (path.name, body)
            assert body["error"].startswith(f"Invalid image URL ({field}): the "), (path.name, body)
            # The same worker still decodes a good input (a dry run plans the edit from it, generating nothing).
            quote = completed_output(worker.runsync({"prompt": "x", "image": good, "dry_run": True}))
            assert quote["dry_run"] and quote["width"] / quote["height"] == pytest.approx(64 / 48, rel=0.05)
        output = completed_output(worker.runsync({"prompt": "a cat", "size": "256*256", "seed": 1}))
        assert output["width"] == 256
        assert "Internal error" not in worker.log_text() and "Traceback" not in worker.log_text()
