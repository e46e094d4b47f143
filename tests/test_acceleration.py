"""Speed switches are equal to the reference where they must be, and honest where they trade quality."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from qwen_worker.app import build_worker
from qwen_worker.config import Settings
from qwen_worker.errors import ConfigError
from worker_api import decode_data_uri, open_image

JOB = {"prompt": "a lighthouse", "size": "256*256", "seed": 12}


def pixels(result: dict) -> np.ndarray:
    return np.asarray(open_image(decode_data_uri(result["image_url"])[1]), dtype=np.int16)


def run(tiny_models, jobs=(JOB,), **env: str) -> list[dict]:
    worker = build_worker(
        Settings.from_env({"QWEN_IMAGE_MODEL": str(tiny_models["qwen-image"]), "SAFETY_CHECKER": "off", "DEFAULT_STEPS": "4", **env})
    )
    return [worker.handle({"id": f"j{index}", "input": job}) for index, job in enumerate(jobs)]


@pytest.fixture(scope="module")
def reference(tiny_models):
    return pixels(run(tiny_models)[0])


def test_forcing_an_sdpa_kernel_gives_the_reference_image(tiny_models, reference):
    assert np.abs(pixels(run(tiny_models, ATTENTION_BACKEND="_native_math")[0]) - reference).max() <= 1


@pytest.mark.parametrize("backend", ["flash_hub", "_flash_3_hub", "sage_hub", "magic"])
def test_backends_that_download_kernels_or_do_not_exist_are_refused(backend):
    with pytest.raises(ConfigError, match="ATTENTION_BACKEND"):
        Settings.from_env({"ATTENTION_BACKEND": backend})


def test_a_backend_that_is_not_installed_stops_the_worker(tiny_models):
    with pytest.raises(ConfigError, match="ATTENTION_BACKEND=flash is not usable"):
        run(tiny_models, ATTENTION_BACKEND="flash")


@pytest.mark.parametrize("value", ["fbcache:abc", "lru", "fbcache:-1"])
def test_bad_step_cache_values_name_the_variable(value):
    with pytest.raises(ConfigError, match="STEP_CACHE"):
        Settings.from_env({"STEP_CACHE": value})


@pytest.mark.parametrize("cache", ["fbcache:0.5", "taylorseer:2"])
def test_step_cache_is_repeatable_and_really_skips_work(tiny_models, reference, cache):
    first, second = run(tiny_models, jobs=(JOB, JOB), STEP_CACHE=cache)
    assert np.array_equal(pixels(first), pixels(second))  # no cache state leaks from one job into the next
    assert not np.array_equal(pixels(first), reference)  # a trade-off: the image is not the reference one


@pytest.mark.slow
def test_regional_compilation_matches_the_reference_and_warms_up_at_start(tiny_models, reference, caplog):
    with caplog.at_level(logging.INFO, logger="qwen_worker"):
        compiled, other_size = run(
            tiny_models, jobs=(JOB, {**JOB, "size": "320*256"}), COMPILE="regional", COMPILE_WARMUP_SIZES="256*256"
        )
    assert np.abs(pixels(compiled) - reference).max() <= 1
    assert "warm-up 256x256 took" in caplog.text
    assert "size 320x256 was not warmed up" in caplog.text and "size 256x256 was not warmed up" not in caplog.text
    assert other_size["width"] == 320
