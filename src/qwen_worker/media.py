"""Images in and out: fetching and decoding user-supplied inputs safely, and encoding results.

An input arrives as an http(s) URL, a ``data:<type>;base64,`` URI, or bare base64 (as many Runpod workers take it).
URLs are fetched through ``downloads.download`` (its docstring says how SSRF is prevented), capped while streaming;
base64 is bounded before it is decoded.

Decoding runs entirely inside ``_pillow_errors``, the one place where Pillow's exceptions become ``InputImageError``:
only the formats in ``ACCEPTED_INPUT_FORMATS`` are tried (sniffed from the content, never the URL, Content-Type or
data URI type), the pixel count is checked from the header before any pixel is decoded (decompression bombs), and
an animation is read as its first frame.

Outputs are encoded without metadata: no prompt in PNG text chunks, no EXIF. An RGBA result (Qwen-Image-2.1's
transparent output; Layered's layers) keeps its alpha in PNG and WebP; JPEG, which has none, gets it flattened over
white (``flatten_alpha``), never silently dropped.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from PIL import Image, ImageOps, UnidentifiedImageError

from .downloads import DownloadError, download
from .enums import OutputFormat
from .errors import InputImageError

# Formats a user may send. Pillow can read more, but each extra decoder is attack surface for no user benefit, so
# Image.open is told to try only these. A JPEG carrying a multi-picture index (phones' portrait and HDR shots,
# stereo cameras) is opened by the JPEG plugin as "MPO"; it is still a JPEG, read as its first picture.
ACCEPTED_INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_FORMAT_NAMES = "PNG, JPEG, WebP, GIF, BMP or TIFF"
_NOT_AN_IMAGE = f"the content is not a {_FORMAT_NAMES} image"
_FORMS = "an http(s) URL, a data:image/...;base64, URI or base64 image data"

# An image type, the type browsers give a file they cannot name (application/octet-stream), or none at all: the
# format is sniffed from the content either way. Parameters (;charset=..., ;name=...) are ignored.
_DATA_URI = re.compile(
    r"^data:(image/[a-z0-9.+-]+|application/octet-stream)?(;[^,;]*)*;base64,", re.ASCII | re.IGNORECASE
)
# What clients add to base64: line breaks (the base64 command wraps at 76 columns, with \n or \r\n) and spaces.
_BASE64_WHITESPACE = b" \t\r\n\f\v"
# The URL-safe alphabet (RFC 4648 section 5) differs only in these two characters.
_URL_SAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_CAUSE_CHARS = 160


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    timeout_seconds: float


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    format: OutputFormat
    width: int
    height: int


def load_image(reference: str, limits: ImageLimits, *, field: str = "image") -> Image.Image:
    """Fetch or decode one input image and return it as RGB, upright (EXIF orientation applied).

    ``field`` names the request field in every error (``image``, ``images[1]``, ``mask_image``).
    """
    data = read_image_bytes(reference, limits, field=field)
    if _is_bare_base64(reference.strip()):
        # Bytes that are no image at all most likely mean the value was never meant as base64 (a path, a typo'd
        # URL): say which forms are accepted rather than only what the bytes are not.
        not_an_image = f"the value is not an http(s) URL or a data URI, and as base64 it is not a {_FORMAT_NAMES} image"
        return _decode(data, limits, field, not_an_image=not_an_image)
    return decode_image(data, limits, field=field)


def load_mask(reference: str, limits: ImageLimits, *, field: str = "mask_image") -> Image.Image:
    """Fetch or decode an inpainting mask and return it as a greyscale ("L") image: 255 = repaint, 0 = keep.

    White is repainted and black kept, as in every inpainting API. A mask with transparency is read by its alpha
    channel instead (opaque = repaint), as editors export a painted selection; flattening it onto white, as input
    images are, would repaint everything.
    """
    data = read_image_bytes(reference, limits, field=field)
    image = decode_image(data, limits, field=field, flatten=False)
    try:
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            alpha = image.convert("RGBA").getchannel("A")
            low, high = alpha.getextrema()
            if low != high:  # real transparency; a uniform alpha says nothing, so the colours decide
                return alpha
        return image.convert("L")
    except (OSError, ValueError) as err:
        raise InputImageError(f"the mask could not be read as greyscale ({err})", field) from None


def read_image_bytes(reference: str, limits: ImageLimits, *, field: str = "image") -> bytes:
    stripped = reference.strip()
    if stripped[:5].lower() == "data:":
        return _decode_data_uri(stripped, limits, field)
    if _is_bare_base64(stripped):
        return _decode_base64(stripped, limits, field, invalid=f"the value is not {_FORMS}")
    try:
        scheme = urlsplit(stripped).scheme.lower()
    except ValueError:  # e.g. "http://[::1" (an unclosed IPv6 bracket): not a caller's URL we could ever fetch
        raise InputImageError("the URL is malformed (invalid IPv6 host)", field) from None
    if scheme not in ("http", "https"):
        raise InputImageError(
            "only http(s) URLs, data:image/...;base64, URIs and base64 image data are accepted"
            + (f", not {scheme}:" if scheme and len(scheme) < 16 else ""),
            field,
        )
    return _download(stripped, limits, field)


def decode_image(data: bytes, limits: ImageLimits, *, field: str = "image", flatten: bool = True) -> Image.Image:
    """Decode untrusted bytes into an upright image, or raise ``InputImageError`` naming ``field``: RGB with any
    alpha flattened onto white, or (``flatten=False``, for masks read by their alpha) in the file's own mode."""
    return _decode(data, limits, field, not_an_image=_NOT_AN_IMAGE, flatten=flatten)


def _decode(data: bytes, limits: ImageLimits, field: str, *, not_an_image: str, flatten: bool = True) -> Image.Image:
    with (
        _pillow_errors(field, limits, not_an_image=not_an_image),
        Image.open(io.BytesIO(data), formats=ACCEPTED_INPUT_FORMATS) as image,
    ):
        width, height = image.size
        # Image.open has read only the header: refuse before a single pixel is decoded.
        if width * height > limits.max_pixels:
            raise InputImageError(
                f"the image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}",
                field,
            )
        image.load()  # the current frame, which after open is the first one of an animation
        upright = ImageOps.exif_transpose(image)  # a copy, so it outlives the file closed below
        return _to_rgb(upright) if flatten else upright


@contextlib.contextmanager
def _pillow_errors(field: str, limits: ImageLimits, *, not_an_image: str) -> Iterator[None]:
    """Translate whatever Pillow raises on a caller's bytes into one readable ``InputImageError``.

    The one place for it, as httpx's ``map_exceptions``. Pillow's parsers and decoders answer corrupt input with
    whatever the bytes provoke: OSError for truncated data, SyntaxError from broken chunks and headers,
    NotImplementedError for layouts it recognises but cannot decode, and struct.error, ValueError, EOFError,
    IndexError, KeyError, TypeError, OverflowError, ZeroDivisionError... from corrupt headers (tests/
    test_image_corpus.py drives Pillow's own corpus of such files through here). Only Pillow, reading the caller's
    bytes, runs inside this guard, so every such exception is about the input, never a fault of the worker.
    """
    try:
        yield
    except InputImageError:
        raise
    except UnidentifiedImageError:
        raise InputImageError(not_an_image, field) from None
    except Image.DecompressionBombError:
        # Pillow's own guard, raised by Image.open itself (before our header check can run) for images over twice
        # its Image.MAX_IMAGE_PIXELS, about 179 MP.
        raise InputImageError(f"the image has more pixels than the limit of {limits.max_pixels}", field) from None
    except MemoryError:
        raise InputImageError("the image needs more memory to decode than the worker can give it", field) from None
    except Exception as err:  # noqa: BLE001 - see the docstring: anything Pillow raises here is about the input
        raise InputImageError(
            f"the image data is corrupt or truncated, or uses a feature Pillow cannot decode ({_cause(err)})", field
        ) from None


def _cause(err: BaseException) -> str:
    """Pillow's own words, kept to one short line: they are the only hint of what is wrong with the file."""
    lines = str(err).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if len(text) > _CAUSE_CHARS:
        text = text[: _CAUSE_CHARS - 3] + "..."
    return text or type(err).__name__


def encode_image(image: Image.Image, output_format: OutputFormat, quality: int | None = None) -> EncodedImage:
    """Encode a generated image. ``quality`` (1-100) applies to jpeg and webp; None uses the defaults below.

    An RGBA image is written with its alpha as PNG or WebP (WebP's alpha plane is lossless at these settings),
    flattened over white as JPEG. Fresh buffers and no ``pnginfo``/``exif`` arguments mean no metadata is written.
    """
    buffer = io.BytesIO()
    if image.mode == "RGBA" and output_format is not OutputFormat.JPEG:
        output = image
    elif image.mode in ("RGBA", "LA", "PA"):
        output = flatten_alpha(image)
    else:
        output = image if image.mode == "RGB" else image.convert("RGB")
    if output_format is OutputFormat.PNG:
        output.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif output_format is OutputFormat.JPEG:
        output.save(buffer, format="JPEG", quality=quality or JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING)
    else:
        output.save(buffer, format="WEBP", quality=quality or WEBP_QUALITY, method=WEBP_METHOD)
    return EncodedImage(buffer.getvalue(), output_format, output.width, output.height)


# Encoder settings, chosen with bench/worker_overhead.py (`make bench`) on a photo-like 1024x1024 image; the numbers
# and the whole size/speed table are in docs/PERFORMANCE.md (2-vCPU AMD EPYC, Pillow 13 with zlib-ng 2.3.3,
# libjpeg-turbo 3.2, libwebp 1.6):
# - PNG is lossless at every level, so only speed and size differ. Level 1 encodes in ~51 ms against ~194 ms for
#   Pillow's default 6, for 19% more bytes (1.02 vs 0.86 MB). Level 2 saves 3% for +4 ms, level 3 10% for +21 ms;
#   levels 7-9 take 0.3-1.5 s to save 2-7% against 6. Level 0 still takes ~28 ms and triples the bytes.
# - JPEG 95 with 4:4:4 chroma: coloured text and edges keep ~9 dB more PSNR than with 4:2:0 (43.0 vs 34.1 dB on the
#   sign; 45.3 vs 39.6 dB overall) for 17% more bytes and ~1 ms. optimize=True saves 3% for 2.6x the encode time.
# - WebP 90 with method 0: ~22 ms against ~76 ms for method 4 (libwebp's default), 10% more bytes, PSNR within
#   0.15 dB (39.0 vs 39.1 dB).
PNG_COMPRESS_LEVEL = 1
JPEG_QUALITY = 95
JPEG_SUBSAMPLING = "4:4:4"
WEBP_QUALITY = 90
WEBP_METHOD = 0


def flatten_alpha(image: Image.Image) -> Image.Image:
    """An image with alpha composited over white (what a viewer shows); RGB images are returned as they are.

    ``convert("RGB")`` would drop the alpha instead, exposing whatever colour the transparent pixels happen to hold.
    """
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _to_rgb(image: Image.Image) -> Image.Image:
    """Flatten alpha onto white (what a viewer shows) and expand palettes, so the pipeline always gets RGB."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        # 16-bit grey (PNG, TIFF): Pillow's convert("RGB") clips at 255, so mid-grey 32768 would turn white.
        # Scale to 8 bits the way a viewer shows it.
        image = image.convert("I").point(lambda value: value / 256).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return flatten_alpha(image)
    return image.convert("RGB")


def _is_bare_base64(reference: str) -> bool:
    """Anything that is not a data URI and has no scheme is taken as bare base64 (which never contains ':').

    A string with "://" or starting with "http" is always a URL, so a URL is never mistaken for base64.
    """
    return reference[:5].lower() != "data:" and ":" not in reference and reference[:4].lower() != "http"


def _decode_data_uri(uri: str, limits: ImageLimits, field: str) -> bytes:
    match = _DATA_URI.match(uri)
    if not match:
        raise InputImageError("a data URI must look like data:image/<type>;base64,<data>", field)
    return _decode_base64(uri[match.end():], limits, field, invalid="the data URI is not valid base64")


def _decode_base64(text: str, limits: ImageLimits, field: str, *, invalid: str) -> bytes:
    """Decode base64 as clients send it: wrapped in lines, with spaces, URL-safe, or without its padding.

    The encoded length is bounded before anything is decoded, the decoded size after.
    """
    too_large = f"the image is larger than {limits.max_bytes} bytes"
    max_encoded = 4 * -(-limits.max_bytes // 3)
    # Generous room for line breaks and spaces; the exact bound is checked once they are gone.
    if len(text) > 2 * max_encoded + 1024:
        raise InputImageError(too_large, field)
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise InputImageError(invalid, field) from None
    compact = raw.translate(_URL_SAFE_TO_STANDARD, _BASE64_WHITESPACE).rstrip(b"=")
    if len(compact) > max_encoded:
        raise InputImageError(too_large, field)
    if len(compact) % 4 == 1:  # no padding can complete a group with a single character
        raise InputImageError(invalid, field)
    try:
        data = base64.b64decode(compact + b"=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InputImageError(invalid, field) from None
    if len(data) > limits.max_bytes:
        raise InputImageError(too_large, field)
    return data


def _download(url: str, limits: ImageLimits, field: str) -> bytes:
    try:
        with download(url, max_bytes=limits.max_bytes, timeout=limits.timeout_seconds, accept="image/*") as chunks:
            return b"".join(chunks)
    except DownloadError as err:
        reason = f"the image is larger than {limits.max_bytes} bytes" if err.too_large else err.reason
        raise InputImageError(reason, field) from None
