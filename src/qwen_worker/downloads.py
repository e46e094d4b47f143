"""Downloading a user-supplied http(s) URL (input images, LoRA files), with one set of reasons for every refusal.

Everything goes through the runpod SDK's own SSRF-safe client (``rp_ssrf.safe_get``): the host is resolved and every
address checked, the connection is pinned to the checked address (no DNS-rebinding window), each redirect is checked
again (at most 5), and a URL routed through a proxy is refused. Loopback and private targets are allowed only by the
SDK's switch ``RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS=true``. The body is capped while streaming, never trusting
Content-Length.

Reasons name the host only: URLs (and the SDK's own messages) can carry signed query strings.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import requests

from .runpod_sdk import rp_ssrf

CHUNK_BYTES = 64 * 1024


class DownloadError(Exception):
    """A download was refused or failed. ``too_large`` lets callers word the size limit their own way."""

    def __init__(self, reason: str, *, too_large: bool = False) -> None:
        self.reason = reason
        self.too_large = too_large
        super().__init__(reason)


@contextmanager
def download(url: str, *, max_bytes: int, timeout: float, accept: str) -> Iterator[Iterator[bytes]]:
    """Open ``url`` and yield an iterator over its body in chunks; raises ``DownloadError`` (also while iterating)."""
    host = host_of(url)
    try:
        response = rp_ssrf.safe_get(url, stream=True, timeout=timeout, max_bytes=max_bytes, headers={"Accept": accept})
    except rp_ssrf.SSRFError as err:
        raise _refusal(err, host) from None
    except ValueError as err:
        # After SSRFError (a ValueError). A malformed URL fails inside the SDK, before any connection: a port past
        # 65535 or not a number, a host the IDNA codec refuses (a label over 63 characters), a redirect to "http://[::1".
        raise DownloadError(f"the URL is malformed ({type(err).__name__})") from None
    except requests.Timeout:
        raise DownloadError(f"timed out after {timeout:g} s connecting to {host}") from None
    except requests.ConnectionError:
        raise DownloadError(f"could not connect to {host}") from None
    except requests.RequestException as err:
        raise DownloadError(f"the download from {host} failed ({type(err).__name__})") from None

    with response:
        if response.status_code != 200:
            raise DownloadError(f"{host} answered HTTP {response.status_code}")
        yield _chunks(response, max_bytes=max_bytes, timeout=timeout, host=host)


def _chunks(response: requests.Response, *, max_bytes: int, timeout: float, host: str) -> Iterator[bytes]:
    try:
        yield from rp_ssrf.iter_content_capped(response, CHUNK_BYTES, max_bytes)
    except rp_ssrf.SSRFError as err:
        raise _refusal(err, host) from None
    except requests.Timeout:
        raise DownloadError(f"timed out after {timeout:g} s reading from {host}") from None
    except requests.RequestException as err:
        raise DownloadError(f"the download from {host} broke off ({type(err).__name__})") from None


def _refusal(err: rp_ssrf.SSRFError, host: str) -> DownloadError:
    text = str(err)
    if "size cap" in text:
        return DownloadError(text, too_large=True)
    if "non-public address" in text:
        return DownloadError(
            text + " (loopback, private, link-local and other non-public addresses are refused unless "
            "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS=true)"
        )
    if "proxy" in text:
        return DownloadError(f"{host} would be fetched through a proxy, which the download guard refuses")
    return DownloadError(re.split(r":? ?[a-zA-Z][a-zA-Z0-9+.-]*://", text, maxsplit=1)[0])


def host_of(url: str) -> str:
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"
