"""The safety checker: the stock StableDiffusionSafetyChecker, loaded offline, one flag per image, images untouched."""

from __future__ import annotations

import logging
import shutil
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from support.images import photo_like
from support.safety_checkers import write_flag_everything_checker, write_sensitive_checker

from qwen_worker.errors import ConfigError
from qwen_worker.safety import SafetyChecker

CPU = torch.device("cpu")
DTYPE = torch.bfloat16  # the worker's dtype on a GPU; the tiny checker runs it on the CPU as well


def flagged_image(size: tuple[int, int] = (96, 64)) -> Image.Image:
    return photo_like(*size)


def clean_image(size: tuple[int, int] = (96, 64)) -> Image.Image:
    return Image.new("RGB", size, (30, 140, 220))


@pytest.fixture(scope="module")
def sensitive_folder(tiny_models, tmp_path_factory):
    dst = tmp_path_factory.mktemp("checkers") / "sensitive"
    return write_sensitive_checker(tiny_models["safety-checker"], dst, flagged=flagged_image(), clean=clean_image())


@pytest.fixture(scope="module")
def sensitive(sensitive_folder) -> SafetyChecker:
    return SafetyChecker.load(sensitive_folder, CPU, DTYPE)


def test_tiny_checker_loads_and_flags_nothing(tiny_models):
    checker = SafetyChecker.load(tiny_models["safety-checker"], CPU, DTYPE)
    assert next(checker.model.parameters()).dtype == DTYPE
    assert checker.parameter_bytes > 0
    images = [flagged_image(), clean_image(), photo_like(64, 64, seed=3), Image.new("RGB", (64, 64))]
    assert checker.check(images) == [False, False, False, False]


def test_sensitive_checker_flags_the_flagged_image_only(sensitive):
    assert sensitive.check([flagged_image()]) == [True]
    assert sensitive.check([clean_image()]) == [False]


def test_sensitive_checker_folder_is_deterministic(tiny_models, sensitive_folder, tmp_path):
    again = write_sensitive_checker(tiny_models["safety-checker"], tmp_path / "again", flagged_image(), clean_image())
    assert (again / "model.safetensors").read_bytes() == (sensitive_folder / "model.safetensors").read_bytes()


def test_mixed_batch_gives_one_flag_per_image_in_order(sensitive):
    assert sensitive.check([flagged_image(), clean_image()]) == [True, False]
    assert sensitive.check([clean_image(), clean_image(), flagged_image()]) == [False, False, True]


def test_flagged_images_are_left_untouched_and_no_black_image_warning(sensitive, caplog):
    images = [flagged_image(), clean_image()]
    before = [image.tobytes() for image in images]
    with caplog.at_level(logging.WARNING):
        assert sensitive.check(images) == [True, False]
    assert [image.tobytes() for image in images] == before
    assert "black image" not in caplog.text


def test_any_image_mode_and_size_is_checked(sensitive):
    images = [flagged_image((300, 200)).convert("RGBA"), clean_image((40, 90)).convert("L")]
    images.append(flagged_image().convert("P"))
    assert sensitive.check(images) == [True, False, True]


def test_empty_batch(sensitive):
    assert sensitive.check([]) == []


def test_flag_everything_checker(tiny_models, tmp_path):
    folder = write_flag_everything_checker(tiny_models["safety-checker"], tmp_path / "all")
    checker = SafetyChecker.load(folder, CPU, DTYPE)
    assert checker.check([flagged_image(), clean_image()]) == [True, True]


@pytest.mark.parametrize(
    ("missing", "named"),
    [
        ("config.json", "has no config.json"),
        ("model.safetensors", "has no weights (model.safetensors or pytorch_model.bin)"),
        ("preprocessor_config.json", "has no preprocessor_config.json"),
    ],
)
def test_incomplete_folder_is_a_config_error_naming_the_file_and_the_way_out(tiny_models, tmp_path, missing, named):
    folder = shutil.copytree(tiny_models["safety-checker"], tmp_path / "checker")
    (folder / missing).unlink()
    with pytest.raises(ConfigError) as caught:
        SafetyChecker.load(folder, CPU, DTYPE)
    message = str(caught.value)
    assert named in message and "SAFETY_CHECKER=off" in message


def test_missing_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"is not a folder.*SAFETY_CHECKER=off"):
        SafetyChecker.load(tmp_path / "nowhere", CPU, DTYPE)


def test_checkpoint_in_the_compvis_key_layout_loads_every_weight(sensitive_folder, tmp_path):
    # The CompVis repo was saved by transformers 4, whose CLIPVisionModel nested a second `vision_model`:
    # its keys read vision_model.vision_model.*, which transformers 5 maps onto the flattened model.
    folder = shutil.copytree(sensitive_folder, tmp_path / "compvis-layout")
    tensors = load_file(folder / "model.safetensors")
    legacy = {("vision_model." + k if k.startswith("vision_model.") else k): v for k, v in tensors.items()}
    assert any(k.startswith("vision_model.vision_model.") for k in legacy)
    save_file(legacy, folder / "model.safetensors", metadata={"format": "pt"})
    assert SafetyChecker.load(folder, CPU, DTYPE).check([flagged_image(), clean_image()]) == [True, False]


def test_weights_missing_a_tensor_are_refused_not_left_random(tiny_models, tmp_path):
    folder = shutil.copytree(tiny_models["safety-checker"], tmp_path / "checker")
    tensors = load_file(folder / "model.safetensors")
    del tensors["concept_embeds_weights"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"concept_embeds_weights.*SAFETY_CHECKER=off"):
        SafetyChecker.load(folder, CPU, DTYPE)


def test_check_time_at_1024(sensitive, capsys):
    """Measured for the docs, never asserted: the tiny checker's cost is mostly the CPU resize to its input size."""
    image = flagged_image((128, 128)).resize((1024, 1024))
    sensitive.check([image])  # warm-up
    timings = {}
    for n in (1, 4):
        started = time.perf_counter()
        flags = sensitive.check([image] * n)
        timings[n] = time.perf_counter() - started
        assert flags == [True] * n
    measured = ", ".join(f"{n} x 1024x1024 in {seconds * 1e3:.0f} ms" for n, seconds in timings.items())
    with capsys.disabled():
        print(f"\n[safety] tiny checker, {DTYPE}, CPU: {measured}")


def test_the_sides_of_a_wide_image_are_checked_not_only_its_centre(sensitive):
    """The stock preprocessor crops the centre square; flagged content at a side of a 16:9-like image must not pass."""
    side = clean_image().height
    wide = Image.new("RGB", (3 * side, side), clean_image().getpixel((0, 0)))
    wide.paste(flagged_image().resize((side, side)), (0, 0))  # flagged content in the left square only
    centre = wide.crop((side, 0, 2 * side, side))
    assert sensitive.check([centre]) == [False]  # what the stock centre crop alone would have seen
    assert sensitive.check([wide, Image.new("RGB", (3 * side, side), clean_image().getpixel((0, 0)))]) == [True, False]
    tall = wide.transpose(Image.Transpose.ROTATE_90)
    assert sensitive.check([tall]) == [True]
