"""Input images (fetch, caps, decode) and output encoding, without any pipeline."""

from __future__ import annotations

import base64
import io
import re
import struct

import pytest
from PIL import Image, ImageFile, ImageOps
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
        assert "not a PNG, JPEG, WebP, GIF, BMP or TIFF image" in failure(
            server.add("/fake.png", b"<html>hello</html>", "image/png")
        )
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


# Refusals of a bare string: both name the accepted forms.
NOT_ANY_FORM = "the value is not an http(s) URL, a data:image/...;base64, URI or base64 image data"
BASE64_NOT_AN_IMAGE = "not an http(s) URL or a data URI, and as base64 it is not a PNG, JPEG, WebP, GIF, BMP or TIFF"


@pytest.mark.parametrize(
    "reference, reason",
    [
        ("ftp://127.0.0.1/a.png", "only http(s) URLs, data:image/...;base64, URIs and base64 image data"),
        ("file:///etc/passwd", "only http(s) URLs"),
        ("javascript:alert(1)", "only http(s) URLs"),
        ("C:\\photos\\cat.png", "only http(s) URLs"),
        ("example.com:8080/cat.png", "only http(s) URLs"),
        # Not URLs, so read as bare base64: the refusal still says which forms are accepted.
        ("not a url", BASE64_NOT_AN_IMAGE),
        ("cat.png", NOT_ANY_FORM),
        ("photos/cat.png", NOT_ANY_FORM),
        ("/tmp/x", BASE64_NOT_AN_IMAGE),
        ("iVBORw0KGgo", BASE64_NOT_AN_IMAGE),
        ("abcde", NOT_ANY_FORM),
        ("été.png", NOT_ANY_FORM),
        ("data:image/png,%89PNG", "data URI must look like"),
        ("data:image/svg+xml;utf8,<svg/>", "data URI must look like"),
        ("data:text/plain;base64,aGVsbG8=", "data URI must look like"),
        ("data:image/png;base64,@@@", "not valid base64"),
    ],
)
def test_bad_references(reference, reason):
    assert reason in failure(reference)


def test_truncated_image_is_refused():
    data = to_bytes(photo_like(), "JPEG")
    assert "the image data is corrupt or truncated" in failure(data_uri(data[: len(data) // 2], "image/jpeg"))


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


# ------------------------------------------------------------------------------- base64 as clients really send it


def wrapped(text: str, newline: str = "\n", width: int = 76) -> str:
    """What the `base64` command prints by default: 76-column lines."""
    return newline.join(text[i : i + width] for i in range(0, len(text), width)) + newline


def lenient_forms(data: bytes) -> dict[str, str]:
    standard = base64.b64encode(data).decode()
    url_safe = base64.urlsafe_b64encode(data).decode()
    assert "=" in standard and ("-" in url_safe or "_" in url_safe)  # the fixture really exercises both
    return {
        "standard": standard,
        "wrapped-lf": wrapped(standard),
        "wrapped-crlf": wrapped(standard, "\r\n"),
        "spaces": " ".join(standard[i : i + 10] for i in range(0, len(standard), 10)),
        "url-safe": url_safe,
        "unpadded": standard.rstrip("="),
        "url-safe-unpadded-wrapped": wrapped(url_safe.rstrip("="), "\r\n", 64),
    }


# A JPEG whose base64 has padding and, URL-safe, '-' or '_': found by trying seeds.
LENIENT_FIXTURE = next(
    data
    for seed in range(50)
    for data in [to_bytes(photo_like(40, 30, seed=seed), "JPEG", quality=80)]
    if len(data) % 3 and {"-", "_"} & set(base64.urlsafe_b64encode(data).decode())
)


@pytest.mark.parametrize("form", list(lenient_forms(LENIENT_FIXTURE)))
@pytest.mark.parametrize(
    "prefix",
    ["data:image/jpeg;base64,", "DATA:image/JPEG;BASE64,", "data:application/octet-stream;base64,", "data:;base64,"]
    + [""],  # bare
)
def test_base64_is_accepted_as_clients_send_it(form, prefix):
    reference = prefix + lenient_forms(LENIENT_FIXTURE)[form]
    expected = Image.open(io.BytesIO(LENIENT_FIXTURE)).convert("RGB")
    loaded = load_image(reference, LIMITS, field="images[1]")
    assert loaded.size == (40, 30) and loaded.tobytes() == expected.tobytes()


def test_bare_base64_of_every_accepted_format_loads():
    source = photo_like(40, 30)
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"):
        assert load_image(base64.b64encode(to_bytes(source, fmt)).decode(), LIMITS).size == (40, 30), fmt


def test_bare_base64_that_is_a_corrupt_image_says_what_is_wrong_with_it():
    data = to_bytes(photo_like(), "JPEG")
    assert "the image data is corrupt or truncated" in failure(base64.b64encode(data[: len(data) // 2]).decode())


@pytest.mark.parametrize(
    "payload, reason",
    [
        ("QUJD=RA", "not valid base64"),  # padding in the middle
        ("QUJDR", "not valid base64"),  # one character left over: no padding completes it
        ("QUJD\u00e9", "not valid base64"),
        ("QUJD*", "not valid base64"),
    ],
)
def test_broken_base64_in_a_data_uri_is_refused(payload, reason):
    assert reason in failure("data:image/png;base64," + payload)


def test_base64_size_caps_hold_for_every_form():
    limits = ImageLimits(max_bytes=30_000, max_pixels=10**8, timeout_seconds=5)
    big = to_bytes(photo_like(200, 200), "BMP")  # 120 KB
    for form in lenient_forms(big[: 30_001]).values():
        for prefix in ("data:image/bmp;base64,", ""):
            assert "larger than 30000 bytes" in failure(prefix + form, limits)
    # Exactly at the cap (and wrapped, so longer than the cap's bare encoding) is still allowed through to decoding.
    at_cap = to_bytes(photo_like(100, 100), "BMP")
    limits_at_cap = ImageLimits(max_bytes=len(at_cap), max_pixels=10**8, timeout_seconds=5)
    assert load_image(wrapped(base64.b64encode(at_cap).decode(), "\r\n"), limits_at_cap).size == (100, 100)
    # A payload far beyond any image the cap allows is refused before it is decoded at all.
    assert "larger than 30000 bytes" in failure("A" * 10_000_000, limits)


def test_strings_that_look_like_urls_are_never_read_as_base64(allow_private):
    for reference in (f"http://127.0.0.1:{closed_port()}/x.png", f"HTTPS://127.0.0.1:{closed_port()}/x"):
        assert "could not connect" in failure(reference)
    for malformed in ("http:/127.0.0.1/x.png", "httpexample.com/a.png", "http//example.com/a.png"):
        message = failure(malformed)
        assert NOT_ANY_FORM not in message and BASE64_NOT_AN_IMAGE not in message, message


# ------------------------------------------------------------------------------- every Pillow failure is translated


def test_the_field_is_named_whatever_it_is_called():
    with pytest.raises(InputImageError) as caught:
        load_image("data:image/png;base64,AAAA", LIMITS, field="mask_image")
    assert str(caught.value).startswith("Invalid image URL (mask_image): ") and caught.value.field == "mask_image"


STAGES = ["open", "load", "exif_transpose", "convert"]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(
    "error",
    [
        OSError("broken data stream when reading image file"),
        SyntaxError("APNG contains frame sequence errors"),
        NotImplementedError("Unimplemented pixel format 0"),
        struct.error("unpack requires a buffer of 4 bytes"),
        ValueError("tile cannot extend outside image"),
        OverflowError("Python int too large to convert to C long"),
        EOFError(),
        IndexError("list index out of range"),
        KeyError(274),
        TypeError("'NoneType' object is not subscriptable"),
        ZeroDivisionError("division by zero"),
        RecursionError("maximum recursion depth exceeded"),
        MemoryError(),
        Image.DecompressionBombError("Image size (274877898816 pixels) exceeds limit"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_whatever_pillow_raises_at_any_stage_becomes_one_readable_sentence(stage, error, monkeypatch):
    def fail(*args, **kwargs):
        raise error

    png_with_alpha = to_bytes(Image.new("RGBA", (8, 8)))  # alpha, so that the RGB conversion runs

    if stage == "open":
        monkeypatch.setattr(Image, "open", fail)
    elif stage == "load":
        monkeypatch.setattr(ImageFile.ImageFile, "load", fail)
    elif stage == "exif_transpose":
        monkeypatch.setattr(ImageOps, "exif_transpose", fail)
    else:
        monkeypatch.setattr(Image.Image, "convert", fail)
    for reference in (data_uri(png_with_alpha), base64.b64encode(png_with_alpha).decode()):
        with pytest.raises(InputImageError) as caught:
            load_image(reference, LIMITS, field="images[2]")
        message = str(caught.value)
        assert re.fullmatch(r"Invalid image URL \(images\[2\]\): the [^\n]{20,300}", message), message
        assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_pillows_own_bomb_guard_is_answered_with_our_limit():
    # A BMP header claiming 100000x100000: Pillow's open refuses it (over twice its MAX_IMAGE_PIXELS) before we look.
    header = struct.pack("<2sIHHI", b"BM", 0, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, 100_000, 100_000, 1, 24, 0, 0, 0, 0, 0, 0)
    assert "more pixels than the limit of 4000000" in failure(data_uri(header + info + b"\0" * 64, "image/bmp"))


def test_an_animation_is_read_as_its_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert load_image(data_uri(buffer.getvalue(), "image/gif"), LIMITS).getpixel((8, 8)) == (255, 0, 0)


def test_a_jpeg_with_a_multi_picture_index_is_accepted():
    # Phones write portrait and HDR shots this way; Pillow names the format "MPO".
    first, second = photo_like(64, 48), photo_like(64, 48, seed=2)
    data = to_bytes(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert load_image(data_uri(data, "image/jpeg"), LIMITS).size == (64, 48)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_is_scaled_not_clipped_to_white(fmt):
    grey = Image.frombytes("I;16", (4, 4), struct.pack("<H", 32768) * 16)
    loaded = load_image(data_uri(to_bytes(grey, fmt)), LIMITS)
    assert loaded.mode == "RGB" and loaded.getpixel((0, 0)) == (128, 128, 128)


def test_formats_outside_the_accepted_six_are_not_even_parsed():
    for fmt in ("ICO", "PCX", "TGA", "PPM", "SGI"):
        message = failure(data_uri(to_bytes(photo_like(32, 32), fmt)))
        assert "not a PNG, JPEG, WebP, GIF, BMP or TIFF image" in message, fmt
