"""Images in and out: fetching and decoding user-supplied inputs safely, and encoding results.

Inputs arrive as http(s) URLs or ``data:image/...;base64,`` URIs. URLs are fetched with the runpod SDK's own
SSRF-safe client (``rp_ssrf.safe_get``): the host is resolved, every address checked, the connection pinned to the
checked address, and each redirect re-checked. Loopback and private targets are refused unless the SDK's switch
``RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS`` is true. Bytes are capped while streaming (never trusting Content-Length), the
pixel count is checked from the header before any pixel is decoded (decompression bombs), and the format is sniffed
from the content, not the URL or the Content-Type.

Outputs are encoded without metadata: no prompt in PNG text chunks, no EXIF.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from PIL import Image, ImageOps, UnidentifiedImageError

from .downloads import DownloadError, download
from .errors import InputImageError
from .schema import OutputFormat

# Formats a user may send. Pillow can read more, but each extra decoder is attack surface for no user benefit.
ACCEPTED_INPUT_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"})
_DATA_URI = re.compile(r"^data:image/[a-zA-Z0-9.+-]+(;[a-zA-Z0-9=.+-]+)*;base64,", re.ASCII)


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
    """Fetch or decode one input image and return it as RGB, upright (EXIF orientation applied)."""
    data = read_image_bytes(reference, limits, field=field)
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
    try:
        scheme = urlsplit(stripped).scheme.lower()
    except ValueError:  # e.g. "http://[::1" (an unclosed IPv6 bracket): not a caller's URL we could ever fetch
        raise InputImageError("the URL is malformed (invalid IPv6 host)", field) from None
    if scheme not in ("http", "https"):
        raise InputImageError(
            "only http(s) URLs and data:image/...;base64, URIs are accepted"
            + (f", not {scheme}:" if scheme and len(scheme) < 16 else ""),
            field,
        )
    return _download(stripped, limits, field)


def decode_image(data: bytes, limits: ImageLimits, *, field: str = "image", flatten: bool = True) -> Image.Image:
    """Decode checked bytes, upright; as RGB with alpha flattened onto white, or (``flatten=False``) in its own mode."""
    try:
        image: Image.Image = Image.open(io.BytesIO(data))  # an ImageFile until exif_transpose makes a plain Image
    except UnidentifiedImageError:
        raise InputImageError("the content is not an image Pillow can read", field) from None
    except (OSError, ValueError) as err:
        raise InputImageError(f"the image could not be read ({err})", field) from None
    if image.format not in ACCEPTED_INPUT_FORMATS:
        raise InputImageError(
            f"unsupported image format {image.format}; send PNG, JPEG, WebP, GIF, BMP or TIFF", field
        )
    width, height = image.size
    # Checked from the header, before a single pixel is decoded.
    if width * height > limits.max_pixels:
        raise InputImageError(
            f"the image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}", field
        )
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image) if flatten else image
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputImageError(f"the image data is corrupt or truncated ({err})", field) from None


def encode_image(image: Image.Image, output_format: OutputFormat, quality: int | None = None) -> EncodedImage:
    """Encode a generated image. ``quality`` (1-100) applies to jpeg and webp; None uses the defaults below.

    Fresh buffers and no ``pnginfo``/``exif`` arguments mean no metadata is written.
    """
    buffer = io.BytesIO()
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if output_format is OutputFormat.PNG:
        rgb.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif output_format is OutputFormat.JPEG:
        rgb.save(buffer, format="JPEG", quality=quality or JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING)
    else:
        rgb.save(buffer, format="WEBP", quality=quality or WEBP_QUALITY, method=WEBP_METHOD)
    return EncodedImage(buffer.getvalue(), output_format, rgb.width, rgb.height)


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


def _to_rgb(image: Image.Image) -> Image.Image:
    """Flatten alpha onto white (what a viewer shows) and expand palettes, so the pipeline always gets RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _decode_data_uri(uri: str, limits: ImageLimits, field: str) -> bytes:
    match = _DATA_URI.match(uri)
    if not match:
        raise InputImageError("a data URI must look like data:image/<type>;base64,<data>", field)
    payload = uri[match.end():]
    # base64 inflates by 4/3: refuse before decoding anything that cannot fit.
    if len(payload) > (limits.max_bytes * 4) // 3 + 4:
        raise InputImageError(f"the image is larger than {limits.max_bytes} bytes", field)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputImageError("the data URI is not valid base64", field) from None


def _download(url: str, limits: ImageLimits, field: str) -> bytes:
    try:
        with download(url, max_bytes=limits.max_bytes, timeout=limits.timeout_seconds, accept="image/*") as chunks:
            return b"".join(chunks)
    except DownloadError as err:
        reason = f"the image is larger than {limits.max_bytes} bytes" if err.too_large else err.reason
        raise InputImageError(reason, field) from None
