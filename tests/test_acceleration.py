"""Speed switches are equal to the reference where they must be, and honest where they trade quality."""

from __future__ import annotations

import base64
import logging

import numpy as np
import pytest
from support.images import photo_like, to_bytes
from support.responses import decode_data_uri, open_image

from qwen_worker.config import Settings
from qwen_worker.errors import ConfigError

JOB = {"prompt": "a lighthouse", "size": "256*256", "seed": 12}


def pixels(result: dict) -> np.ndarray:
    return np.asarray(open_image(decode_data_uri(result["image_url"])[1]), dtype=np.int16)


def run(make_worker, jobs=(JOB,), **env: str) -> list[dict]:
    worker = make_worker(**{"SAFETY_CHECKER": "off", "DEFAULT_STEPS": "4", **env})
    return [worker.handle({"id": f"j{index}", "input": job}) for index, job in enumerate(jobs)]


@pytest.fixture(autouse=True)
def process_wide_attention_backend():
    """diffusers' set_attention_backend also sets a process-wide default backend; a worker built here with
    ATTENTION_BACKEND would otherwise change the attention kernel (and so the last bits of every image) of the
    in-process workers later tests build. Each test leaves the default as it found it."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


@pytest.fixture(scope="module")
def reference(make_worker):
    return pixels(run(make_worker)[0])


def test_forcing_an_sdpa_kernel_gives_the_reference_image(make_worker, reference):
    assert np.abs(pixels(run(make_worker, ATTENTION_BACKEND="_native_math")[0]) - reference).max() <= 1


@pytest.mark.parametrize("backend", ["flash_hub", "_flash_3_hub", "sage_hub", "magic"])
def test_backends_that_download_kernels_or_do_not_exist_are_refused(backend):
    with pytest.raises(ConfigError, match="ATTENTION_BACKEND"):
        Settings.from_env({"ATTENTION_BACKEND": backend})


def test_a_backend_that_is_not_installed_stops_the_worker(make_worker):
    with pytest.raises(ConfigError, match="ATTENTION_BACKEND=flash is not usable"):
        run(make_worker, ATTENTION_BACKEND="flash")


@pytest.mark.parametrize("value", ["fbcache:abc", "lru", "fbcache:-1"])
def test_bad_step_cache_values_name_the_variable(value):
    with pytest.raises(ConfigError, match="STEP_CACHE"):
        Settings.from_env({"STEP_CACHE": value})


@pytest.mark.parametrize("cache", ["fbcache:0.5", "taylorseer:2"])
def test_step_cache_is_repeatable_and_really_skips_work(make_worker, reference, cache):
    first, second = run(make_worker, jobs=(JOB, JOB), STEP_CACHE=cache)
    assert np.array_equal(pixels(first), pixels(second))  # no cache state leaks from one job into the next
    assert not np.array_equal(pixels(first), reference)  # a trade-off: the image is not the reference one


def data_uri(width: int, height: int, seed: int = 0) -> str:
    return "data:image/png;base64," + base64.b64encode(to_bytes(photo_like(width, height, seed), "PNG")).decode()


def graphs_compiled_by(worker, jobs: dict[str, dict]) -> dict[str, int]:
    """Per job (all must complete): the graphs dynamo compiled while it ran."""
    from torch._dynamo.utils import counters

    compiled = {}
    for name, job in jobs.items():
        before = counters["stats"]["unique_graphs"]
        output = worker.handle({"id": name, "input": job})
        assert "error" not in output, output
        compiled[name] = counters["stats"]["unique_graphs"] - before
    return compiled


@pytest.mark.slow
def test_regional_compilation_matches_the_reference_and_no_job_compiles_after_start(make_worker, reference, caplog):
    env = {"SAFETY_CHECKER": "off", "DEFAULT_STEPS": "4", "COMPILE": "regional", "COMPILE_WARMUP_SIZES": "256*256"}
    with caplog.at_level(logging.INFO, logger="qwen_worker"):
        worker = make_worker(**env, LORA_SLOT_RANK="0")
    # One size asked for: the warm-up adds a second length (half height), which compiles the dynamic graph.
    assert "warm-up 256x256 took" in caplog.text and "warm-up 256x128 took" in caplog.text
    compiled = graphs_compiled_by(worker, {"warmed": JOB, "other size": {**JOB, "size": "320*256"}})
    assert compiled == {"warmed": 0, "other size": 0}
    assert "was not warmed up" not in caplog.text
    assert np.abs(pixels(worker.handle({"id": "again", "input": JOB})) - reference).max() <= 1


@pytest.mark.slow
def test_a_compiled_edit_plus_endpoint_compiles_nothing_for_any_reference_count(make_worker, tiny_models, caplog):
    """Edit-Plus appends each reference's tokens to the image sequence, so the reference count is a shape of its
    own: the warm-up runs 2 references too, after which 1, 2 or 3 references of any aspect, at any size, reuse the
    graphs compiled at start-up. Without that call the first 2-reference job compiled a graph (issue 25)."""
    with caplog.at_level(logging.INFO, logger="qwen_worker"):
        worker = make_worker(
            QWEN_IMAGE_MODEL="none", QWEN_IMAGE_EDIT_MODEL=str(tiny_models["qwen-image-edit-plus"]),
            SAFETY_CHECKER="off", COMPILE="regional", COMPILE_WARMUP_SIZES="256*256", LORA_SLOT_RANK="0",
        )  # fmt: skip
    assert "warm-up 256x256 with 2 reference(s) of aspect 1 took" in caplog.text
    edit = {"prompt": "a cat", "size": "256*256"}
    compiled = graphs_compiled_by(worker, {
        "1 reference": {**edit, "image": data_uri(96, 96)},
        "2 references": {**edit, "images": [data_uri(96, 96), data_uri(96, 96, 1)]},
        "3 references": {**edit, "images": [data_uri(96, 96), data_uri(96, 96, 1), data_uri(96, 64, 2)]},
        "a 3:2 reference": {**edit, "image": data_uri(96, 64)},
        "another size": {**edit, "image": data_uri(96, 96), "size": "320*256"},
    })  # fmt: skip
    assert set(compiled.values()) == {0}, compiled


@pytest.fixture
def batched_calls(monkeypatch):
    """Counts the batched forwards really run, by wrapping the class the runner uses."""
    from qwen_worker import acceleration, runner

    counts = []

    class Counting(acceleration.BatchedTrueCFG):
        def __exit__(self, *exc):
            counts.append(self.batched_calls)
            return super().__exit__(*exc)

    monkeypatch.setattr(runner, "BatchedTrueCFG", Counting)
    return counts


def test_batched_cfg_gives_the_reference_images(make_worker, batched_calls):
    two = {**JOB, "num_images": 2, "negative_prompt": "blurry, low quality, watermark"}  # prompts of unequal length
    plain = run(make_worker, jobs=(two,))[0]
    batched = run(make_worker, jobs=(two,), BATCHED_CFG="true")[0]
    assert batched_calls == [4]  # one batched forward per step (DEFAULT_STEPS=4), instead of two
    for index in range(2):
        ours = np.asarray(open_image(decode_data_uri(batched["images"][index]["url"])[1]), np.int16)
        theirs = np.asarray(open_image(decode_data_uri(plain["images"][index]["url"])[1]), np.int16)
        assert np.abs(ours - theirs).max() <= 2  # padded, masked attention rounds differently in the last bits


def test_batched_cfg_is_skipped_without_true_cfg(make_worker, batched_calls):
    result = run(make_worker, jobs=({**JOB, "true_cfg_scale": 1},), BATCHED_CFG="true")[0]
    assert "image_url" in result and batched_calls == []


@pytest.mark.slow
def test_batched_cfg_on_an_edit_fills_the_pipelines_sliced_view(make_worker, tiny_models, batched_calls):
    import base64

    edit = {
        "prompt": "make it blue",
        "image": "data:image/png;base64," + base64.b64encode(to_bytes(photo_like(64, 64))).decode(),
        "seed": 3,
        "num_inference_steps": 2,
        "output_format": "png",
    }

    def edit_with(**env):
        worker = make_worker(
            QWEN_IMAGE_MODEL="none",
            QWEN_IMAGE_EDIT_MODEL=str(tiny_models["qwen-image-edit"]),
            SAFETY_CHECKER="off",
            **env,
        )
        return pixels(worker.handle({"id": "e", "input": edit}))

    assert np.abs(edit_with(BATCHED_CFG="true") - edit_with()).max() <= 2
    assert batched_calls == [2]


def test_batched_cfg_and_step_cache_are_refused_together():
    with pytest.raises(ConfigError, match="BATCHED_CFG"):
        Settings.from_env({"BATCHED_CFG": "true", "STEP_CACHE": "fbcache"})


def test_each_half_of_the_batched_pass_equals_its_own_pass(tiny_models):
    """At tensor level, where the tiny model's cond/uncond difference is far above the tolerance (pixels are not)."""
    import torch
    from diffusers import QwenImagePipeline

    from qwen_worker.acceleration import BatchedTrueCFG

    pipe = QwenImagePipeline.from_pretrained(tiny_models["qwen-image"], local_files_only=True, dtype=torch.float32)
    transformer = pipe.transformer
    calls = []
    original = transformer.forward
    transformer.forward = lambda **kwargs: calls.append(kwargs) or original(**kwargs)
    pipe(prompt="a long and detailed prompt about a lighthouse", negative_prompt=" ", true_cfg_scale=4.0,
         num_inference_steps=2, width=256, height=256, generator=torch.Generator().manual_seed(0), output_type="latent")
    del transformer.forward
    cond, uncond = calls[:2]  # a step of true CFG: the conditional pass, then the unconditional one
    assert cond["encoder_hidden_states"].shape[1] != uncond["encoder_hidden_states"].shape[1]  # padding is exercised

    with torch.inference_mode():
        separate = [transformer(**cond)[0], transformer(**uncond)[0]]
        with BatchedTrueCFG(transformer) as batching:
            first = transformer(**cond)[0]
            second = transformer(**uncond)[0]
    assert batching.batched_calls == 1
    tolerance = 1e-5
    assert (separate[0] - separate[1]).abs().max() > 100 * tolerance  # the halves are distinguishable
    assert torch.allclose(first, separate[0], atol=tolerance) and torch.allclose(second, separate[1], atol=tolerance)
