"""The other hosts' dialects: size forms, aliases, switches, LoRAs and fast mode, as one schema."""

from __future__ import annotations

import pytest

from qwen_worker.errors import ValidationError
from qwen_worker.schema import FastMode, LoraRequest, OutputFormat, parse_request

URL = "https://example.invalid/photo.png"  # never fetched: parsing does no I/O


def parse(**fields):
    return parse_request({"prompt": "p", **fields})


def error_of(**fields) -> str:
    with pytest.raises(ValidationError) as caught:
        parse_request({"prompt": "p", **fields})
    return str(caught.value)


@pytest.mark.parametrize(
    "fields, size",
    [
        ({"size": "512*768"}, (512, 768)),
        ({"width": 640, "height": 384}, (640, 384)),
        ({"aspect_ratio": "16:9"}, (1664, 928)),
        ({"aspect_ratio": "2:3"}, (1056, 1584)),
        ({"image_size": "square_hd"}, (1024, 1024)),
        ({"image_size": "portrait_16_9"}, (576, 1024)),
        ({"image_size": "landscape_4_3"}, (1024, 768)),
        ({"image_size": {"width": 768, "height": 512}}, (768, 512)),
        ({"image_size": "optimize_for_quality"}, (1328, 1328)),
        ({"image_size": "optimize_for_quality", "aspect_ratio": "4:3"}, (1472, 1104)),
        ({"image_size": "optimize_for_speed"}, (1024, 1024)),
        ({"image_size": "optimize_for_speed", "aspect_ratio": "16:9"}, (1360, 768)),
    ],
)
def test_size_forms(fields, size):
    request = parse(**fields)
    assert (request.width, request.height) == size
    assert request.width % 16 == 0 and request.height % 16 == 0


@pytest.mark.parametrize(
    "fields",
    [
        {"size": "512*512", "width": 512, "height": 512},
        {"size": "512*512", "aspect_ratio": "1:1"},
        {"aspect_ratio": "1:1", "image_size": "square"},
        {"width": 512, "height": 512, "image_size": {"width": 512, "height": 512}},
    ],
)
def test_two_size_forms_are_refused(fields):
    assert "give the size in one form only" in error_of(**fields)


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"width": 512}, "height is required"),
        ({"width": 500, "height": 512}, "multiple of 16"),
        ({"aspect_ratio": "21:9"}, "aspect_ratio must be one of"),
        ({"image_size": "huge"}, "image_size must be one of"),
        ({"image_size": {"width": 512}}, "image_size as an object"),
        ({"image_size": {"width": "512", "height": 512}}, "image_size.width must be an integer"),
    ],
)
def test_size_form_errors_name_the_field(fields, words):
    assert words in error_of(**fields)


@pytest.mark.parametrize("name", ["true_cfg_scale", "guidance", "guidance_scale"])
def test_cfg_aliases_agree(name):
    assert parse(**{name: 2.5}).true_cfg_scale == 2.5


def test_aliases_that_disagree_are_refused():
    assert "contradicts" in error_of(guidance=2, guidance_scale=3)
    assert parse(guidance=2, guidance_scale=2.0).true_cfg_scale == 2.0
    assert "contradicts" in error_of(num_images=2, n=3)
    assert parse(n=3).num_images == 3


def test_num_images_and_consecutive_seeds_wrap_at_2_32():
    request = parse(num_images=3, seed=2**32 - 2)
    assert request.seeds == [2**32 - 2, 2**32 - 1, 0]
    assert "between 1 and 4" in error_of(num_images=5)


@pytest.mark.parametrize(
    "value, expected", [("jpg", OutputFormat.JPEG), ("webp", OutputFormat.WEBP), ("PNG", OutputFormat.PNG)]
)
def test_output_formats(value, expected):
    assert parse(output_format=value).output_format is expected


def test_output_quality_range_and_png_refusal():
    assert parse(output_format="webp", output_quality=70).output_quality == 70
    assert "between 1 and 100" in error_of(output_format="jpeg", output_quality=0)
    assert "png is lossless" in error_of(output_quality=80)


def test_safety_checker_switches():
    assert parse(disable_safety_checker=True).enable_safety_checker is False
    assert parse(disable_safety_checker=False, enable_safety_checker=True).enable_safety_checker is True
    assert "contradicts" in error_of(disable_safety_checker=True, enable_safety_checker=True)


def test_watermark_only_false():
    assert parse(watermark=False).prompt == "p"
    assert "not supported" in error_of(watermark=True)


def test_enhance_prompt_and_prompt_extend():
    assert parse(enhance_prompt=True).effective_prompt == "p, Ultra HD, 4K, cinematic composition."
    chinese = parse_request({"prompt": "一只猫坐在窗台上", "prompt_extend": True})
    assert chinese.effective_prompt == "一只猫坐在窗台上, 超清，4K，电影级构图."
    assert parse(enhance_prompt=False).effective_prompt == "p"


def test_fast_mode_forms_and_forced_schedule():
    assert parse(go_fast=True).fast_mode is FastMode.REGULAR
    assert parse(acceleration="high").fast_mode is FastMode.HIGH
    assert parse(acceleration="none").fast_mode is FastMode.NONE
    request = parse(go_fast=True, num_inference_steps=50, guidance=4)
    assert (request.num_inference_steps, request.true_cfg_scale) == (8, 1.0)
    assert any("num_inference_steps 50 ignored" in note for note in request.notes)
    assert "contradicts" in error_of(go_fast=False, acceleration="high")
    assert "acceleration must be one of" in error_of(acceleration="turbo")


def test_loras_and_replicate_single_lora():
    request = parse(loras=[{"path": "https://h/a.safetensors", "scale": 0.8}, {"path": "style.safetensors"}])
    assert request.loras == (LoraRequest("https://h/a.safetensors", 0.8), LoraRequest("style.safetensors", 1.0))
    assert parse(lora_weights="x.safetensors", lora_scale=0.5).loras == (LoraRequest("x.safetensors", 0.5),)
    assert "at most 3" in error_of(loras=[{"path": "a"}] * 4)
    assert "loras[0].scale must be between -4 and 4" in error_of(loras=[{"path": "a", "scale": 9}])
    assert "loras[1] must be an object" in error_of(loras=[{"path": "a"}, "b"])
    assert "cannot be combined" in error_of(loras=[], lora_weights="a")
    assert "needs lora_weights" in error_of(lora_scale=1)


def test_multi_image_edit_and_match_input_size():
    request = parse(images=[URL, URL + "?2"], match_input_size=True)
    assert request.image_urls == (URL, URL + "?2") and request.match_input_size
    assert "1 to 3" in error_of(images=[URL] * 4)
    assert "images[1] must be a non-empty string" in error_of(images=[URL, 3])
    assert "cannot be combined with image" in error_of(image=URL, images=[URL])
    assert "applies only to edits" in error_of(match_input_size=True)
    assert "explicit size" in error_of(image=URL, match_input_size=True, size="512*512")


def test_dry_run_and_sync_mode_flags():
    request = parse(dry_run=True, sync_mode=True)
    assert request.dry_run and request.sync_mode


def test_huge_integers_are_refused_without_echoing_them():
    message = error_of(seed=10**5000)
    assert "seed" in message and len(message) < 200
