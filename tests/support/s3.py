"""A boto3 client for the local S3 server that the ``s3_server`` fixture (tests/conftest.py) starts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from s3_server import S3ServerInfo  # scripts/s3_server.py


def s3_client(info: S3ServerInfo) -> Any:
    """A SigV4, path-style client for the server ``info`` describes, as a test's own view of the bucket."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=info.endpoint_url,
        aws_access_key_id=info.access_key,
        aws_secret_access_key=info.secret_key,
        region_name=info.region,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
