"""Qwen-Image-2.1 through runsync on the tiny 2.1 pipeline: text-to-image and edits (1-10 references) from one
model, its card defaults and 2K size rules, transparent output whose alpha survives encoding and storage, and the
research-licence gate."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
import synthetic_loras as lora_files
import torch
from PIL import Image
from support.images import photo_like, to_bytes
from support.responses import completed_output, decode_data_uri, open_image

from qwen_worker.app import StartupFailure, create_worker

LICENSE = "Qwen Research License"


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(to_bytes(image)).decode()


WIDE = data_uri(photo_like(120, 80))  # 3:2
TALL = data_uri(photo_like(80, 120, seed=2))  # 2:3


@pytest.fixture(scope="module")
def worker(tiny_models, start_worker):
    with start_worker(
        QWEN_IMAGE_MODEL=str(tiny_models["qwen-image-2.1"]),
        QWEN_IMAGE_ACCEPT_RESEARCH_LICENSE="true",
        SAFETY_CHECKER="off",
        DEFAULT_STEPS="",  # unset: the card's 40 steps apply; jobs below ask for 2 to stay quick
    ) as server:
        yield server


def test_text_to_image_carries_the_licence_and_is_flattened_without_background(worker):
    job = {"prompt": "a red kite", "size": "256*256", "seed": 3, "num_inference_steps": 2}
    output = completed_output(worker.runsync(job))
    mime, data = decode_data_uri(output["image_url"])
    image = open_image(data)
    assert (mime, image.mode, image.size) == ("image/png", "RGB", (256, 256))
    assert output["model"]["license"] == LICENSE
    assert output["true_cfg_scale"] == 1.0  # the card: no true CFG


def test_card_defaults_sizes_and_presets_in_a_dry_run(worker):
    quote = completed_output(worker.runsync({"prompt": "a kite", "dry_run": True}))
    assert (quote["num_inference_steps"], quote["true_cfg_scale"]) == (40, 1.0)
    assert (quote["width"], quote["height"]) == (1024, 1024)  # the pipeline's output_resolution
    wide = completed_output(worker.runsync({"prompt": "a kite", "aspect_ratio": "16:9", "dry_run": True}))
    assert (wide["width"], wide["height"]) == (2752, 1536)  # the 2.1 card's native 2K preset
    assert completed_output(worker.runsync({"prompt": "a kite", "size": "2752*1536", "dry_run": True}))["width"] == 2752
    body = worker.runsync({"prompt": "a kite", "size": "1040*1040"})
    assert body["status"] == "FAILED" and "multiple of 32" in body["error"], body


def test_true_cfg_only_with_a_negative_prompt_and_then_noted(worker):
    without = completed_output(worker.runsync({"prompt": "a kite", "true_cfg_scale": 4, "dry_run": True}))
    assert without["true_cfg_scale"] == 1.0 and "negative_prompt" in " ".join(without["notes"])
    negative = {"prompt": "a kite", "negative_prompt": "blurry", "true_cfg_scale": 4, "dry_run": True}
    with_negative = completed_output(worker.runsync(negative))
    assert with_negative["true_cfg_scale"] == 4.0 and "doubles the cost" in " ".join(with_negative["notes"])


@pytest.mark.slow
def test_edit_with_one_reference_follows_its_aspect(worker):
    job = {"prompt": "make it blue", "image": WIDE, "seed": 1, "num_inference_steps": 2}
    output = completed_output(worker.runsync(job))
    mime, data = decode_data_uri(output["image_url"])
    assert (mime, open_image(data).size) == ("image/jpeg", (1248, 832))
    assert output["model"]["license"] == LICENSE


@pytest.mark.slow
def test_edit_with_four_references_follows_the_last(worker):
    job = {"prompt": "all four at a table", "images": [WIDE, WIDE, WIDE, TALL], "seed": 1, "num_inference_steps": 2}
    output = completed_output(worker.runsync({**job, "size": "256*384"}))
    assert (output["width"], output["height"]) == (256, 384)
    quote = completed_output(worker.runsync({**job, "dry_run": True}))
    assert (quote["width"], quote["height"]) == (832, 1248)  # no size given: the last reference's 2:3
    body = worker.runsync({**job, "images": [WIDE] * 11})
    assert body["status"] == "FAILED" and "1 to 10" in body["error"], body


def png_chunks(data: bytes) -> dict[bytes, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks: dict[bytes, bytes] = {}
    offset = 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        chunks[kind] = chunks.get(kind, b"") + data[offset + 8 : offset + 8 + length]
        offset += 12 + length
    return chunks


def png_alpha(data: bytes) -> np.ndarray:
    """The alpha plane read from the PNG bytes themselves (IHDR colour type 6, 8 bits), not through Pillow."""
    chunks = png_chunks(data)
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 6), (depth, colour)  # 8-bit RGBA
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = width * 4
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for x in range(stride):
            left = line[x - 4] if x >= 4 else 0
            up, up_left = previous[x], previous[x - 4] if x >= 4 else 0
            if kind == 1:
                line[x] = (line[x] + left) & 255
            elif kind == 2:
                line[x] = (line[x] + up) & 255
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 255
            elif kind == 4:
                guess = left + up - up_left
                near = min((abs(guess - left), 0), (abs(guess - up), 1), (abs(guess - up_left), 2))[1]
                line[x] = (line[x] + (left, up, up_left)[near]) & 255
        rows.append(bytes(line))
        previous = line
    return np.frombuffer(b"".join(rows), np.uint8).reshape(height, width, 4)[..., 3]


def test_transparent_output_keeps_its_alpha_through_encoding_and_storage(worker):
    job = {"prompt": "a sticker", "size": "256*256", "seed": 5, "num_inference_steps": 2}
    transparent = completed_output(worker.runsync({**job, "background": "transparent"}))
    mime, data = decode_data_uri(transparent["image_url"])
    assert mime == "image/png" and transparent["images"][0]["content_type"] == "image/png"
    alpha = png_alpha(data)
    assert alpha.min() < 255  # the model's alpha, not an opaque plane
    rgba = open_image(data)
    assert rgba.mode == "RGBA" and np.array_equal(np.asarray(rgba)[..., 3], alpha)

    # Without background the same image comes flattened over white: exactly the transparent one composited.
    opaque = open_image(decode_data_uri(completed_output(worker.runsync(job))["image_url"])[1])
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba, mask=rgba.getchannel("A"))
    assert opaque.mode == "RGB" and np.array_equal(np.asarray(opaque), np.asarray(white))

    webp = completed_output(worker.runsync({**job, "background": "transparent", "output_format": "webp"}))
    mime, data = decode_data_uri(webp["image_url"])
    decoded = Image.open(io.BytesIO(data))
    assert mime == "image/webp" and decoded.mode == "RGBA"
    assert np.abs(np.asarray(decoded)[..., 3].astype(int) - alpha).max() <= 1  # lossless alpha plane

    body = worker.runsync({**job, "background": "transparent", "output_format": "jpeg"})
    assert body["status"] == "FAILED" and "jpeg" in body["error"] and "png or webp" in body["error"], body


def test_without_the_licence_variable_every_job_is_refused_naming_the_licence(tiny_models, start_worker):
    with start_worker(QWEN_IMAGE_MODEL=str(tiny_models["qwen-image-2.1"]), SAFETY_CHECKER="off") as server:
        for payload in ({"prompt": "a kite"}, {"prompt": "a kite", "dry_run": True}):
            body = server.runsync(payload)
            assert body["status"] == "FAILED", body
            for words in (LICENSE, "research and evaluation only", "QWEN_IMAGE_ACCEPT_RESEARCH_LICENSE=true"):
                assert words in body["error"], body["error"]


# ----------------------------------------------------------------------------------------------------- LoRAs


def qwen21_lora(transformer_folder, path, seed: int = 7):
    """A random LoRA (diffusers layout) on every projection of the tiny 2.1 transformer's single-stream blocks:
    attn.to_q/k/v/out.0 and the SwiGLU img_mlp.proj/gate_layer/out, the layers a 2.1 LoRA adapts."""
    from diffusers import QwenImage21Transformer2DModel

    transformer = QwenImage21Transformer2DModel.from_pretrained(str(transformer_folder))
    generator = torch.Generator().manual_seed(seed)
    pairs = {}
    for name, module in transformer.named_modules():
        if name.startswith("transformer_blocks.") and isinstance(module, torch.nn.Linear):
            out_features, in_features = module.weight.shape
            pairs[name] = (torch.randn(4, in_features, generator=generator) * 0.3,
                           torch.randn(out_features, 4, generator=generator) * 0.3)
    assert len(pairs) == 2 * 7  # two tiny blocks, seven projections each
    return lora_files.write_diffusers(path, pairs)


def test_a_user_lora_changes_the_image_and_leaves_no_trace(worker, tiny_models, tmp_path):
    # diffusers 0.42.1's QwenImage21Pipeline has QwenImageLoraLoaderMixin: the worker's per-job LoRAs apply to it.
    lora = qwen21_lora(tiny_models["qwen-image-2.1"] / "transformer", tmp_path / "qwen21-style.safetensors")
    job = {"prompt": "a red kite", "size": "256*256", "seed": 3, "num_inference_steps": 2}

    def image_bytes(payload):
        return decode_data_uri(completed_output(worker.runsync(payload))["image_url"])[1]

    plain = image_bytes(job)
    with_lora = image_bytes({**job, "loras": [{"path": str(lora), "scale": 1.0}]})
    assert with_lora != plain
    assert image_bytes(job) == plain  # the adapter was removed after its job

    # A LoRA made for another model (Qwen-Image's layer names at another width, as Qwen-Image's 3072 is to 2.1's
    # 4096) fails its job naming the entry; the next job is untouched.
    other = lora_files.write_diffusers(tmp_path / "qwen-image-style.safetensors", lora_files.shaped_pairs(48, 1))
    body = worker.runsync({**job, "loras": [{"path": str(other)}]})
    assert body["status"] == "FAILED" and "loras[0]" in body["error"] and "different model" in body["error"], body
    assert image_bytes(job) == plain


LIGHTNING_REFUSALS = [
    ({"LIGHTNING_LORA": "lightning-8step"}, ["LIGHTNING_LORA"]),
    ({"LIGHTNING_LORA_4STEP": "lightning-4step"}, ["LIGHTNING_LORA_4STEP"]),
    # 2.1 also serves the edits when no edit model is configured, so the edit Lightning files would be its too.
    ({"LIGHTNING_EDIT_LORA": "lightning-edit"}, ["LIGHTNING_EDIT_LORA"]),
]


@pytest.mark.parametrize(("files", "named"), LIGHTNING_REFUSALS, ids=[named[0] for _, named in LIGHTNING_REFUSALS])
def test_lightning_loras_stop_a_2_1_worker_from_starting(monkeypatch, tmp_path, tiny_models, files, named):
    for name in ("QWEN_IMAGE_EDIT_MODEL", "BUCKET_NAME", "LIGHTNING_LORA", "LIGHTNING_LORA_4STEP",
                 "LIGHTNING_EDIT_LORA", "LIGHTNING_EDIT_LORA_4STEP"):
        monkeypatch.delenv(name, raising=False)
    model = str(tiny_models["qwen-image-2.1"])
    env = {"QWEN_IMAGE_MODEL": model, "QWEN_IMAGE_ACCEPT_RESEARCH_LICENSE": "true", "SAFETY_CHECKER": "off",
           "RUNPOD_VOLUME_PATH": str(tmp_path / "volume")}
    for variable, stem in files.items():
        path = tmp_path / f"{stem}.safetensors"
        path.write_bytes(b"")  # the file exists: the refusal is about the model, not a missing file
        env[variable] = str(path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    worker = create_worker()
    assert isinstance(worker, StartupFailure)
    error = worker.handle({"id": "queued", "input": {"prompt": "a kite"}})["error"]
    assert error.startswith("The worker could not start: ")
    for words in (*named, f"QWEN_IMAGE_MODEL={model}", "Qwen-Image-2.1", "Qwen-Image-Lightning", "unset"):
        assert words in error, error


def test_fast_mode_is_refused_naming_the_model_not_a_variable(worker):
    body = worker.runsync({"prompt": "a kite", "size": "256*256", "go_fast": True})
    assert body["status"] == "FAILED", body
    assert "does not exist for Qwen-Image-2.1" in body["error"] and "LIGHTNING_LORA" not in body["error"], body
