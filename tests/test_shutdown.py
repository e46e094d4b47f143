"""Scale-down: SIGTERM while a job runs. The job finishes (or fails cleanly), the worker exits, and no half-written
result is left behind, in the bucket or in LOCAL_OUTPUT_DIR.

What happens, with the SDK's local API server (uvicorn): uvicorn's SIGTERM handler only sets ``should_exit``. The
handler is synchronous and runs on the event-loop thread, so the running job is not interrupted: it finishes, its
response is written, and on the next tick uvicorn closes the listener, waits for open connections, runs the lifespan
shutdown and then re-raises SIGTERM with the default action, so the process ends with -SIGTERM (143 in a shell)
well within a second of the response (0.2 s measured on 2 cores).

On Runpod itself the SDK's JobScaler (runpod/serverless/modules/rp_scale.py) installs its own SIGTERM/SIGINT handler
that sets a shutdown event: no new job is taken, the running job (again on the loop thread) completes and its result
is posted, and ``run_jobs`` drains before ``asyncio.run`` returns.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from support.responses import completed_output, open_image
from support.s3 import s3_client
from support.worker_process import WorkerProcess

from qwen_worker.errors import StorageError
from qwen_worker.media import EncodedImage
from qwen_worker.schema import OutputFormat
from qwen_worker.storage import LocalDirectoryStore

EXIT_WITHIN_S = 60
# Four 1024x1024 images at 2 steps: ~7 s on 2 cores (most of it the VAE decode), so SIGTERM lands mid-job.
LONG_JOB = {"prompt": "a lighthouse in a storm", "size": "1024*1024", "num_images": 4, "seed": 11}
CLEAN_EXIT_CODES = (0, -signal.SIGTERM)


def sigterm_during_job(worker: WorkerProcess, payload: dict[str, Any]) -> dict[str, Any]:
    """Send ``payload`` and SIGTERM the worker (the process itself, as a container runtime does) once the job runs.

    Returns the response (or the exception the request met), the log offset at the signal, and the exit details.
    """
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            response = requests.post(worker.url + "/runsync", json={"input": payload}, timeout=300)
            outcome["status_code"] = response.status_code
            outcome["body"] = response.json()
        except Exception as err:  # noqa: BLE001 (recorded and asserted on below)
            outcome["exception"] = err

    before = len(worker.log_text())
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not re.search(r"\| (test-[0-9a-f-]+) \| Started\.", worker.log_text()[before:]):
        assert time.monotonic() < deadline and thread.is_alive(), "the job never started:\n" + worker.log_text()[-3000:]
        time.sleep(0.05)
    time.sleep(0.3)  # into the pipeline call
    outcome["log_offset"] = len(worker.log_text())
    signalled = time.monotonic()
    worker.process.send_signal(signal.SIGTERM)
    thread.join(EXIT_WITHIN_S)
    assert not thread.is_alive(), "no response within the limit after SIGTERM"
    try:
        outcome["returncode"] = worker.process.wait(timeout=EXIT_WITHIN_S)
    except Exception:
        worker.stop()
        raise AssertionError(f"no exit within {EXIT_WITHIN_S} s of SIGTERM:\n{worker.log_text()[-3000:]}") from None
    outcome["exit_after_s"] = time.monotonic() - signalled
    return outcome


def assert_in_flight_job_completed(worker: WorkerProcess, outcome: dict[str, Any]) -> dict[str, Any]:
    assert "exception" not in outcome, f"the in-flight request broke off: {outcome['exception']!r}"
    assert outcome["status_code"] == 200
    body = outcome["body"]
    job_id = body["id"]
    # The job was still running when the signal came: its completion is logged after that point.
    after = worker.log_text()[outcome["log_offset"]:]
    assert f"job {job_id} done in" in after, after[-2000:]
    assert outcome["returncode"] in CLEAN_EXIT_CODES, (outcome["returncode"], worker.log_text()[-2000:])
    assert outcome["exit_after_s"] < EXIT_WITHIN_S
    with pytest.raises(requests.ConnectionError):
        requests.get(worker.url + "/", timeout=5)  # nothing listens any more
    if body["status"] == "FAILED":  # acceptable: failed cleanly, with a readable string
        assert isinstance(body["error"], str) and body["error"]
        return body
    output = completed_output(body)
    assert len(output["images"]) == LONG_JOB["num_images"]
    return body


@pytest.mark.s3
def test_sigterm_mid_job_finishes_it_uploads_whole_objects_and_exits(start_worker, s3_server):
    client = s3_client(s3_server)
    client.create_bucket(Bucket="scale-down")
    with start_worker(
        BUCKET_ENDPOINT_URL=s3_server.endpoint_url,
        BUCKET_ACCESS_KEY_ID=s3_server.access_key,
        BUCKET_SECRET_ACCESS_KEY=s3_server.secret_key,
        BUCKET_NAME="scale-down",
        BUCKET_PREFIX="sd",
    ) as worker:
        outcome = sigterm_during_job(worker, LONG_JOB)
    body = assert_in_flight_job_completed(worker, outcome)
    job_id = body["id"]

    listed = client.list_objects_v2(Bucket="scale-down", Prefix="sd/").get("Contents", [])
    keys = {item["Key"]: item["Size"] for item in listed}
    if body["status"] == "COMPLETED":
        expected = {f"sd/{job_id}/{index}.png" for index in range(LONG_JOB["num_images"])}
        assert set(keys) == expected
        for index, image in enumerate(body["output"]["images"]):
            fetched = requests.get(image["url"], timeout=30)  # the presigned URLs work after the worker is gone
            assert fetched.status_code == 200
            assert len(fetched.content) == keys[f"sd/{job_id}/{index}.png"] > 0
            decoded = open_image(fetched.content)  # load() fails on a truncated file
            assert (decoded.format, decoded.size) == ("PNG", (1024, 1024))
    # Whatever the outcome: every object present is whole, and no multipart upload was left open.
    for key, size in keys.items():
        data = client.get_object(Bucket="scale-down", Key=key)["Body"].read()
        assert size > 0 and len(data) == size
        open_image(data)
    assert not client.list_multipart_uploads(Bucket="scale-down").get("Uploads")


def test_sigterm_mid_job_leaves_only_whole_files_in_the_output_dir(start_worker, tmp_path):
    out = tmp_path / "out"
    with start_worker(LOCAL_OUTPUT_DIR=str(out)) as worker:
        outcome = sigterm_during_job(worker, LONG_JOB)
    body = assert_in_flight_job_completed(worker, outcome)
    files = sorted(out.iterdir()) if out.exists() else []
    assert not [path.name for path in files if not path.name.endswith(".png")], files  # no *.partial
    if body["status"] == "COMPLETED":
        assert [Path(image["url"].removeprefix("file://")) for image in body["output"]["images"]] == files
    for path in files:
        assert open_image(path.read_bytes()).size == (1024, 1024)


def test_sigterm_while_idle_exits_promptly(start_worker):
    with start_worker() as worker:
        completed_output(worker.runsync({"prompt": "a cat", "size": "256*256"}))
        signalled = time.monotonic()
        worker.process.send_signal(signal.SIGTERM)
        returncode = worker.process.wait(timeout=EXIT_WITHIN_S)
    assert returncode in CLEAN_EXIT_CODES
    assert time.monotonic() - signalled < 15
    assert "Finished server process" in worker.log_text()


def image(size: int = 200_000) -> EncodedImage:
    return EncodedImage(os.urandom(size), OutputFormat.PNG, 8, 8)


@pytest.mark.parametrize("failure", ["disk full", "interrupted"])
def test_local_store_leaves_no_partial_file_when_a_write_breaks_off(tmp_path, monkeypatch, failure):
    """A write that fails half-way (ENOSPC) or is interrupted (SIGINT -> KeyboardInterrupt, SystemExit) must not
    leave ``*.partial`` files behind: only whole images, under their final names, ever stay in the directory."""
    store = LocalDirectoryStore(tmp_path / "out")
    images = [image(), image()]
    real_write = Path.write_bytes
    calls = {"n": 0}

    def breaking_write(path: Path, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] < 2:
            return real_write(path, data)
        real_write(path, data[: len(data) // 2])  # half of the second image reaches the disk
        if failure == "disk full":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", breaking_write)
    expected = StorageError if failure == "disk full" else KeyboardInterrupt
    with pytest.raises(expected):
        store.store("job-1", images)
    monkeypatch.undo()
    left = sorted((tmp_path / "out").iterdir())
    assert not [path.name for path in left if path.name.endswith(".partial")], left
    for path in left:  # whatever stays is whole, under its final name
        assert path.suffix == ".png" and path.read_bytes() in (images[0].data, images[1].data)
