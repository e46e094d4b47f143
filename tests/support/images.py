"""Fixture images made in code: a photo-like gradient with edges, and variants for the decoder's edge cases."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw


def photo_like(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    image = Image.new("RGB", (width, height))
    pixels = image.load()
    for y in range(height):
        for x in range(width):
            pixels[x, y] = ((x * 255 // width + seed * 40) % 256, y * 255 // height, (x + y + seed * 13) % 256)
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 4, height // 4, width // 2, height // 2), fill=(250, 240, 10))
    draw.ellipse((width // 2, height // 3, width - 4, height - 4), outline=(0, 0, 0), width=3)
    return image


def to_bytes(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()
