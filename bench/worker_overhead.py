#!/usr/bin/env python3
"""Benchmark of everything the worker does around the model for one 1 MP result (not a timed test).

Stages, timed separately and in total, for png, jpeg and webp:

    validate   parse_request() of a typical text-to-image request
    encode     the worker's encode_image() (media.py's encoder constants)
    store      the worker's S3Store.store(): put_object + a presigned GET URL, against a real local S3 server
    respond    the job's output dict + json.dumps

beside a naive baseline run in the same process, interleaved with it: Pillow's defaults (``img.save(buf, "PNG")``
is zlib level 6 with optimize off; JPEG quality 75 with 4:2:0; WebP quality 80, method 4) and a plain
``boto3.client("s3", ...)`` with botocore's default config doing put_object + generate_presigned_url.

A second table sweeps encoder settings (size, ms, PSNR) on the same fixture, which is what the constants in
src/qwen_worker/media.py are chosen from. The fixture is a deterministic, photo-like 1024x1024 image generated in
code (smooth gradients, anti-aliased shapes with hard edges, text, a mild smooth texture; not random noise, which PNG
cannot compress at all). A pure-noise image is encoded too, at the end of the sweep, for scale only.

The script starts its own S3 server (scripts/s3_server.py: OpenStack Swift + s3api on 127.0.0.1) in a temporary
directory and always stops it. Usage: make bench, or
    .venv/bin/python bench/worker_overhead.py [-n 30] [--sweep-n 7] [--json PATH] [--no-sweep]
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "src"))

# Only the keys given here, only 127.0.0.1: no instance metadata, no ~/.aws files changing the "default" client.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ["AWS_CONFIG_FILE"] = os.devnull
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
for _name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "HTTP_PROXY",
              "HTTPS_PROXY", "http_proxy", "https_proxy"):
    os.environ.pop(_name, None)
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter, ImageFont  # noqa: E402

SIDE = 1024
BUCKET = "bench"
FORMATS = ("png", "jpeg", "webp")
PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
STAGES = ("validate", "encode", "store", "respond")
GOAL_TOTAL_MS = 60.0
GOAL_RATIO = 0.5


# ------------------------------------------------------------------------------------------------------------------
# Fixture
# ------------------------------------------------------------------------------------------------------------------


def photo_like_fixture(side: int = SIDE) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """A deterministic photo-like RGB image, and the box of its main block of text (for a text-only PSNR).

    A street scene at dusk: sky and ground gradients, a sun with a soft glow, mountains, buildings with lit windows,
    a shop sign with text, all drawn at 2x and downsampled (anti-aliased edges, as in a real or generated image),
    plus a smooth multi-scale texture (seeded noise blurred at 0.7 to 36 px), never independent per-pixel noise.
    """
    big = side * 2
    y = np.linspace(0.0, 1.0, big, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, big, dtype=np.float32)[None, :]
    sky_top, sky_bottom = np.array([28, 52, 110], np.float32), np.array([250, 170, 110], np.float32)
    sky = sky_top + (sky_bottom - sky_top) * (y[..., None] / 0.6).clip(0, 1)
    ground = np.array([70, 60, 55], np.float32) + np.array([60, 45, 30], np.float32) * ((y[..., None] - 0.6) / 0.4)
    ground = ground + 25 * x[..., None]
    base = np.where(y[..., None] < 0.6, sky, ground)
    base = np.broadcast_to(base, (big, big, 3)).copy()
    # Sun glow: a smooth radial falloff.
    d2 = (x - 0.72) ** 2 + (y - 0.42) ** 2
    base += (np.exp(-d2 / 0.01) * 90)[..., None] * np.array([1.0, 0.8, 0.45], np.float32)
    image = Image.fromarray(base.clip(0, 255).astype(np.uint8), "RGB")

    draw = ImageDraw.Draw(image)
    s = big / 1024  # drawing coordinates are given for 1024 px
    draw.ellipse([700 * s, 395 * s, 776 * s, 471 * s], fill=(255, 236, 190))
    draw.polygon([(0, 620 * s), (180 * s, 430 * s), (300 * s, 540 * s), (470 * s, 380 * s), (640 * s, 560 * s),
                  (760 * s, 470 * s), (1024 * s, 610 * s), (1024 * s, 620 * s)], fill=(58, 64, 92))
    # Buildings with windows: many hard edges.
    left = 40
    for index, (width, height, colour) in enumerate(
        [(150, 260, (96, 84, 80)), (110, 330, (120, 104, 96)), (180, 220, (84, 90, 104)), (130, 300, (110, 92, 84)),
         (160, 240, (100, 100, 112)), (120, 280, (92, 80, 76))]
    ):
        top = 900 - height
        draw.rectangle([left * s, top * s, (left + width) * s, 900 * s], fill=colour)
        for wy in range(top + 18, 880, 34):
            for wx in range(left + 14, left + width - 24, 30):
                lit = (wx * 7 + wy * 13 + index) % 5 < 2
                draw.rectangle([wx * s, wy * s, (wx + 16) * s, (wy + 20) * s],
                               fill=(255, 214, 140) if lit else (40, 44, 58))
        left += width + 8
    # A round-cornered car and a tree: curves.
    draw.rounded_rectangle([560 * s, 905 * s, 820 * s, 985 * s], radius=28 * s, fill=(176, 30, 40))
    draw.ellipse([585 * s, 960 * s, 635 * s, 1010 * s], fill=(20, 20, 24))
    draw.ellipse([745 * s, 960 * s, 795 * s, 1010 * s], fill=(20, 20, 24))
    draw.rectangle([905 * s, 760 * s, 925 * s, 990 * s], fill=(70, 50, 36))
    draw.ellipse([850 * s, 640 * s, 980 * s, 800 * s], fill=(46, 96, 52))
    # A shop sign: dark text on a light panel, and light text on a dark band (what JPEG chroma subsampling hurts).
    text_box = (60, 60, 600, 250)
    draw.rounded_rectangle([v * s for v in text_box], radius=18 * s, fill=(245, 240, 228), outline=(150, 30, 30),
                           width=round(6 * s))
    font_big, font_small = _font(int(44 * s)), _font(int(22 * s))
    draw.text((84 * s, 80 * s), "QWEN BAKERY", font=font_big, fill=(150, 30, 30))
    draw.text((84 * s, 150 * s), "Fresh bread daily - open 7am to 9pm", font=font_small, fill=(30, 30, 30))
    draw.text((84 * s, 190 * s), "Tel. 555-0142  |  qwen.example", font=font_small, fill=(30, 70, 160))
    draw.rectangle([0, 1000 * s, 1024 * s, 1024 * s], fill=(24, 24, 30))
    draw.text((12 * s, 1002 * s), "Route 42 - Downtown - 1.5 km", font=_font(int(16 * s)), fill=(235, 235, 235))

    image = image.resize((side, side), Image.Resampling.LANCZOS)
    # Texture with a natural image's falloff (more energy at coarse scales than fine ones): seeded noise blurred at
    # five radii, the finest at 0.7 px with a standard deviation of one level, the coarsest at 36 px with four.
    rng = np.random.default_rng(20240607)
    texture = np.zeros((side, side), np.float32)
    for radius, sigma in ((0.7, 1.0), (1.5, 2.0), (4.0, 3.0), (12.0, 4.0), (36.0, 4.0)):
        layer = Image.fromarray(rng.normal(128, 40, (side, side)).clip(0, 255).astype(np.uint8), "L")
        layer = np.asarray(layer.filter(ImageFilter.GaussianBlur(radius)), np.float32) - 128.0
        texture += layer * (sigma / max(float(layer.std()), 1e-6))
    pixels = np.asarray(image, np.float32) + texture[..., None]
    return Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8), "RGB"), text_box


def noise_image(side: int = SIDE) -> Image.Image:
    """Uniform random pixels: the worst case for PNG, for scale only (generated images never look like this)."""
    return Image.fromarray(np.random.default_rng(7).integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled font (FreeType), no system fonts needed
    except (TypeError, OSError):
        return ImageFont.load_default()


# ------------------------------------------------------------------------------------------------------------------
# Timing helpers
# ------------------------------------------------------------------------------------------------------------------


def now_ms() -> float:
    return time.perf_counter_ns() / 1e6


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    # p90 by the nearest-rank method: with 30 samples, the 27th.
    p90 = ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]
    return {"median": statistics.median(ordered), "p90": p90, "min": ordered[0], "n": len(ordered)}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


# ------------------------------------------------------------------------------------------------------------------
# The two pipelines
# ------------------------------------------------------------------------------------------------------------------


class Pipelines:
    """The worker's path (its own functions and store) and the naive baseline, on the same image and server."""

    def __init__(self, info, image: Image.Image) -> None:
        import boto3

        from qwen_worker.config import BucketSettings, Secret
        from qwen_worker.media import encode_image
        from qwen_worker.pricing import cost_of
        from qwen_worker.profiles import DEFAULT_PROFILE, request_rules
        from qwen_worker.schema import parse_request
        from qwen_worker.storage import S3Store

        self.image = image
        self.encode_image, self.cost_of, self.parse_request = encode_image, cost_of, parse_request
        self.defaults = request_rules(DEFAULT_PROFILE)
        self.store = S3Store(
            BucketSettings(
                endpoint_url=info.endpoint_url,
                access_key_id=info.access_key,
                secret_access_key=Secret(info.secret_key),
                bucket=BUCKET,
                region=info.region,
                addressing_style="path",
                prefix="worker",
                url_ttl_seconds=604_800,
            )
        )
        # The naive client: botocore's defaults for everything but where to connect and with which keys.
        self.plain = boto3.client(
            "s3",
            endpoint_url=info.endpoint_url,
            aws_access_key_id=info.access_key,
            aws_secret_access_key=info.secret_key,
            region_name=info.region,
        )

    @staticmethod
    def request(fmt: str) -> dict:
        return {
            "prompt": "A bakery on a city street at dusk, warm light in the windows, a sign that reads QWEN BAKERY",
            "negative_prompt": "",
            "size": "1024*1024",
            "seed": 42,
            "num_inference_steps": 50,
            "true_cfg_scale": 4.0,
            "output_format": fmt,
        }

    def worker(self, fmt: str, job_id: str) -> tuple[dict[str, float], int, str]:
        raw = self.request(fmt)
        t0 = now_ms()
        request = self.parse_request(raw, self.defaults)
        t1 = now_ms()
        encoded = self.encode_image(self.image, request.output_format, getattr(request, "output_quality", None))
        t2 = now_ms()
        urls = self.store.store(job_id, [encoded])
        t3 = now_ms()
        body = json.dumps(self._response(urls[0], request, encoded.width, encoded.height))
        t4 = now_ms()
        assert body
        return _stages(t0, t1, t2, t3, t4), len(encoded.data), urls[0]

    def baseline(self, fmt: str, job_id: str) -> tuple[dict[str, float], int, str]:
        raw = self.request(fmt)
        t0 = now_ms()
        request = self.parse_request(raw, self.defaults)
        t1 = now_ms()
        buffer = io.BytesIO()
        self.image.save(buffer, PIL_FORMAT[fmt])  # Pillow's defaults
        data = buffer.getvalue()
        t2 = now_ms()
        key = f"baseline/{job_id}/0.{request.output_format.extension}"
        self.plain.put_object(Bucket=BUCKET, Key=key, Body=data, ContentType=request.output_format.mime_type)
        url = self.plain.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=604_800)
        t3 = now_ms()
        body = json.dumps(self._response(url, request, *self.image.size))
        t4 = now_ms()
        assert body
        return _stages(t0, t1, t2, t3, t4), len(data), url

    def _response(self, url: str, request, width: int, height: int) -> dict:
        # The shape of what Worker._run answers for one image (its fields, with stand-ins for the model's).
        mime = request.output_format.mime_type
        return {
            "image_url": url,
            "cost": self.cost_of([(width, height)], 0.02),
            "images": [{"url": url, "seed": request.seed, "width": width, "height": height, "content_type": mime}],
            "seed": request.seed,
            "width": width,
            "height": height,
            "num_inference_steps": request.num_inference_steps,
            "true_cfg_scale": request.true_cfg_scale,
            "safety_checker": "on",
            "timings": {"fetch_inputs": 0.0, "generate": 0.0, "encode_image": 0.0, "upload": 0.0},
            "model": {"id": "Qwen/Qwen-Image", "revision": "0" * 40},
        }


def _stages(t0: float, t1: float, t2: float, t3: float, t4: float) -> dict[str, float]:
    return {"validate": t1 - t0, "encode": t2 - t1, "store": t3 - t2, "respond": t4 - t3, "total": t4 - t0}


def run_pipelines(pipes: Pipelines, runs: int, warmup: int) -> dict:
    """Worker and baseline interleaved (alternating which goes first) so that load from other processes hits both."""
    samples = {fmt: {variant: {name: [] for name in (*STAGES, "total")} for variant in ("worker", "baseline")}
               for fmt in FORMATS}
    sizes: dict[str, dict[str, int]] = {fmt: {} for fmt in FORMATS}
    last_urls: dict[tuple[str, str], str] = {}
    for index in range(warmup + runs):
        for fmt in FORMATS:
            order = ("worker", "baseline") if index % 2 == 0 else ("baseline", "worker")
            for variant in order:
                job_id = f"bench-{fmt}-{index}"
                stages, size, url = getattr(pipes, variant)(fmt, job_id)
                sizes[fmt][variant] = size
                last_urls[(fmt, variant)] = url
                if index >= warmup:
                    for name, value in stages.items():
                        samples[fmt][variant][name].append(value)
    return {"samples": samples, "sizes": sizes, "last_urls": last_urls}


def verify(last_urls: dict[tuple[str, str], str], image: Image.Image) -> None:
    """Not timed: each last presigned URL serves an image of the right format, and PNG is lossless."""
    import requests

    for (fmt, variant), url in last_urls.items():
        response = requests.get(url, timeout=10)
        if response.status_code != 200:
            raise RuntimeError(f"{variant} {fmt}: GET of the presigned URL answered {response.status_code}")
        decoded = Image.open(io.BytesIO(response.content))
        if decoded.format != PIL_FORMAT[fmt] or decoded.size != image.size:
            raise RuntimeError(f"{variant} {fmt}: the URL served {decoded.format} {decoded.size}")
        if fmt == "png" and not np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(image)):
            raise RuntimeError(f"{variant} png: the stored PNG does not decode to the fixture")


# ------------------------------------------------------------------------------------------------------------------
# Encoder sweep
# ------------------------------------------------------------------------------------------------------------------


def sweep_configs() -> list[tuple[str, str, dict]]:
    configs: list[tuple[str, str, dict]] = []
    for level in range(10):
        configs.append(("png", f"compress_level={level}" + (" (Pillow default)" if level == 6 else ""),
                        {"compress_level": level}))
    # compress_type is zlib's strategy (Pillow's default for PNG is Z_FILTERED=1); 2 = Huffman only, 3 = RLE.
    configs.append(("png", "compress_level=1 compress_type=2 (Huffman only)",
                    {"compress_level": 1, "compress_type": 2}))
    configs.append(("png", "compress_level=1 compress_type=3 (RLE)", {"compress_level": 1, "compress_type": 3}))
    configs.append(("png", "optimize=True", {"optimize": True}))
    configs.append(("jpeg", "quality=75 4:2:0 (Pillow default)", {}))
    for quality in (85, 90, 95):
        for subsampling in ("4:2:0", "4:4:4"):
            configs.append(("jpeg", f"quality={quality} {subsampling}",
                            {"quality": quality, "subsampling": subsampling}))
    for subsampling in ("4:2:0", "4:4:4"):
        configs.append(("jpeg", f"quality=95 {subsampling} optimize=True",
                        {"quality": 95, "subsampling": subsampling, "optimize": True}))
    for quality in (80, 90):
        for method in (0, 2, 4, 6):
            label = f"quality={quality} method={method}" + (" (Pillow default)" if (quality, method) == (80, 4) else "")
            configs.append(("webp", label, {"quality": quality, "method": method}))
    return configs


def encode_once(image: Image.Image, fmt: str, options: dict) -> tuple[float, bytes]:
    buffer = io.BytesIO()
    t0 = now_ms()
    image.save(buffer, PIL_FORMAT[fmt], **options)
    return now_ms() - t0, buffer.getvalue()


def time_round_robin(image: Image.Image, configs: list[tuple[str, str, dict]], runs: int, budget_ms: float
                     ) -> list[tuple[list[float], bytes]]:
    """Encode every setting once per round, ``runs`` rounds, so that load from other processes spreads over all of
    them. A slow setting (one encode over budget_ms / runs) gets only as many rounds as fit budget_ms, at least 3."""
    first = [encode_once(image, fmt, options) for fmt, _, options in configs]  # warm-up, and the cost estimate
    caps = [max(3, min(runs, int(budget_ms // max(ms, 1e-3)))) for ms, _ in first]
    times: list[list[float]] = [[] for _ in configs]
    data = [blob for _, blob in first]
    for round_index in range(max(caps)):
        for index, (fmt, _, options) in enumerate(configs):
            if round_index < caps[index]:
                ms, data[index] = encode_once(image, fmt, options)
                times[index].append(ms)
    return list(zip(times, data, strict=True))


def run_sweep(image: Image.Image, text_box: tuple[int, int, int, int], runs: int) -> list[dict]:
    reference = np.asarray(image)
    left, top, right, bottom = text_box
    configs = sweep_configs()
    rows = []
    for (fmt, label, options), (times, data) in zip(
        configs, time_round_robin(image, configs, runs, 6000.0), strict=True
    ):
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        if fmt == "png" and not np.array_equal(decoded, reference):
            raise RuntimeError(f"png {label} did not decode to the fixture")
        rows.append({
            "fixture": "photo-like", "format": fmt, "settings": label, "options": options,
            "bytes": len(data), "bits_per_pixel": 8 * len(data) / (image.width * image.height),
            "encode_ms": summary(times),
            "psnr_db": _finite(psnr(reference, decoded)),  # None: lossless
            "psnr_text_db": _finite(psnr(reference[top:bottom, left:right], decoded[top:bottom, left:right])),
        })
    # Scale only: what uniform noise costs PNG (generated images never look like this).
    noise = noise_image()
    noise_configs = [("png", "compress_level=1", {"compress_level": 1}),
                     ("png", "compress_level=6 (Pillow default)", {"compress_level": 6})]
    for (fmt, label, options), (times, data) in zip(
        noise_configs, time_round_robin(noise, noise_configs, min(runs, 5), 3000.0), strict=True
    ):
        rows.append({"fixture": "noise", "format": fmt, "settings": label, "options": options, "bytes": len(data),
                     "bits_per_pixel": 8 * len(data) / (noise.width * noise.height), "encode_ms": summary(times),
                     "psnr_db": None, "psnr_text_db": None})
    return rows


def _finite(value: float) -> float | None:
    return None if math.isinf(value) else value


# ------------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------------


def environment() -> dict:
    import boto3
    import botocore
    import PIL
    from PIL import features

    from qwen_worker import media

    model = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass

    def version(feature: str) -> str | None:
        try:
            return features.version(feature) if features.check(feature) else None
        except ValueError:
            return None

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "zlib_ng": version("zlib_ng"),
        "libjpeg_turbo": version("libjpeg_turbo"),
        "libwebp": version("webp"),
        "numpy": np.__version__,
        "boto3": boto3.__version__,
        "botocore": botocore.__version__,
        "git_commit": commit,
        "worker_encoder_settings": {
            "PNG_COMPRESS_LEVEL": media.PNG_COMPRESS_LEVEL,
            "JPEG_QUALITY": media.JPEG_QUALITY,
            "JPEG_SUBSAMPLING": media.JPEG_SUBSAMPLING,
            "WEBP_QUALITY": media.WEBP_QUALITY,
            "WEBP_METHOD": media.WEBP_METHOD,
        },
    }


def stage_table(results: dict) -> str:
    labels = {
        "validate": "validate (parse_request)",
        "encode": "encode",
        "store": "store (put_object + presign)",
        "respond": "respond (dict + json.dumps)",
        "total": "TOTAL",
    }
    columns = [(fmt, variant) for fmt in FORMATS for variant in ("worker", "baseline")]
    header = ["ms: median / p90"] + [f"{fmt.upper()} {variant}" for fmt, variant in columns]
    rows = [header]
    for stage in (*STAGES, "total"):
        row = [labels[stage]]
        for fmt, variant in columns:
            s = results["stages"][fmt][variant][stage]
            row.append(f"{_ms(s['median'])} / {_ms(s['p90'])}")
        rows.append(row)
    rows.append(["bytes"] + [f"{results['sizes'][fmt][variant]:,}" for fmt, variant in columns])
    ratio_row = ["worker / baseline (total)"]
    for fmt in FORMATS:
        ratio_row += [f"{results['goals'][fmt]['ratio']:.2f}x", ""]
    rows.append(ratio_row)
    return _grid(rows)


def sweep_table(rows: list[dict]) -> str:
    table = [["format", "settings", "bytes", "bpp", "encode ms med / p90", "PSNR dB", "PSNR text dB"]]
    for row in rows:
        lossless = row["psnr_db"] is None
        name = row["format"] if row["fixture"] == "photo-like" else f"{row['format']} (noise)"
        table.append([
            name, row["settings"], f"{row['bytes']:,}", f"{row['bits_per_pixel']:.2f}",
            f"{_ms(row['encode_ms']['median'])} / {_ms(row['encode_ms']['p90'])}",
            "lossless" if lossless else f"{row['psnr_db']:.2f}",
            "lossless" if lossless else f"{row['psnr_text_db']:.2f}",
        ])
    return _grid(table, left=2)


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _grid(rows: list[list[str]], left: int = 1) -> str:
    """A Markdown table: the first ``left`` columns left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [cell.ljust(widths[i]) if i < left or index == 0 else cell.rjust(widths[i])
                 for i, cell in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
        if index == 0:
            lines.append("|" + "|".join(("-" * (w + 1) + ":") if i >= left else ("-" * (w + 2))
                                        for i, w in enumerate(widths)) + "|")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--runs", type=int, default=30, help="timed runs per format and variant (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    parser.add_argument("--sweep-n", type=int, default=7, help="encodes per sweep setting (default 7; slow ones fewer)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the encoder-settings sweep")
    parser.add_argument("--json", type=Path,
                        default=Path(tempfile.gettempdir()) / "qwen-bench" / "worker_overhead.json",
                        help="where to write the results as JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    import s3_server

    image, text_box = photo_like_fixture()
    env = environment()
    print(f"worker_overhead: {env['date_utc']}; {env['cpu_model']}, {env['cpus']} CPUs, load {env['load_average']}; "
          f"Python {env['python']}, Pillow {env['pillow']} (zlib-ng {env['zlib_ng']}, libjpeg-turbo "
          f"{env['libjpeg_turbo']}, libwebp {env['libwebp']}), boto3 {env['boto3']}", flush=True)
    print(f"worker encoder settings (media.py): {env['worker_encoder_settings']}", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="qwen-bench-s3-"))
    results: dict = {"environment": env, "runs": args.runs, "warmup": args.warmup,
                     "fixture": {"kind": "photo-like", "width": image.width, "height": image.height}}
    try:
        started = time.monotonic()
        try:
            info = s3_server.start(workdir, secret_key=secrets.token_hex(16), timeout=60)
        except s3_server.S3ServerError as err:
            print(f"worker_overhead: the local S3 server did not start (scripts/install_s3_server.sh installs it, "
                  f"as root): {err}", file=sys.stderr)
            return 2
        print(f"local S3 server (Swift + s3api) at {info.endpoint_url}, up in {time.monotonic() - started:.1f} s",
              flush=True)
        pipes = Pipelines(info, image)
        pipes.plain.create_bucket(Bucket=BUCKET)
        print(f"timing {args.runs} runs (+{args.warmup} warm-up) per format, worker and baseline interleaved ...",
              flush=True)
        raw = run_pipelines(pipes, args.runs, args.warmup)
        verify(raw["last_urls"], image)
    finally:
        s3_server.stop(workdir)
        shutil.rmtree(workdir, ignore_errors=True)

    results["stages"] = {fmt: {variant: {stage: summary(values) for stage, values in stages.items()}
                               for variant, stages in variants.items()} for fmt, variants in raw["samples"].items()}
    results["samples_ms"] = raw["samples"]
    results["sizes"] = raw["sizes"]
    results["goals"] = {}
    for fmt in FORMATS:
        worker = results["stages"][fmt]["worker"]["total"]["median"]
        baseline = results["stages"][fmt]["baseline"]["total"]["median"]
        results["goals"][fmt] = {"total_ms": worker, "baseline_ms": baseline, "ratio": worker / baseline,
                                 "meets_total": worker <= GOAL_TOTAL_MS, "meets_ratio": worker / baseline <= GOAL_RATIO}

    print()
    print(f"Worker vs baseline, 1024x1024 photo-like fixture, {args.runs} runs each (median / p90, ms):")
    print(stage_table(results))
    print("baseline = Pillow defaults (PNG zlib level 6, optimize off; JPEG quality 75 4:2:0; WebP quality 80 "
          "method 4) + a default-config boto3 client's put_object + presign; validate and respond are the same code.")
    for fmt in FORMATS:
        g = results["goals"][fmt]
        met_total, met_ratio = ("met" if g[key] else "NOT met" for key in ("meets_total", "meets_ratio"))
        print(f"goal {fmt}: total {g['total_ms']:.1f} ms (<= {GOAL_TOTAL_MS:.0f}: {met_total}), "
              f"{g['ratio']:.2f}x baseline (<= {GOAL_RATIO}: {met_ratio})")

    if not args.no_sweep:
        print(f"\nsweeping encoder settings ({args.sweep_n} encodes each, fewer for slow ones) ...", flush=True)
        results["sweep"] = run_sweep(image, text_box, args.sweep_n)
        print("Encoder settings on the same fixture (encode only; PSNR against the original, whole image and the "
              "sign's text box):")
        print(sweep_table(results["sweep"]))

    results["environment"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    busiest = max(env["load_average"][0], results["environment"]["load_average_end"][0])
    print(f"\nload average at start {env['load_average']}, at end {results['environment']['load_average_end']}")
    if busiest > 0.75 * (os.cpu_count() or 1) + 1:
        print("WARNING: other processes were busy on this machine; absolute times are inflated. Worker and baseline "
              "were interleaved, so their ratio holds better; rerun on a quiet machine for absolute numbers.")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, default=str, allow_nan=False))
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--fixture-only":  # write the fixture, for a look at it
        photo_like_fixture()[0].save(sys.argv[2])
        sys.exit(0)
    sys.exit(main())
