"""Inline and local-directory stores (the S3 store is proven against a real server in test_s3.py)."""

from __future__ import annotations

import base64
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest

from qwen_worker.errors import ResultTooLargeError
from qwen_worker.media import EncodedImage
from qwen_worker.schema import OutputFormat
from qwen_worker.storage import InlineStore, LocalDirectoryStore, safe_job_id


def encoded(size: int = 100, fmt: OutputFormat = OutputFormat.PNG) -> EncodedImage:
    return EncodedImage(bytes(range(256)) * (size // 256) + b"x" * (size % 256), fmt, 8, 8)


def test_inline_returns_decodable_data_uris_with_the_right_mime():
    png, jpeg = encoded(300), encoded(50, OutputFormat.JPEG)
    urls = InlineStore(10_000).store("job", [png, jpeg])
    assert urls[0].startswith("data:image/png;base64,") and urls[1].startswith("data:image/jpeg;base64,")
    assert base64.b64decode(urls[0].split(",", 1)[1]) == png.data


def test_inline_cap_counts_all_images_and_recommends_a_bucket():
    store = InlineStore(1_000)
    store.store("job", [encoded(600)])  # 800 base64 chars + prefix: fits
    with pytest.raises(ResultTooLargeError) as caught:
        store.store("job", [encoded(600), encoded(600)])
    assert "MAX_INLINE_BYTES" in str(caught.value) and "BUCKET_ENDPOINT_URL" in str(caught.value)


def test_local_directory_writes_files_and_file_urls(tmp_path):
    store = LocalDirectoryStore(tmp_path / "out")
    first = store.store("local_test", [encoded(10)])
    path = url2pathname(urlparse(first[0]).path)
    assert first[0].startswith("file://") and Path(path).read_bytes() == encoded(10).data
    assert not list((tmp_path / "out").glob("*.partial"))


@pytest.mark.parametrize(
    "job_id, expected", [("sync-abc-u1", "sync-abc-u1"), ("../../etc/passwd", "_.._etc_passwd"), ("", "job")]
)
def test_job_ids_are_made_safe_for_paths_and_keys(job_id, expected):
    assert safe_job_id(job_id) == expected
