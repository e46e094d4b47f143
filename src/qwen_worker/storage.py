"""Where encoded results go, behind one small interface: ``store(job_id, images) -> urls``.

- ``InlineStore`` (nothing configured): ``data:image/...;base64,`` URIs in the job output, capped at MAX_INLINE_BYTES
  because Runpod drops job outputs over 20 MB (and then reports COMPLETED with no output).
- ``LocalDirectoryStore`` (LOCAL_OUTPUT_DIR): files on disk, answered with ``file://`` URLs; for local runs and demos.
- ``S3Store`` (BUCKET_*): uploads to any S3-compatible bucket and answers with SigV4 presigned GET URLs that live
  IMAGE_URL_TTL_SECONDS (default and maximum 7 days), as Runpod's own endpoints do.

Stores know nothing of diffusers or of the request beyond the job id.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from .config import BucketSettings
from .errors import ResultTooLargeError, StorageError
from .media import EncodedImage


class ResultStore(Protocol):
    description: str

    def store(self, job_id: str, images: Sequence[EncodedImage]) -> list[str]:
        """Persist the images of one job, in order, and return one URL per image."""
        ...


def safe_job_id(job_id: str) -> str:
    """Job ids become file names and object keys: keep them to a harmless alphabet and length."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", job_id)[:128].strip(".")
    return cleaned or "job"


class InlineStore:
    description = "inline data URIs"

    def __init__(self, max_inline_bytes: int) -> None:
        self.max_inline_bytes = max_inline_bytes

    def store(self, job_id: str, images: Sequence[EncodedImage]) -> list[str]:
        urls = [
            f"data:{image.format.mime_type};base64,{base64.b64encode(image.data).decode('ascii')}" for image in images
        ]
        total = sum(len(url) for url in urls)
        if total > self.max_inline_bytes:
            raise ResultTooLargeError(
                f"The result is {total} bytes as inline base64, over the inline limit of {self.max_inline_bytes} bytes "
                "(MAX_INLINE_BYTES; Runpod drops job outputs over 20 MB). Configure a bucket (BUCKET_ENDPOINT_URL, "
                "BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY, BUCKET_NAME) to receive URLs instead, or ask for "
                "jpeg output or a smaller size."
            )
        return urls


class LocalDirectoryStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory.resolve()
        self.description = f"local directory {self.directory}"

    def store(self, job_id: str, images: Sequence[EncodedImage]) -> list[str]:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # Local job ids repeat (the SDK's local mode always says "local_test"): a timestamp keeps each run's files.
            stamp = time.strftime("%Y%m%d-%H%M%S")
            urls = []
            for index, image in enumerate(images):
                path = self.directory / f"{safe_job_id(job_id)}-{stamp}-{index}.{image.format.extension}"
                partial = path.with_suffix(path.suffix + ".partial")
                try:
                    partial.write_bytes(image.data)
                    partial.replace(path)  # never leave a half-written file under the final name
                except BaseException:  # a full disk, or an interrupt mid-write: nor under the .partial name
                    with contextlib.suppress(OSError):
                        partial.unlink(missing_ok=True)
                    raise
                urls.append(path.as_uri())
            return urls
        except OSError as err:
            raise StorageError(f"Could not write the result to {self.directory}: {err.strerror or err}") from None


class S3Store:
    """Uploads to an S3-compatible bucket and returns presigned GET URLs.

    Keys are ``<prefix>/<job id>/<index>.<ext>``: deterministic per job, so a retried job overwrites its own objects
    instead of littering the bucket.
    """

    def __init__(self, settings: BucketSettings) -> None:
        self.settings = settings
        self.description = f"bucket {settings.bucket} at {settings.endpoint_url}"
        self._client = make_s3_client(settings)

    def key_for(self, job_id: str, index: int, extension: str) -> str:
        name = f"{safe_job_id(job_id)}/{index}.{extension}"
        return f"{self.settings.prefix}/{name}" if self.settings.prefix else name

    def store(self, job_id: str, images: Sequence[EncodedImage]) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        urls = []
        for index, image in enumerate(images):
            key = self.key_for(job_id, index, image.format.extension)
            try:
                self._client.put_object(
                    Bucket=self.settings.bucket, Key=key, Body=image.data, ContentType=image.format.mime_type
                )
                urls.append(
                    self._client.generate_presigned_url(
                        "get_object",
                        Params={"Bucket": self.settings.bucket, "Key": key},
                        ExpiresIn=self.settings.url_ttl_seconds,
                    )
                )
            except (ClientError, BotoCoreError) as err:
                raise StorageError(self._explain(err, "upload the result to")) from None
        return urls

    def check(self) -> str | None:
        """A read-only probe (HEAD on the bucket) for start-up. Returns a warning, or None when the bucket answers."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_bucket(Bucket=self.settings.bucket)
        except (ClientError, BotoCoreError) as err:
            return self._explain(err, "reach")
        return None

    def _explain(self, err: Exception, action: str) -> str:
        """A readable cause for a boto error. Never includes the secret key."""
        from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError

        where = f"bucket '{self.settings.bucket}' at {self.settings.endpoint_url}"
        if isinstance(err, ClientError):
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchBucket", "404", "NotFound"):
                cause = "the bucket does not exist (check BUCKET_NAME)"
            elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
                cause = (
                    f"access denied ({code or status}): check BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY and the "
                    "key's permissions on the bucket"
                )
            else:
                cause = f"the server answered {code or 'an error'} (HTTP {status})"
        elif isinstance(err, (ConnectTimeoutError, ReadTimeoutError)):
            cause = "the storage endpoint timed out"
        elif isinstance(err, EndpointConnectionError):
            cause = "could not connect to the storage endpoint (check BUCKET_ENDPOINT_URL)"
        else:
            cause = type(err).__name__
        message = f"Could not {action} {where}: {cause}"
        return message.replace(self.settings.secret_access_key, "***") if self.settings.secret_access_key else message


def make_s3_client(settings: BucketSettings) -> Any:  # a botocore client: boto3 ships no type information
    """A client that uses exactly the configured keys: never boto3's default credential chain or instance metadata."""
    # Even with explicit keys, botocore may ask the instance-metadata address for a region or token; forbid it.
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=str(settings.secret_access_key),
        region_name=settings.region,
    )
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": settings.addressing_style},
        connect_timeout=5,
        read_timeout=30,
        retries={"max_attempts": 3, "mode": "standard"},
        # boto3 >= 1.36 sends aws-chunked bodies with CRC trailers by default, which R2, GCS and others reject.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return session.client("s3", endpoint_url=settings.endpoint_url, config=config)
