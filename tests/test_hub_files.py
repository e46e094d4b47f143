""".runpod/hub.json and .runpod/tests.json against the one table of settings (config.VARIABLES): every key a variable
the worker reads, every value, preset and default one the worker parses to what the table means, every range the
table's. A Hub input may not pre-fill what the table leaves unset (DEFAULT_STEPS: unset means each model's card)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qwen_worker.config import VARIABLES_BY_NAME, Settings, Variable
from qwen_worker.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def load(name: str) -> dict[str, Any]:
    return json.loads((ROOT / ".runpod" / name).read_text())


HUB = load("hub.json")
TESTS = load("tests.json")
HUB_ENV = {entry["key"]: entry for entry in HUB["config"]["env"]}

# The Hub input types that may fill a variable of each kind (the publishing guide's string, huggingface, number and
# boolean inputs; a string input with "options" for a choice). Text always reaches the worker, so a string input
# suits every kind; a number input only a number, a boolean input only a boolean.
INPUT_TYPES = {
    "model": {"huggingface", "string"},
    "text": {"string"},
    "path": {"string"},
    "sizes": {"string"},
    "step_cache": {"string"},
    "choice": {"string"},
    "boolean": {"boolean", "string"},
    "integer": {"number", "string"},
    "number": {"number", "string"},
}


def env_text(value: Any) -> str:
    """A JSON value as it reaches the worker's environment: Hub presets may carry JSON numbers and booleans."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def variable(key: str) -> Variable:
    assert key in VARIABLES_BY_NAME, f"{key} is not a variable of config.VARIABLES"
    var = VARIABLES_BY_NAME[key]
    assert var.read_by == "worker", f"{key} is not read by the worker"
    return var


def parsed(var: Variable, value: Any) -> Any:
    try:
        return var.parse(env_text(value))
    except ConfigError as err:
        pytest.fail(f"{var.name}={value!r} would stop the worker: {err}")


@pytest.mark.parametrize("key", sorted(HUB_ENV))
def test_hub_env_entry_matches_the_table(key):
    var = variable(key)
    entry = HUB_ENV[key]
    assert ("value" in entry) != ("input" in entry), f"{key}: a static value or an input, not both"
    if "value" in entry:
        parsed(var, entry["value"])
        return
    spec = entry["input"]
    assert spec["type"] in INPUT_TYPES[var.kind], f"{key}: a {var.kind} variable cannot be a {spec['type']} input"
    if "default" in spec:
        # The default is what the worker runs with: the table's (a drift, e.g. DEFAULT_STEPS=50 overriding each
        # model card's steps, fails here).
        assert parsed(var, spec["default"]) == var.default, f"{key}: the Hub's default differs from config.py's"
    if spec["type"] == "number":
        assert (spec.get("min"), spec.get("max")) == (var.low, var.high), f"{key}: range differs from config.py's"
    if spec["type"] == "boolean":
        assert parsed(var, spec.get("trueValue", True)) is True and parsed(var, spec.get("falseValue", False)) is False
    if "options" in spec:
        values = [option["value"] for option in spec["options"]]
        assert [parsed(var, value) for value in values] == values, f"{key}: an option the worker does not accept"
        assert var.kind != "choice" or set(values) == set(var.choices), f"{key}: options differ from the choices"


def test_card_defaults_stay_unset_on_the_hub():
    """Unset steps and CFG mean each model's card (50 steps for Qwen-Image, 40 for Edit-Plus and 2.1): the Hub must
    not pre-fill them, nor may a preset or the Hub's tests."""
    for key in ("DEFAULT_STEPS", "DEFAULT_TRUE_CFG_SCALE"):
        assert VARIABLES_BY_NAME[key].default is None
        assert "default" not in HUB_ENV[key].get("input", {}) and "value" not in HUB_ENV[key], key
        for preset in HUB["config"]["presets"]:
            assert key not in preset["defaults"], preset["name"]


@pytest.mark.parametrize("preset", HUB["config"]["presets"], ids=lambda preset: preset["name"])
def test_preset_values_are_variables_of_hub_env_that_the_worker_parses(preset):
    for key, value in preset["defaults"].items():
        assert key in HUB_ENV, f"preset {preset['name']!r} sets {key}, which is not in hub.json's env"
        parsed(variable(key), value)


def test_tests_json_env_is_variables_the_worker_parses():
    for entry in TESTS["config"].get("env", []):
        assert set(entry) == {"key", "value"}, entry
        parsed(variable(entry["key"]), entry["value"])


def test_the_check_is_not_vacuous():
    """A pre-filled card default or an unknown key must fail the checks above."""
    steps = VARIABLES_BY_NAME["DEFAULT_STEPS"]
    assert parsed(steps, 50) != steps.default
    assert "NOT_A_SETTING" not in VARIABLES_BY_NAME


# ---------------------------------------------------------------- Runpod's documented schema (copied facts, sourced)

# runpod/docs hub/publishing-guide.mdx: hub.json's and tests.json's fields, their types and which are required.
HUB_FIELDS = {"title": str, "description": str, "type": str, "category": str, "iconUrl": str, "config": dict}
HUB_REQUIRED = {"title", "description", "type", "category", "config"}
CATEGORIES = {"audio", "embedding", "language", "video", "image"}
CONFIG_FIELDS = {
    "runsOn": str, "containerDiskInGb": int, "cpuFlavor": str, "gpuCount": int, "gpuIds": str,
    "allowedCudaVersions": list, "env": list, "presets": list,
}
INPUT_FIELDS = {
    "type": str, "name": str, "description": str, "default": (str, int, float, bool), "advanced": bool,
    "min": (int, float), "max": (int, float), "options": list, "trueValue": str, "falseValue": str,
}
TEST_FIELDS = {"name": str, "input": dict, "timeout": int}
TEST_CONFIG_FIELDS = {"gpuTypeId": str, "gpuCount": int, "cpuFlavor": str, "env": list, "allowedCudaVersions": list}
# runpod/docs api-reference/openapi.json (allowedCudaVersions' enum, POST /pods and /endpoints): nothing past 13.0 at
# the time of writing. The image's torch 2.13.0 wheel is a CUDA 13.0 build (driver >= 580), so only "13.0" serves.
RUNPOD_CUDA_VERSIONS = {"11.8", *(f"12.{minor}" for minor in range(10)), "13.0"}
IMAGE_CUDA_VERSIONS = {"13.0"}
# runpod/docs references/gpu-types.mdx, "GPU pools": pool id -> memory (GB).
GPU_POOLS = {
    "AMPERE_16": 16, "AMPERE_24": 24, "ADA_24": 24, "AMPERE_48": 48, "ADA_48_PRO": 48, "AMPERE_80": 80,
    "ADA_80_PRO": 80, "HOPPER_141": 141,
}
# The same page, "GPU types": the ids tests.json's gpuTypeId may name (those this worker could run on) -> memory (GB).
GPU_TYPES = {
    "NVIDIA A100 80GB PCIe": 80, "NVIDIA A100-SXM4-80GB": 80, "NVIDIA H100 80GB HBM3": 80, "NVIDIA H100 NVL": 94,
    "NVIDIA H100 PCIe": 80, "NVIDIA H200": 141, "NVIDIA B200": 180, "NVIDIA L40S": 48,
    "NVIDIA RTX 6000 Ada Generation": 48, "NVIDIA A40": 48, "NVIDIA RTX A6000": 48, "NVIDIA GeForce RTX 4090": 24,
    "NVIDIA GeForce RTX 5090": 32,
}


def fields_ok(where: str, obj: Any, fields: dict[str, Any], required: set[str] = frozenset()) -> None:
    assert isinstance(obj, dict), f"{where} must be an object"
    assert required <= obj.keys(), f"{where} lacks {sorted(required - obj.keys())}"
    for key, value in obj.items():
        assert key in fields, f"{where}.{key} is not a field Runpod documents (a typo?)"
        kinds = fields[key]
        assert isinstance(value, kinds) and not (isinstance(value, bool) and bool not in _tuple(kinds)), (
            f"{where}.{key} must be {kinds}, got {value!r}"
        )


def _tuple(kinds: Any) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def test_hub_json_follows_the_publishing_guide():
    fields_ok("hub.json", HUB, HUB_FIELDS, HUB_REQUIRED)
    assert HUB["type"] == "serverless" and HUB["category"] in CATEGORIES
    config = HUB["config"]
    fields_ok("config", config, CONFIG_FIELDS, {"runsOn", "containerDiskInGb"})
    assert config["runsOn"] == "GPU" and {"gpuCount", "gpuIds"} <= config.keys() and "cpuFlavor" not in config
    assert config["gpuCount"] == 1 and config["containerDiskInGb"] > 0
    for pool in config["gpuIds"].split(","):
        assert pool.strip() in GPU_POOLS or pool.strip().lstrip("-") in GPU_TYPES, f"unknown GPU pool {pool!r}"
    for index, entry in enumerate(config["env"]):
        assert set(entry) in ({"key", "value"}, {"key", "input"}), entry
        assert isinstance(entry["key"], str)
        if "value" in entry:
            assert isinstance(entry["value"], str), f"{entry['key']}: a static value is a string"
            continue
        spec = entry["input"]
        fields_ok(f"env[{index}] ({entry['key']}).input", spec, INPUT_FIELDS, {"type", "name", "description"})
        assert spec["type"] in {"string", "huggingface", "number", "boolean"}, spec["type"]
        if spec["type"] == "number":
            assert "options" not in spec and {"min", "max"} <= spec.keys() and spec["min"] <= spec["max"]
            assert isinstance(spec.get("default", 0), (int, float)) and not isinstance(spec.get("default"), bool)
        elif spec["type"] == "boolean":
            assert {"trueValue", "falseValue"} <= spec.keys() and isinstance(spec.get("default", False), bool)
        else:
            assert not {"min", "max", "trueValue", "falseValue"} & spec.keys()
            assert isinstance(spec.get("default", ""), str)
        for option in spec.get("options", []):
            assert set(option) == {"label", "value"} and all(isinstance(v, str) for v in option.values()), option
        if "options" in spec and "default" in spec:
            assert spec["default"] in [option["value"] for option in spec["options"]]
    keys = [entry["key"] for entry in config["env"]]
    assert len(keys) == len(set(keys)), "a key defined twice"
    for preset in config.get("presets", []):
        assert set(preset) == {"name", "defaults"} and isinstance(preset["name"], str), preset
        for key, value in preset["defaults"].items():
            assert key in keys, f"preset {preset['name']!r} sets {key}, which hub.json's env does not define"
            assert isinstance(value, (str, int, float, bool)), (key, value)


def test_tests_json_follows_the_publishing_guide():
    fields_ok("tests.json", TESTS, {"tests": list, "config": dict}, {"tests", "config"})
    names = []
    for index, test in enumerate(TESTS["tests"]):
        fields_ok(f"tests[{index}]", test, TEST_FIELDS, {"name", "input"})
        assert test.get("timeout", 1) > 0
        names.append(test["name"])
    assert names and len(names) == len(set(names))
    config = TESTS["config"]
    fields_ok("tests.json config", config, TEST_CONFIG_FIELDS, {"gpuTypeId", "gpuCount"})
    assert config["gpuTypeId"] in GPU_TYPES and config["gpuCount"] == 1


@pytest.mark.parametrize("where", ["hub.json", "tests.json"])
def test_cuda_versions_are_runpods_and_the_images(where):
    """A version Runpod's API does not list matches no host; one below 13.0 admits hosts whose driver cannot run the
    image's CUDA 13.0 torch (it would install, then find no usable GPU)."""
    versions = (HUB["config"] if where == "hub.json" else TESTS["config"])["allowedCudaVersions"]
    assert all(isinstance(version, str) for version in versions)
    assert set(versions) <= RUNPOD_CUDA_VERSIONS, f"not in Runpod's API: {set(versions) - RUNPOD_CUDA_VERSIONS}"
    assert set(versions) <= IMAGE_CUDA_VERSIONS, f"too old for the image's CUDA 13.0 torch: {set(versions)}"
    assert versions, "an empty list would admit every host, CUDA 12 drivers included"


def test_the_image_needs_cuda_13_as_the_files_say():
    """The Dockerfile's base and the torch pin are what IMAGE_CUDA_VERSIONS stands for."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG CUDA_IMAGE=nvidia/cuda:13.0." in dockerfile
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text().split()


# ------------------------------------------------------------------ what each preset needs: GPU memory and weights

# What each preset needs is the worker's own memory plan (src/qwen_worker/memory_plan.py: every component's bytes from
# its safetensors headers, Lightning copies, LoRA slots, an estimated activation reserve) on stand-ins that carry the
# published checkpoints' headers and no data (builder/real_size_models.py). Each model id the files name -> its
# stand-in: Qwen-Image-2512 and the Edit-Plus checkpoints have their family's components and shapes.
STAND_INS = {
    "Qwen/Qwen-Image": "qwen-image", "Qwen/Qwen-Image-2512": "qwen-image",
    "Qwen/Qwen-Image-Edit": "qwen-image-edit", "Qwen/Qwen-Image-Edit-2509": "qwen-image-edit",
    "Qwen/Qwen-Image-Edit-2511": "qwen-image-edit", "Qwen/Qwen-Image-Layered": "qwen-image-layered",
    "Qwen/Qwen-Image-2.1": "qwen-image-2.1",
}
# The pipelines each model id loads (every Qwen-Image pipeline these presets name: transformer, text encoder, VAE).
PIPELINE_COMPONENTS = ("transformer", "text_encoder", "vae")
MODEL_VARIABLES = ("QWEN_IMAGE_MODEL", "QWEN_IMAGE_EDIT_MODEL", "QWEN_IMAGE_LAYERED_MODEL")


def hub_env(overrides: dict[str, Any]) -> dict[str, Any]:
    """The parsed settings a Hub deploy starts with: each input's default or static value, then ``overrides``."""
    values = {name: var.default for name, var in VARIABLES_BY_NAME.items()}
    for key, entry in HUB_ENV.items():
        if "value" in entry:
            values[key] = parsed(variable(key), entry["value"])
        elif "default" in entry["input"]:
            values[key] = parsed(variable(key), entry["input"]["default"])
    for key, value in overrides.items():
        values[key] = parsed(variable(key), value)
    return values


def served_models(values: dict[str, Any]) -> list[str]:
    return [values[name] for name in MODEL_VARIABLES if values[name] is not None]


def need_bytes(overrides: dict[str, Any], real: dict[str, Path]) -> int:
    """GPU bytes the worker's memory plan says a Hub deploy with ``overrides`` takes, as configured (no plan of
    MEMORY_PLAN=auto's: a preset must fit as it is)."""
    from qwen_worker.app import configured_pipelines, memory_setup
    from qwen_worker.memory_plan import make_report

    values = hub_env(overrides)
    env = hub_env_text(overrides)
    for name in MODEL_VARIABLES:
        env[name] = str(real[STAND_INS[values[name]]]) if values[name] is not None else "none"
    if values["SAFETY_CHECKER_MODEL"] != "none":
        env["SAFETY_CHECKER_MODEL"] = str(real["safety-checker"])
    settings = Settings.from_env(env)
    report = make_report(
        memory_setup(settings, configured_pipelines(settings)), element_bytes=2, available=None, available_source="",
        mode="check", configured_quant=settings.acceleration.quant, fp8_supported=True,
    )
    return report.configured.gpu_bytes


def smallest_pool_bytes() -> int:
    pools = [pool.strip() for pool in HUB["config"]["gpuIds"].split(",") if not pool.strip().startswith("-")]
    return min(GPU_POOLS[pool] for pool in pools) * 10**9


@pytest.mark.parametrize("preset", HUB["config"]["presets"], ids=lambda preset: preset["name"])
def test_every_preset_fits_every_gpu_pool_the_listing_allows(preset, real_size_models):
    """Hub presets share the listing's gpuIds, so each preset must fit the smallest pool listed."""
    need = need_bytes(preset["defaults"], real_size_models)
    assert need <= smallest_pool_bytes(), f"{preset['name']} needs {need / 1e9:.1f} GB"


def test_the_hub_tests_fit_their_gpu(real_size_models):
    need = need_bytes({entry["key"]: entry["value"] for entry in TESTS["config"]["env"]}, real_size_models)
    assert need <= GPU_TYPES[TESTS["config"]["gpuTypeId"]] * 10**9


def test_the_memory_check_is_not_vacuous(real_size_models):
    """Both pipelines in bf16 (the old "H200" preset) do not fit an 80 GB card; one does; both in int8 do."""
    both = {"QWEN_IMAGE_MODEL": "Qwen/Qwen-Image", "QWEN_IMAGE_EDIT_MODEL": "Qwen/Qwen-Image-Edit"}
    real = real_size_models
    assert 80 * 10**9 < need_bytes({**both, "TRANSFORMER_QUANT": "none"}, real) <= 141 * 10**9
    assert need_bytes({**both, "TRANSFORMER_QUANT": "int8"}, real) <= 80 * 10**9
    assert need_bytes({"QWEN_IMAGE_MODEL": "Qwen/Qwen-Image", "QWEN_IMAGE_EDIT_MODEL": "none"}, real) <= 80 * 10**9
    assert GPU_POOLS["AMPERE_80"] == 80


def dockerfile_defaults() -> dict[str, str]:
    args = {}
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("ARG ") and "=" in line:
            name, _, value = line[4:].partition("=")
            args[name.strip()] = value.strip()
    return args


def baked_by_default() -> set[str]:
    """The repositories a build with no build args bakes (the Hub passes none): the Dockerfile's ARG defaults."""
    args = dockerfile_defaults()
    if args["BAKE_MODELS"] != "true":
        return set()
    return {args[name] for name in ("QWEN_IMAGE_MODEL", "QWEN_IMAGE_EDIT_MODEL") if args[name].lower() != "none"}


def test_a_default_build_bakes_qwen_image_only():
    assert baked_by_default() == {"Qwen/Qwen-Image"}


def test_the_hub_tests_start_offline_on_a_default_build():
    """tests.json can name no cached model: its tests run on what the Hub's build (no build args) baked."""
    values = hub_env({entry["key"]: entry["value"] for entry in TESTS["config"]["env"]})
    assert set(served_models(values)) <= baked_by_default(), "a model the Hub's build does not bake cannot start"
    edit_ok = values["QWEN_IMAGE_EDIT_MODEL"] is not None
    for test in TESTS["tests"]:
        assert edit_ok or not {"image", "images"} & test["input"].keys(), f"{test['name']} needs an edit model"


@pytest.mark.parametrize("preset", HUB["config"]["presets"], ids=lambda preset: preset["name"])
def test_every_preset_starts_on_a_default_build_plus_one_cached_model(preset):
    """Runpod allows one cached model per endpoint: a preset may name one model the build does not bake, and then
    says so in its name and in the README's Hub section."""
    missing = set(served_models(hub_env(preset["defaults"]))) - baked_by_default()
    assert len(missing) <= 1, f"{preset['name']} needs {sorted(missing)}: more than one cached model"
    readme = (ROOT / "README.md").read_text()
    hub_section = readme[readme.index("### Runpod Hub") :]
    assert preset["name"] in hub_section, "the README's Hub section does not list this preset"
    for model in missing:
        assert f"cached model {model}" in preset["name"], "the preset's name does not say which cached model it needs"


def hub_env_text(overrides: dict[str, Any]) -> dict[str, str]:
    """The environment a Hub deploy's worker sees: static values and input defaults, then ``overrides``, as text."""
    env = {key: entry["value"] for key, entry in HUB_ENV.items() if "value" in entry}
    for key, entry in HUB_ENV.items():
        if "default" in entry.get("input", {}):
            env[key] = env_text(entry["input"]["default"])
    return env | {key: env_text(value) for key, value in overrides.items()}


@pytest.mark.parametrize(
    "overrides",
    [preset["defaults"] for preset in HUB["config"]["presets"]]
    + [{entry["key"]: entry["value"] for entry in TESTS["config"]["env"]}],
    ids=[preset["name"] for preset in HUB["config"]["presets"]] + ["tests.json"],
)
def test_every_hub_environment_is_settings_the_worker_accepts(overrides):
    """The rules between variables too (a model to serve, the bucket's four, SAFETY_CHECKER against its model)."""
    Settings.from_env(hub_env_text(overrides))
