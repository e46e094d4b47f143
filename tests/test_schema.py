"""Every input rule of the request schema, one behaviour per test."""

from __future__ import annotations

from dataclasses import replace

import pytest

from qwen_worker.errors import ValidationError
from qwen_worker.profiles import DEFAULT_PROFILE, request_rules
from qwen_worker.schema import Mode, OutputFormat, parse_request

URL = "https://example.invalid/photo.png"  # never fetched: parsing does no I/O


def parse(**fields):
    return parse_request(fields)


def error_of(**fields) -> str:
    with pytest.raises(ValidationError) as caught:
        parse_request(fields)
    return str(caught.value)


def test_runpod_t2i_example_parses_with_documented_defaults():
    request = parse(prompt="A cat", negative_prompt="", size="1328*1328", seed=-1, enable_safety_checker=True)
    assert request.mode is Mode.TEXT_TO_IMAGE
    assert (request.width, request.height) == (1328, 1328)
    assert 0 <= request.seed < 2**32
    assert request.output_format is OutputFormat.PNG
    assert request.enable_safety_checker is True


def test_defaults_when_only_prompt_given():
    rules = replace(request_rules(DEFAULT_PROFILE), num_inference_steps=7, true_cfg_scale=2.5)
    request = parse_request({"prompt": "A cat"}, rules)
    assert (request.width, request.height) == (1024, 1024)
    assert request.negative_prompt == ""
    assert (request.num_inference_steps, request.true_cfg_scale) == (7, 2.5)
    assert request.enable_safety_checker is True


def test_image_makes_an_edit_with_jpeg_default_and_size_from_input():
    request = parse(prompt="make it blue", image=URL)
    assert request.mode is Mode.EDIT
    assert request.image_urls == (URL,)
    assert request.output_format is OutputFormat.JPEG
    assert (request.width, request.height) == (None, None)


@pytest.mark.parametrize("value", ["png", "jpeg", "PNG", " jpeg "])
def test_output_format_accepts_png_and_jpeg(value):
    assert parse(prompt="p", image=URL, output_format=value).output_format.value == value.strip().lower()


@pytest.mark.parametrize("value", ["gif", "", 3, "jpg2"])
def test_output_format_rejects_others(value):
    assert "output_format" in error_of(prompt="p", image=URL, output_format=value)


@pytest.mark.parametrize("bad", ["1024x1024", "1024", "*1024", "a*b", "1024*", "1024*1024*3", "-512*512", "10.5*512"])
def test_malformed_size_uses_runpods_wording(bad):
    assert "size format must be width*height" in error_of(prompt="p", size=bad)


def test_size_must_be_a_string():
    assert "size format must be width*height" in error_of(prompt="p", size=1024)


@pytest.mark.parametrize(
    "size, rule",
    [
        ("240*512", "between 256 and 2048"),
        ("512*2064", "between 256 and 2048"),
        ("520*512", "multiple of 16"),
        ("512*1000", "multiple of 16"),
    ],
)
def test_size_range_and_multiple(size, rule):
    message = error_of(prompt="p", size=size)
    assert message.startswith("Invalid parameter: size") and rule in message


@pytest.mark.parametrize(
    "size, expected", [("256*256", (256, 256)), ("2048*2048", (2048, 2048)), (" 512 * 768 ", (512, 768))]
)
def test_size_boundaries_accepted(size, expected):
    request = parse(prompt="p", size=size)
    assert (request.width, request.height) == expected


@pytest.mark.parametrize("prompt", [None, "", "   "])
def test_prompt_required_and_non_empty(prompt):
    fields = {} if prompt is None else {"prompt": prompt}
    assert "prompt" in error_of(**fields)


def test_prompt_must_be_string():
    assert "prompt must be a string" in error_of(prompt=["a"])


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1])
def test_seed_range_accepted(seed):
    assert parse(prompt="p", seed=seed).seed == seed


@pytest.mark.parametrize("seed", [-2, 2**32, 10**30])
def test_seed_out_of_range(seed):
    assert "seed" in error_of(prompt="p", seed=seed)


def test_random_seeds_differ():
    seeds = {parse(prompt="p", seed=-1).seed for _ in range(5)}
    assert len(seeds) > 1


@pytest.mark.parametrize("value", ["12", 1.0, True, [1]])
def test_integers_are_strict(value):
    assert "seed must be an integer" in error_of(prompt="p", seed=value)


@pytest.mark.parametrize("value", ["yes", 0, 1, "true"])
def test_booleans_are_strict(value):
    assert "enable_safety_checker must be a boolean" in error_of(prompt="p", enable_safety_checker=value)


@pytest.mark.parametrize("value", [0.5, 20.5, float("nan"), float("inf"), "4", True])
def test_true_cfg_scale_range_and_type(value):
    assert "true_cfg_scale" in error_of(prompt="p", true_cfg_scale=value)


@pytest.mark.parametrize("value", [0, 101, 2.0])
def test_steps_range_and_type(value):
    assert "num_inference_steps" in error_of(prompt="p", num_inference_steps=value)


def test_unknown_fields_are_named_with_a_suggestion():
    message = error_of(prompt="p", sead=1, colour="red")
    assert "'sead'" in message and "did you mean 'seed'" in message and "'colour'" in message


def test_input_must_be_an_object():
    with pytest.raises(ValidationError, match="input must be a JSON object"):
        parse_request(["prompt"])


@pytest.mark.parametrize("image", ["", 5, ["a"]])
def test_image_must_be_a_non_empty_string(image):
    assert "image" in error_of(prompt="p", image=image)


def test_overlong_prompt_refused_with_limit():
    assert "at most 10000 characters" in error_of(prompt="x" * 10_001)
