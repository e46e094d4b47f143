"""The published JSON Schemas (schema/*.json, from contract.py) are in step with the files, with the parser that
really decides, with the README's parameter table (every column), and with what the worker answers."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from test_docs import table_after
from test_mode_table import BASES

from qwen_worker import contract, modes, schema
from qwen_worker.enums import Mode
from qwen_worker.errors import ValidationError
from qwen_worker.media import EncodedImage
from qwen_worker.models import ResolvedModel
from qwen_worker.profiles import PROFILES, request_rules
from qwen_worker.response import dry_run_quote, job_result
from qwen_worker.runner import Generation
from qwen_worker.schema import parse_request
from qwen_worker.sizes import OutputPlan

ROOT = Path(__file__).resolve().parent.parent
REQUEST = contract.request_schema()
PROPERTIES: dict[str, dict[str, Any]] = REQUEST["properties"]


@pytest.mark.parametrize("name, build", [("request", contract.request_schema), ("result", contract.result_schema)])
def test_the_committed_schemas_are_generated_from_the_declaration(name, build):
    committed = (ROOT / "schema" / f"{name}.schema.json").read_text()
    assert committed == contract.dumps(build()), "stale: run `make schema` (scripts/gen_schema.py)"


def test_the_request_schema_declares_every_field_and_alias_and_nothing_else():
    assert set(PROPERTIES) == schema._FIELDS
    assert REQUEST["additionalProperties"] is False


def _value_schema(prop: dict[str, Any]) -> dict[str, Any]:
    """The non-null branch of an optional property (``anyOf: [X, null]``), or the property itself."""
    branches = [branch for branch in prop.get("anyOf", [prop]) if branch.get("type") != "null"]
    return branches[0]


# What a field needs beside it to be accepted at all.
NEEDS = {"output_quality": {"output_format": "webp"}, "lora_scale": {"lora_weights": "a.safetensors"}}
# background "transparent" needs a model that draws alpha: the choices are probed against Qwen-Image-2.1's rules.
RULES_21 = request_rules(PROFILES["QwenImage21Pipeline"])


def _base(field: str) -> dict[str, Any]:
    """A request of a mode that takes ``field`` (the first that owns it; text-to-image for the common fields)."""
    owners = modes.MODE_FIELDS.get(field)
    base = {**BASES[owners[0].mode if owners else Mode.TEXT_TO_IMAGE], **NEEDS.get(field, {})}
    for alias_of, names in schema._ALIASES.items():  # an alias replaces its field's own value in the base
        if field in names:
            for name in names:
                base.pop(name, None)
            base.pop(alias_of, None)
    base.pop(field, None)
    return base


def _refused_naming(raw: dict[str, Any], field: str) -> bool:
    try:
        parse_request(raw, RULES_21 if field == "background" else None)
    except ValidationError as err:
        return err.field == field or err.field.startswith(field + ".") or err.field.startswith(field + "[")
    return False


BOUNDED = [
    (name, _value_schema(prop)) for name, prop in PROPERTIES.items()
    if {"minimum", "maximum", "exclusiveMinimum"} & set(_value_schema(prop))
]


@pytest.mark.parametrize("name, declared", BOUNDED, ids=[name for name, _ in BOUNDED])
def test_each_declared_range_is_the_parsers(name, declared):
    """The bounds the schema publishes are accepted, and one past them is refused naming the field."""
    step = 1 if declared["type"] == "integer" else 0.5
    base = _base(name)
    low = declared.get("minimum")
    if low is not None:
        assert not _refused_naming({**base, name: low}, name)
        assert _refused_naming({**base, name: low - step}, name)
    else:
        assert _refused_naming({**base, name: declared["exclusiveMinimum"]}, name)
    assert not _refused_naming({**base, name: declared["maximum"]}, name)
    assert _refused_naming({**base, name: declared["maximum"] + step}, name)


CHOICES = [(name, _value_schema(prop)["enum"]) for name, prop in PROPERTIES.items() if "enum" in _value_schema(prop)]


@pytest.mark.parametrize("name, choices", CHOICES, ids=[name for name, _ in CHOICES])
def test_each_declared_choice_is_the_parsers(name, choices):
    base = _base(name)
    for choice in choices:
        assert not _refused_naming({**base, name: choice}, name), choice
    assert _refused_naming({**base, name: "not-a-choice" if isinstance(choices[0], str) else 512}, name)


# A value of each JSON type, to give a field one it does not declare.
OF_TYPE = {"string": "12", "integer": 12, "number": 1.5, "boolean": True, "object": {}, "array": []}


@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_each_declared_type_is_strict_in_the_parser(name):
    """A value of a JSON type the schema does not allow for the field is refused naming it (integers are not
    "12", 1.5 or true; booleans are not 1)."""
    allowed = {branch.get("type", "object") for branch in PROPERTIES[name].get("anyOf", [PROPERTIES[name]])}
    if "number" in allowed:
        allowed.add("integer")  # JSON numbers include integers
    base = _base(name)
    for json_type, value in OF_TYPE.items():
        if json_type not in allowed:
            assert _refused_naming({**base, name: value}, name), (json_type, value)


def test_nested_declarations_are_the_parsers():
    lora = REQUEST["$defs"]["LoraEntry"]["properties"]["scale"]
    for scale, refused in ((lora["minimum"], False), (lora["maximum"], False), (lora["maximum"] + 0.5, True)):
        raw = {"prompt": "p", "loras": [{"path": "a.safetensors", "scale": scale}]}
        assert _refused_naming(raw, "loras[0].scale") is refused
    side = REQUEST["$defs"]["ExpandSides"]["properties"]["left"]
    for left, refused in ((side["maximum"], False), (side["maximum"] + 1, True), (side["minimum"] - 1, True)):
        raw = {**BASES[Mode.OUTPAINTING], "expand": {"left": left}}
        assert _refused_naming(raw, "expand.left") is refused
    too_many = [{"path": "a.safetensors"}] * (REQUEST["properties"]["loras"]["maxItems"] + 1)
    assert _refused_naming({"prompt": "p", "loras": too_many}, "loras")


# ------------------------------------------------------------------------------- the README's table, every column

README_TYPES = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean", "object": "object",
                "array": "array"}


def _readme_rows() -> list[tuple[list[str], list[str]]]:
    rows = []
    for cells in table_after("### Parameters"):
        rows.append((re.findall(r"`([A-Za-z_]+)`", cells[0]), cells))
    return rows


def _json_types(name: str) -> set[str]:
    prop = PROPERTIES[name]
    return {branch.get("type", "object") for branch in prop.get("anyOf", [prop])} - {"null"}


@pytest.mark.parametrize("fields, cells", _readme_rows(), ids=lambda value: "+".join(value) if value else "")
def test_the_readme_parameter_row_matches_the_schema(fields, cells):
    """Type, default and range columns say what the schema declares (per-model defaults are prose: a default the
    schema leaves unset is not checked)."""
    _, _, type_cell, default_cell, range_cell = cells
    range_cell = range_cell.replace("−", "-")  # the README writes minus signs
    for name in fields:
        for json_type in _json_types(name):
            assert README_TYPES[json_type] in type_cell, (name, json_type, type_cell)
        prop = PROPERTIES[name]
        default = prop.get("default")
        if default not in (None, []) or "default" in prop and len(fields) == 1 and default == []:
            assert json.dumps(default, ensure_ascii=False) in default_cell.replace("`", ""), (name, default)
        declared = _value_schema(prop)
        for bound in ("minimum", "maximum", "exclusiveMinimum"):
            if bound in declared and name != "seed":
                assert re.search(rf"(?<![\d.]){declared[bound]:g}(?![\d.])", range_cell), (name, bound, range_cell)
        for choice in declared.get("enum", []):
            assert f"`{choice}`" in range_cell or f"`{choice}`" in default_cell or str(choice) in range_cell, (
                name, choice
            )


def test_the_readme_links_the_published_schemas():
    readme = (ROOT / "README.md").read_text()
    assert "schema/request.schema.json" in readme and "schema/result.schema.json" in readme


# ------------------------------------------------------------------------------------------------- the result


def test_a_result_and_a_quote_validate_against_the_result_schema():
    request = parse_request({"prompt": "p", "seed": 3, "enhance_prompt": True, "go_fast": True, "num_images": 2})
    encoded = [EncodedImage(b"x", request.output_format, 64, 48)] * 2
    model = ResolvedModel("Qwen/Qwen-Image", Path("/m"), "abc", "local folder", "QwenImagePipeline")
    generation = Generation([Image.new("RGB", (64, 48))] * 2, model, 8, 1.0, {"denoise": 1.0}, ["a note"], "Apache-2.0")
    result = job_result(
        request, generation, seeds=request.seeds, encoded=encoded, urls=["u0", "u1"], flags=[False, True],
        timings={"denoise": 1.0}, price_per_megapixel=0.02, safety_checker="enabled",
    )
    result["warning"] = "stored inline"
    contract.JobResult.model_validate_json(json.dumps(result))
    layered = parse_request({**BASES[Mode.LAYERS], "dry_run": True})
    quote = dry_run_quote(layered, OutputPlan(64, 48, (64, 48)), price_per_megapixel=0.02)
    contract.DryRunQuote.model_validate_json(json.dumps(quote))
    strength = parse_request({**BASES[Mode.IMAGE_TO_IMAGE], "dry_run": True, "num_inference_steps": 10})
    contract.DryRunQuote.model_validate_json(json.dumps(dry_run_quote(strength, OutputPlan(64, 48, (64, 48)),
                                                                      price_per_megapixel=0.02)))
