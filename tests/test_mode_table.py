"""The mode table (``modes.py``): no field is ever silently dropped, the mode rule is the README's, and no module
but the table names an individual mode. In-process parsing only: no pipeline, no worker."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_worker import modes, schema
from qwen_worker.enums import Mode
from qwen_worker.errors import ValidationError
from qwen_worker.schema import Request, parse_request

ROOT = Path(__file__).resolve().parent.parent
URL = "https://example.invalid/photo.png"  # never fetched: parsing does no I/O
OTHER_URL = "https://example.invalid/other.png"
MASK = "https://example.invalid/mask.png"

# The smallest request of each mode, with a fixed seed so that two parses compare equal.
BASES: dict[Mode, dict[str, Any]] = {
    Mode.TEXT_TO_IMAGE: {"prompt": "p", "seed": 1},
    Mode.EDIT: {"prompt": "p", "seed": 1, "image": URL},
    Mode.IMAGE_TO_IMAGE: {"prompt": "p", "seed": 1, "image": URL, "strength": 0.5},
    Mode.INPAINTING: {"prompt": "p", "seed": 1, "image": URL, "mask_image": MASK},
    Mode.OUTPAINTING: {"prompt": "p", "seed": 1, "image": URL, "expand": {"left": 8}},
    Mode.LAYERS: {"prompt": "p", "seed": 1, "image": URL, "layers": 3},
    Mode.CONTROLNET: {"prompt": "p", "seed": 1, "control_image": URL},
}

# Every optional input field (width and height go together) with values that differ from its default in every mode
# (and from the bases' values).
CHANGES: dict[tuple[str, ...], list[Any]] = {
    ("prompt",): ["another prompt", "一只猫"],
    ("negative_prompt",): ["blurry", " "],
    ("size",): ["512*512", "768*1024"],
    ("width", "height"): [(512, 512), (768, 1024)],
    ("aspect_ratio",): ["16:9", "3:4"],
    ("image_size",): ["landscape_16_9", {"width": 512, "height": 512}, "optimize_for_quality"],
    ("seed",): [7, 0, -1],
    ("num_inference_steps",): [12, 1, 100],
    ("true_cfg_scale",): [2.5, 20],
    ("guidance",): [2.5, 1.5],
    ("guidance_scale",): [2.5, 7],
    ("enable_safety_checker",): [False],
    ("disable_safety_checker",): [True],
    ("image",): [OTHER_URL],
    ("images",): [[URL, OTHER_URL], [OTHER_URL]],
    ("output_format",): ["webp", " WEBP "],
    ("output_quality",): [80, 1],
    ("match_input_size",): [True],
    ("loras",): [[{"path": "style.safetensors", "scale": 0.5}]],
    ("lora_weights",): ["style.safetensors"],
    ("lora_scale",): [0.5],
    ("go_fast",): [True],
    ("acceleration",): ["high", "regular"],
    ("sync_mode",): [True],
    ("watermark",): [True],
    ("dry_run",): [True],
    ("background",): ["opaque", "transparent"],
    ("strength",): [0.7, 0.25],
    ("expand",): [{"top": 16}, {"left": 8, "right": 8}],
    ("mask_image",): [OTHER_URL],
    ("mask",): [OTHER_URL],
    ("mask_url",): [OTHER_URL],
    ("preserve_unmasked",): [False],
    ("layers",): [4, 10],
    ("resolution",): [1024],
    ("control_image",): [OTHER_URL],
    ("controlnet_conditioning_scale",): [0.5, 2.0],
    ("enhance_prompt",): [True],
    ("prompt_extend",): [True],
    ("num_images",): [2, 4],
    ("n",): [2],
}


def test_every_input_field_is_exercised():
    """A field added to the schema must be added here, or the property below would not cover it."""
    assert {name for names in CHANGES for name in names} == schema._FIELDS


def _with(mode: Mode, names: tuple[str, ...], value: Any) -> dict[str, Any]:
    raw = dict(BASES[mode])
    raw.update(zip(names, value, strict=True) if len(names) > 1 else {names[0]: value})
    return raw


def names_a_field(err: ValidationError, names: set[str]) -> bool:
    """The error is about one of ``names``: as the field it names, or named in its rule ("expand cannot be combined
    with mask_image")."""
    if err.field.split(".")[0].split("[")[0] in names or err.field == "/".join(sorted(names, reverse=True)):
        return True
    return any(re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", err.rule) for name in names)


def _outcome(raw: dict[str, Any]) -> Request | ValidationError:
    try:
        return parse_request(raw)
    except ValidationError as err:
        return err


def check_field_is_never_dropped(mode: Mode, names: tuple[str, ...], value: Any) -> None:
    """The property: a request with the field is refused naming it, or parses to another request (or says why it
    ignored the field in ``notes``)."""
    raw = _with(mode, names, value)
    base = parse_request(BASES[mode])
    outcome = _outcome(raw)
    if isinstance(outcome, ValidationError):
        assert names_a_field(outcome, set(names)), (raw, str(outcome))
        return
    if raw.get("seed") == -1:
        # A random seed: the request differs from the base's seed 1 unless the draw happened to be 1.
        assert outcome.seed != 1 or outcome != base
        return
    assert outcome != base, (raw, "the field changed nothing and was not refused")


@pytest.mark.parametrize("mode", list(Mode), ids=lambda mode: mode.value)
@pytest.mark.parametrize("names", list(CHANGES), ids="+".join)
def test_no_field_is_silently_dropped(mode: Mode, names: tuple[str, ...]):
    for value in CHANGES[names]:
        check_field_is_never_dropped(mode, names, value)


# Fields that set one thing (aliases, and the two spellings of fast mode and of the safety checker): the second may
# agree with the first and so change nothing.
SYNONYMS = [
    {"true_cfg_scale", "guidance", "guidance_scale"},
    {"num_images", "n"},
    {"enhance_prompt", "prompt_extend"},
    {"mask_image", "mask", "mask_url"},
    {"go_fast", "acceleration"},
    {"enable_safety_checker", "disable_safety_checker"},
]

FIELD_AND_VALUE = st.sampled_from(list(CHANGES)).flatmap(
    lambda names: st.tuples(st.just(names), st.sampled_from(CHANGES[names]))
)


@settings(max_examples=int(os.environ.get("MODE_TABLE_EXAMPLES", "300")), deadline=None)
@given(mode=st.sampled_from(list(Mode)), change=FIELD_AND_VALUE, also=FIELD_AND_VALUE)
def test_no_field_is_silently_dropped_beside_another(mode, change, also):
    """The same property with a second field given first: whatever else the request carries, the field is refused
    (naming it or the other field) or changes the parsed request."""
    (names, value), (other_names, other_value) = change, also
    if set(names) & set(other_names) or any({*names, *other_names} <= group for group in SYNONYMS):
        return
    first = _with(mode, other_names, other_value)
    without = _outcome(first)
    if isinstance(without, ValidationError):
        return  # the other field alone is refused: nothing to compare against
    raw = {**first, **dict(zip(names, value, strict=True) if len(names) > 1 else {names[0]: value})}
    outcome = _outcome(raw)
    if isinstance(outcome, ValidationError):
        assert names_a_field(outcome, {*names, *other_names}), (raw, str(outcome))
        return
    if -1 in (raw.get("seed"), first.get("seed")):
        return
    assert outcome != without, (raw, "the field changed nothing and was not refused")


@pytest.mark.parametrize(
    "selector",
    [{"strength": 0.5}, {"mask_image": MASK}, {"mask": MASK}, {"expand": {"left": 8}}],
    ids=lambda fields: next(iter(fields)),
)
def test_a_control_image_beside_another_modes_selector_is_refused_naming_it(selector):
    """Once accepted as image-to-image (inpainting, outpainting) with the control image silently dropped."""
    with pytest.raises(ValidationError) as caught:
        parse_request({"prompt": "p", "image": URL, "control_image": URL, **selector})
    assert caught.value.field == "control_image"
    assert f"cannot be combined with {next(iter(selector))}" in str(caught.value)


def test_the_mode_rule_is_the_readmes():
    """The README states the rule in one sentence; the table's row order is the rule."""
    readme = (ROOT / "README.md").read_text()
    sentence = re.search(r"One rule picks the mode: (.+?)\. A field", readme, re.S)
    assert sentence is not None
    named = re.findall(r"`(\w+)`", sentence.group(1))
    assert named[: len(modes.MODE_RULE)] == [selector for selector, _ in modes.MODE_RULE]
    assert named[len(modes.MODE_RULE) :] == ["image", "images"]


def test_no_module_but_the_table_names_an_individual_mode():
    """A new mode is a row in modes.py: the parser, runner, worker, loading and response never branch on one."""
    pattern = re.compile(r"\bMode\.(" + "|".join(mode.name for mode in Mode) + r")\b")
    offenders = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted((ROOT / "src" / "qwen_worker").glob("*.py"))
        if path.name not in {"modes.py", "enums.py"}
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
