""".runpod/hub.json and .runpod/tests.json against the one table of settings (config.VARIABLES): every key a variable
the worker reads, every value, preset and default one the worker parses to what the table means, every range the
table's. A Hub input may not pre-fill what the table leaves unset (DEFAULT_STEPS: unset means each model's card)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qwen_worker.config import VARIABLES_BY_NAME, Variable
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
