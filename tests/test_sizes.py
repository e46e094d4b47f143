"""The size rules in one place: the edit output size agrees with diffusers' own, and the output plan follows them."""

from __future__ import annotations

import pytest
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions as edit_dimensions
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions as edit_plus_dimensions

from qwen_worker.errors import ValidationError
from qwen_worker.sizes import (
    MAX_SIDE,
    MIN_SIDE,
    SIDE_MULTIPLE,
    check_dimensions,
    edit_output_size,
    in_range,
    nearest_allowed_side,
    plan_output,
)

# Every aspect from 1:4 to 4:1 that the worker renders without refusing, in small steps, plus odd input sizes.
INPUT_SIZES = [(1000, height) for height in range(250, 4001, 37)] + [(width, 1000) for width in range(250, 4001, 37)]
INPUT_SIZES += [(1, 1), (4096, 4096), (333, 777), (1920, 1080), (1080, 1920), (2048, 512)]


@pytest.mark.parametrize("width, height", INPUT_SIZES)
def test_edit_output_size_is_what_the_edit_pipelines_compute(width, height):
    ours = edit_output_size(width, height)
    if not in_range(*ours):
        pytest.skip("outside the size rules the worker's own rule applies")
    assert ours == edit_dimensions(1024 * 1024, width / height)[:2]
    assert ours == edit_plus_dimensions(1024 * 1024, width / height)


def test_the_comparison_covers_most_aspects():
    compared = sum(in_range(*edit_output_size(w, h)) for w, h in INPUT_SIZES)
    assert compared >= 0.8 * len(INPUT_SIZES)


def test_nearest_allowed_side_stays_in_range_and_on_the_grid():
    for side in range(1, 5000, 7):
        allowed = nearest_allowed_side(side)
        assert MIN_SIDE <= allowed <= MAX_SIDE and allowed % SIDE_MULTIPLE == 0
        check_dimensions(allowed, allowed, field="size")


def test_a_requested_size_is_rendered_and_delivered_as_is():
    plan = plan_output((1024, 768), (100, 100))
    assert (plan.width, plan.height, plan.delivered) == (1024, 768, (1024, 768))


def test_an_edit_follows_its_input_at_about_one_megapixel():
    plan = plan_output(None, (1920, 1080))
    assert (plan.width, plan.height) == plan.delivered == (1376, 768)


def test_match_input_size_renders_near_the_input_and_delivers_it_exactly():
    plan = plan_output(None, (1001, 777), match_input_size=True)
    assert (plan.width, plan.height, plan.delivered) == (1008, 784, (1001, 777))


@pytest.mark.parametrize(
    "banner, rendered",
    [((160, 35), (2048, 448)), ((4160, 870), (2048, 432)), ((35, 160), (448, 2048)), ((8000, 1000), (2048, 256))],
)
def test_a_banner_renders_at_its_aspect_at_the_largest_size_the_rules_allow(banner, rendered):
    plan = plan_output(None, banner)
    assert (plan.width, plan.height) == plan.delivered == rendered
    check_dimensions(plan.width, plan.height, field="image")
    assert abs(plan.width / plan.height - banner[0] / banner[1]) < 0.2


def test_every_aspect_up_to_8_to_1_renders_in_range_and_keeps_its_aspect():
    for height in range(125, 1001):
        plan = plan_output(None, (1000, height))
        check_dimensions(plan.width, plan.height, field="image")
        # both sides rounded to 32 (as diffusers does at ~1 MP) or the short one to 16 (banners)
        assert abs(plan.height / plan.width - height / 1000) <= 2 * SIDE_MULTIPLE / plan.width


def test_an_edit_past_8_to_1_is_refused_naming_the_field_and_the_supported_ratios():
    with pytest.raises(ValidationError, match=r"^Invalid parameter: images has an aspect ratio of 16.0:1 \(8000x500\)"):
        plan_output(None, (8000, 500), field="images")
    with pytest.raises(ValidationError, match="from 1:8 to 8:1"):
        plan_output(None, (100, 1000))
