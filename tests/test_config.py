"""Environment parsing: defaults, bad values named, partial bucket configs refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen_worker.config import MAX_PRESIGN_TTL_SECONDS, VARIABLES, Settings
from qwen_worker.errors import ConfigError
from qwen_worker.profiles import PROFILES, request_rules

BUCKET = {
    "BUCKET_ENDPOINT_URL": "http://127.0.0.1:9",
    "BUCKET_ACCESS_KEY_ID": "test:tester",
    "BUCKET_SECRET_ACCESS_KEY": "s3cr3t-value",
    "BUCKET_NAME": "images",
}


def test_defaults():
    settings = Settings.from_env({})
    assert settings.t2i_model == "Qwen/Qwen-Image"
    assert settings.edit_model is None
    assert (settings.default_steps, settings.default_true_cfg_scale) == (None, None)  # unset: the model card's
    assert settings.accept_research_license is False
    assert settings.price_per_megapixel == 0.02
    assert settings.max_inline_bytes == 15_000_000
    assert settings.bucket is None and settings.local_output_dir is None
    assert settings.runpod_log_level == "INFO"
    assert settings.volume_path == Path("/runpod-volume")


def test_every_default_is_the_settings_field_default():
    """Defaults are written once, on the Settings fields; reading an empty environment must give exactly those."""
    assert Settings.from_env({}) == Settings()


def test_operator_defaults_override_every_models_card_defaults():
    settings = Settings.from_env({"DEFAULT_STEPS": "12", "DEFAULT_TRUE_CFG_SCALE": "2.5"})
    assert (settings.default_steps, settings.default_true_cfg_scale) == (12, 2.5)
    for profile in PROFILES.values():
        rules = request_rules(profile, settings.default_steps, settings.default_true_cfg_scale)
        assert (rules.num_inference_steps, rules.true_cfg_scale) == (12, 2.5), profile.pipeline_class
        card = request_rules(profile, Settings().default_steps, Settings().default_true_cfg_scale)
        assert card.num_inference_steps == profile.default_steps
        assert card.true_cfg_scale == profile.default_true_cfg_scale


def test_research_license_acceptance_is_read():
    assert Settings.from_env({"QWEN_IMAGE_ACCEPT_RESEARCH_LICENSE": "true"}).accept_research_license is True
    with pytest.raises(ConfigError, match="QWEN_IMAGE_ACCEPT_RESEARCH_LICENSE"):
        Settings.from_env({"QWEN_IMAGE_ACCEPT_RESEARCH_LICENSE": "maybe"})


def test_model_can_be_switched_off_but_not_both():
    settings = Settings.from_env({"QWEN_IMAGE_MODEL": "none", "QWEN_IMAGE_EDIT_MODEL": "Qwen/Qwen-Image-Edit"})
    assert settings.t2i_model is None and settings.edit_model == "Qwen/Qwen-Image-Edit"
    with pytest.raises(ConfigError, match="serve nothing"):
        Settings.from_env({"QWEN_IMAGE_MODEL": "none"})


@pytest.mark.parametrize(
    "name, value",
    [("DEFAULT_STEPS", "abc"), ("DEFAULT_STEPS", "0"), ("DEFAULT_TRUE_CFG_SCALE", "nan"), ("REQUIRE_CUDA", "maybe"),
     ("IMAGE_URL_TTL_SECONDS", str(MAX_PRESIGN_TTL_SECONDS + 1)), ("RUNPOD_LOG_LEVEL", "LOUD"),
     ("COMPILE_WARMUP_SIZES", "1024x1024"), ("COMPILE_WARMUP_SIZES", "1000*1000")],
)
def test_bad_values_name_the_variable(name, value):
    env = dict(BUCKET) if name == "IMAGE_URL_TTL_SECONDS" else {}
    env[name] = value
    with pytest.raises(ConfigError, match=name):
        Settings.from_env(env)


def test_no_checker_model_means_the_policy_defaults_to_off():
    """An image built with SAFETY_CHECKER_MODEL=none carries it in its ENV and must start with no other setting."""
    assert Settings.from_env({}).safety_checker == "on"
    settings = Settings.from_env({"SAFETY_CHECKER_MODEL": "none"})
    assert settings.safety_checker == "off"
    assert Settings.from_env({"SAFETY_CHECKER_MODEL": "None", "SAFETY_CHECKER": "off"}).safety_checker == "off"
    for policy in ("on", "always"):
        with pytest.raises(ConfigError, match=f"SAFETY_CHECKER={policy} needs a safety checker"):
            Settings.from_env({"SAFETY_CHECKER_MODEL": "none", "SAFETY_CHECKER": policy})
    other = Settings.from_env({"SAFETY_CHECKER_MODEL": "Org/other-checker"})
    assert (other.safety_checker, other.safety_checker_model) == ("on", "Org/other-checker")


def test_partial_bucket_configuration_names_what_is_missing():
    env = dict(BUCKET)
    del env["BUCKET_NAME"]
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert "BUCKET_NAME" in str(caught.value) and "missing" in str(caught.value)
    assert "s3cr3t-value" not in str(caught.value)


def test_full_bucket_configuration_and_secret_hidden_from_repr():
    settings = Settings.from_env({**BUCKET, "BUCKET_PREFIX": "/qwen/"})
    assert settings.bucket is not None
    assert settings.bucket.url_ttl_seconds == MAX_PRESIGN_TTL_SECONDS
    assert settings.bucket.prefix == "qwen"
    assert settings.bucket.addressing_style == "path"
    assert "s3cr3t-value" not in repr(settings)


@pytest.mark.parametrize(
    "endpoint, region",
    [
        ("https://s3.eu-west-2.amazonaws.com", "eu-west-2"),
        ("https://s3.us-west-004.backblazeb2.com", "us-west-004"),
        ("https://abc123.r2.cloudflarestorage.com", "auto"),
        ("http://127.0.0.1:8080", "us-east-1"),
    ],
)
def test_region_derived_from_endpoint(endpoint, region):
    settings = Settings.from_env({**BUCKET, "BUCKET_ENDPOINT_URL": endpoint})
    assert settings.bucket.region == region


def test_baked_cache_follows_huggingface_variables():
    assert Settings.from_env({"HF_HOME": "/models/hf"}).hf_hub_cache == Path("/models/hf/hub")
    assert Settings.from_env({"HF_HOME": "/x", "HF_HUB_CACHE": "/y"}).hf_hub_cache == Path("/y")


# ------------------------------------------------ forgiving where Runpod is loose (Hub presets deliver JSON as text)


@pytest.mark.parametrize("text", ["50", "50.0", " 50 ", "\t50.0\n", "5e1", "50.000"])
def test_an_integer_takes_an_integral_number_and_surrounding_spaces(text):
    assert Settings.from_env({"DEFAULT_STEPS": text}).default_steps == 50
    assert Settings.from_env({"LORA_SLOT_RANK": text}).lora_slot_rank == 50


@pytest.mark.parametrize("text", ["50.5", "1e400", "inf", "nan", "fifty", "50,0", "0x32"])
def test_an_integer_refuses_a_fraction_or_a_word_naming_the_variable(text):
    with pytest.raises(ConfigError, match=rf"^DEFAULT_STEPS must be an integer, got {text!r}"):
        Settings.from_env({"DEFAULT_STEPS": text})


def test_an_integral_number_out_of_range_says_the_range():
    with pytest.raises(ConfigError, match="DEFAULT_STEPS must be between 1 and 100, got 500"):
        Settings.from_env({"DEFAULT_STEPS": "500.0"})


@pytest.mark.parametrize("text", ["true", "True", "TRUE", "1", "yes", "Yes", "on", "ON", " true "])
def test_a_boolean_takes_true_in_any_documented_spelling(text):
    assert Settings.from_env({"SAFETY_CHECK_INPUTS": text}).safety_check_inputs is True
    assert Settings.from_env({"QWEN_IMAGE_ACCEPT_RESEARCH_LICENSE": text}).accept_research_license is True


@pytest.mark.parametrize("text", ["false", "False", "FALSE", "0", "no", "NO", "off", "Off", " false "])
def test_a_boolean_takes_false_in_any_documented_spelling(text):
    assert Settings.from_env({"SHARE_COMPONENTS": text}).share_components is False  # default true
    assert Settings.from_env({"REQUIRE_CUDA": text}).require_cuda is False


@pytest.mark.parametrize("text", ["maybe", "2", "1.0", "y", "enabled"])
def test_a_boolean_refuses_anything_else_naming_the_variable(text):
    with pytest.raises(ConfigError, match=rf"^SHARE_COMPONENTS must be true or false \(.*\), got {text!r}"):
        Settings.from_env({"SHARE_COMPONENTS": text})


def test_an_empty_value_means_unset_whatever_the_type():
    """A Hub input left empty arrives as an empty string: every variable then takes its default (a boolean whose
    default is true stays true; a model variable set empty switches its pipeline off, as `none` does)."""
    empty = {var.name: "  " for var in VARIABLES if var.read_by == "worker" and var.kind != "model"}
    assert Settings.from_env(empty) == Settings()
    assert Settings.from_env({"SHARE_COMPONENTS": ""}).share_components is True


def test_numbers_and_choices_are_read_loosely_but_exactly():
    settings = Settings.from_env(
        {"DEFAULT_TRUE_CFG_SCALE": " 2.5 ", "PRICE_PER_MEGAPIXEL": "1", "RUNPOD_LOG_LEVEL": " debug ",
         "TRANSFORMER_QUANT": "INT8", "UPLOAD_FALLBACK": "Inline"}
    )
    assert (settings.default_true_cfg_scale, settings.price_per_megapixel) == (2.5, 1.0)
    assert (settings.runpod_log_level, settings.acceleration.quant, settings.upload_fallback_inline) == (
        "DEBUG", "int8", True)


def test_every_row_refuses_garbage_naming_itself():
    """Every typed row refuses a value of the wrong type with its own name in the message."""
    garbage = {"boolean": "maybe", "integer": "12.5", "number": "twelve", "choice": "nonsense", "sizes": "big",
               "step_cache": "warp"}
    for var in VARIABLES:
        if var.read_by == "worker" and var.kind in garbage:
            with pytest.raises(ConfigError, match=rf"^{var.name}\b"):
                var.parse(garbage[var.kind])
