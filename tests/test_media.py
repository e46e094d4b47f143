"""Input images (fetch, caps, decode) and output encoding, without any pipeline."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from support.file_server import closed_port, file_server
from support.images import photo_like, to_bytes

from qwen_worker.errors import InputImageError
from qwen_worker.media import ImageLimits, encode_image, load_image
from qwen_worker.schema import OutputFormat

LIMITS = ImageLimits(max_bytes=2_000_000, max_pixels=4_000_000, timeout_seconds=5)


@pytest.fixture
def allow_private(monkeypatch):
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def failure(reference: str, limits: ImageLimits = LIMITS) -> str:
    with pytest.raises(InputImageError) as caught:
        load_image(reference, limits)
    message = str(caught.value)
    assert message.startswith("Invalid image URL")
    return message


def test_data_uri_round_trip():
    image = load_image(data_uri(to_bytes(photo_like())), LIMITS)
    assert image.mode == "RGB" and image.size == (96, 64)


def test_http_fetch_from_loopback_when_allowed(allow_private):
    with file_server() as server:
        url = server.add("/a.jpg", to_bytes(photo_like(), "JPEG"), "image/jpeg")
        assert load_image(url, LIMITS).size == (96, 64)


def test_loopback_refused_without_the_sdk_switch(monkeypatch):
    monkeypatch.delenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", raising=False)
    with file_server() as server:
        url = server.add("/a.png", to_bytes(photo_like()))
        assert "non-public address" in failure(url)
        assert server.requests == []  # refused before any connection


def test_closed_port_and_404(allow_private):
    assert "could not connect" in failure(f"http://127.0.0.1:{closed_port()}/x.png")
    with file_server() as server:
        assert "HTTP 404" in failure(server.url("/missing.png"))


def test_content_is_sniffed_not_trusted(allow_private):
    with file_server() as server:
        assert "not an image" in failure(server.add("/fake.png", b"<html>hello</html>", "image/png"))
        # A real PNG served with a wrong Content-Type and extension still loads.
        assert load_image(server.add("/real.txt", to_bytes(photo_like()), "text/plain"), LIMITS).size == (96, 64)


def test_byte_cap_is_enforced_while_streaming(allow_private):
    big = to_bytes(photo_like(600, 600), "BMP")  # ~1 MB
    small_limits = ImageLimits(max_bytes=100_000, max_pixels=10**8, timeout_seconds=5)
    with file_server() as server:
        declared = server.add("/big.bmp", big, "image/bmp")
        assert "larger than 100000 bytes" in failure(declared, small_limits)
        # No Content-Length at all: the cap must hold while reading, not only from the header.
        undeclared = server.add("/big-undeclared.bmp", big, "image/bmp", send_length=False)
        assert "larger than 100000 bytes" in failure(undeclared, small_limits)
    assert "larger than 100000 bytes" in failure(data_uri(big, "image/bmp"), small_limits)


def test_pixel_cap_checked_before_decoding():
    # A 5000x5000 single-colour PNG compresses to a few KB: a decompression bomb in miniature.
    bomb = to_bytes(Image.new("L", (5000, 5000)), "PNG", optimize=True)
    assert len(bomb) < 100_000
    assert "over the limit of 4000000" in failure(data_uri(bomb))


@pytest.mark.parametrize(
    "reference, reason",
    [
        ("ftp://127.0.0.1/a.png", "only http(s) URLs"),
        ("file:///etc/passwd", "only http(s) URLs"),
        ("not a url", "only http(s) URLs"),
        ("data:text/plain;base64,aGVsbG8=", "data URI must look like"),
        ("data:image/png;base64,@@@", "not valid base64"),
    ],
)
def test_bad_references(reference, reason):
    assert reason in failure(reference)


def test_truncated_image_is_refused():
    data = to_bytes(photo_like(), "JPEG")
    assert "corrupt or truncated" in failure(data_uri(data[: len(data) // 2], "image/jpeg"))


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    data = to_bytes(photo_like(96, 64), "JPEG", exif=exif.tobytes())
    assert load_image(data_uri(data, "image/jpeg"), LIMITS).size == (64, 96)


def test_alpha_is_flattened_onto_white_and_palettes_expanded():
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    loaded = load_image(data_uri(to_bytes(transparent)), LIMITS)
    assert loaded.mode == "RGB" and loaded.getpixel((0, 0)) == (255, 255, 255)
    palette = photo_like().convert("P")
    assert load_image(data_uri(to_bytes(palette)), LIMITS).mode == "RGB"


@pytest.mark.parametrize("fmt, pil_name", [(OutputFormat.PNG, "PNG"), (OutputFormat.JPEG, "JPEG")])
def test_encoded_outputs_carry_no_metadata(fmt, pil_name):
    source = photo_like()
    source.info["parameters"] = "prompt: secret plans"  # what some pipelines attach
    encoded = encode_image(source, fmt)
    decoded = Image.open(io.BytesIO(encoded.data))
    assert decoded.format == pil_name and decoded.size == (96, 64)
    assert b"secret plans" not in encoded.data
    assert not decoded.getexif()
    assert not getattr(decoded, "text", {})
