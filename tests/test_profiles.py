"""Per-model profiles: each model's card defaults unless the operator sets them, its size rules, and Qwen-Image-2512
served as the Qwen-Image it is (same class, same card, Apache-2.0)."""

from __future__ import annotations

import base64
import shutil

import pytest
from support.images import photo_like, to_bytes

from qwen_worker.app import build_worker
from qwen_worker.config import Settings
from qwen_worker.errors import ConfigError
from qwen_worker.profiles import PROFILES, check_license
from qwen_worker.schema import Task

EDIT_INPUT = "data:image/png;base64," + base64.b64encode(to_bytes(photo_like(64, 64))).decode()


def test_each_card_default_is_the_models_own():
    steps_cfg = {name: (p.default_steps, p.default_true_cfg_scale) for name, p in PROFILES.items()}
    assert steps_cfg == {
        "QwenImagePipeline": (50, 4.0),
        "QwenImageEditPipeline": (50, 4.0),
        "QwenImageEditPlusPipeline": (40, 4.0),
        "QwenImageLayeredPipeline": (50, 4.0),
        "QwenImage21Pipeline": (40, 1.0),
    }


def test_only_research_licences_need_acceptance():
    for profile in PROFILES.values():
        if profile.license.research_only:
            with pytest.raises(ConfigError, match="QWEN_IMAGE_ACCEPT_RESEARCH_LICENSE=true"):
                check_license(profile, "some/model", "QWEN_IMAGE_MODEL", accepted=False)
        check_license(profile, "some/model", "QWEN_IMAGE_MODEL", accepted=True)


@pytest.fixture(scope="module")
def edit_plus(tiny_models):
    # DEFAULT_STEPS and DEFAULT_TRUE_CFG_SCALE unset: the card's defaults apply.
    env = {"QWEN_IMAGE_MODEL": "none", "QWEN_IMAGE_EDIT_MODEL": str(tiny_models["qwen-image-edit-plus"])}
    return build_worker(Settings.from_env({**env, "SAFETY_CHECKER": "off"}))


def test_edit_plus_defaults_to_40_steps_in_a_dry_run(edit_plus):
    quote = edit_plus.handle({"id": "q", "input": {"prompt": "make it blue", "image": EDIT_INPUT, "dry_run": True}})
    assert (quote["num_inference_steps"], quote["true_cfg_scale"]) == (40, 4.0), quote


@pytest.mark.slow
def test_edit_plus_defaults_to_40_steps_in_a_result(edit_plus):
    counted: list[int] = []
    pipeline = edit_plus.runner.pipeline_for(Task.EDIT)
    handle = pipeline.pipeline.transformer.register_forward_hook(lambda *args: counted.append(1))
    try:
        job = {"prompt": "make it blue", "image": EDIT_INPUT, "size": "256*256", "true_cfg_scale": 1, "seed": 1}
        result = edit_plus.handle({"id": "r", "input": job})
    finally:
        handle.remove()
    assert result["num_inference_steps"] == 40 and result["model"]["license"] == "Apache-2.0", result
    assert len(counted) == 40  # the transformer really ran 40 steps (one pass each: no CFG asked)


def test_operator_steps_override_the_card(tiny_models):
    env = {"QWEN_IMAGE_MODEL": "none", "QWEN_IMAGE_EDIT_MODEL": str(tiny_models["qwen-image-edit-plus"])}
    worker = build_worker(Settings.from_env({**env, "SAFETY_CHECKER": "off", "DEFAULT_STEPS": "12"}))
    quote = worker.handle({"id": "q", "input": {"prompt": "make it blue", "image": EDIT_INPUT, "dry_run": True}})
    assert quote["num_inference_steps"] == 12


def test_background_transparent_fails_clearly_on_a_model_without_alpha(tiny_models):
    env = {"QWEN_IMAGE_MODEL": str(tiny_models["qwen-image"]), "SAFETY_CHECKER": "off"}
    worker = build_worker(Settings.from_env(env))
    error = worker.handle({"id": "t", "input": {"prompt": "a sticker", "background": "transparent"}})["error"]
    assert "background" in error and "alpha" in error and "Qwen-Image-2.1" in error, error


def test_qwen_image_2512_from_runpods_model_cache_loads_and_serves(tiny_models, tmp_path):
    """A 2512 snapshot (the tiny Qwen-Image folder in its place) is found by repo id and served with the card's
    defaults; its result names the model and its licence."""
    volume = tmp_path / "volume"
    repo = volume / "huggingface-cache" / "hub" / "models--Qwen--Qwen-Image-2512"
    shutil.copytree(tiny_models["qwen-image"], repo / "snapshots" / "rev2512")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("rev2512\n")
    env = {"QWEN_IMAGE_MODEL": "Qwen/Qwen-Image-2512", "RUNPOD_VOLUME_PATH": str(volume), "SAFETY_CHECKER": "off"}
    worker = build_worker(Settings.from_env(env))

    quote = worker.handle({"id": "q", "input": {"prompt": "a lantern", "dry_run": True}})
    assert (quote["num_inference_steps"], quote["true_cfg_scale"]) == (50, 4.0)
    result = worker.handle({"id": "r", "input": {"prompt": "a lantern", "size": "256*256", "num_inference_steps": 2}})
    assert result["model"] == {"id": "Qwen/Qwen-Image-2512", "revision": "rev2512", "license": "Apache-2.0"}, result
    assert (result["width"], result["height"]) == (256, 256)
