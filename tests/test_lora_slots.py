"""User LoRAs through the LoRA slot (lora_slots.py): written in place per job, no module injected, nothing recompiled.

The reference is the per-job path the slot replaces (``LORA_SLOT_RANK=0``: each LoRA loaded as a peft adapter for the
job and removed after it), run in-process on the same tiny pipeline. Outputs are PNGs (lossless).
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from support.responses import completed_output, decode_data_uri, open_image
from synthetic_loras import (
    random_pairs,
    write_diffusers,
    write_down_up,
    write_kohya,
    write_peft_trained,
)

from qwen_worker.app import build_worker
from qwen_worker.config import Settings
from qwen_worker.lora_slots import SLOT_ADAPTER
from qwen_worker.loras import applied_loras
from qwen_worker.runner import GenerationJob
from qwen_worker.schema import FastMode, Task, parse_request

# The slot multiplies each LoRA's scale into B instead of into the layer's output: the same sum, rounded differently.
# Measured: at most 1/255 on these jobs.
SLOT_TOLERANCE = 2  # of 255, per pixel channel

PLAIN = {"prompt": "a lighthouse on a cliff", "size": "256*256", "seed": 11, "output_format": "png",
         "num_inference_steps": 6}  # fmt: skip


def pairs(transformer, seed: int, rank: int = 4):
    """Stronger than support's default, so that each LoRA's effect stands well clear of the tolerance."""
    return random_pairs(transformer, seed=seed, rank=rank, std=0.8)


def lora(name: str, scale: float = 1.0) -> dict:
    return {"path": name, "scale": scale}


@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory):
    from diffusers import QwenImageTransformer2DModel

    folder = tmp_path_factory.mktemp("slot-loras")
    transformer_dir = tiny_models["qwen-image"] / "transformer"
    transformer = QwenImageTransformer2DModel.from_pretrained(transformer_dir)
    # Mixed ranks: diffusers records a rank pattern, and the slot must place each layer's own rank.
    mixed = {
        name: (a[:2], b[:, :2]) if index % 3 == 0 else (a, b)
        for index, (name, (a, b)) in enumerate(pairs(transformer, seed=7).items())
    }
    out_features, in_features = transformer.proj_out.weight.shape
    generator = torch.Generator().manual_seed(9)
    proj_out = (torch.randn(4, in_features, generator=generator), torch.randn(out_features, 4, generator=generator))
    outside = {**pairs(transformer, seed=8), "proj_out": proj_out}
    paths = {
        "a": write_diffusers(folder / "a.safetensors", pairs(transformer, seed=1)),
        # kohya with alpha 2 at rank 4: peft's scaling 0.5, folded by diffusers' converter
        "kohya": write_kohya(folder / "kohya.safetensors", pairs(transformer, seed=3), alpha=2.0),
        # trained with lora_alpha 8 at rank 4: the scaling (2.0) comes from the file's adapter metadata
        "peft": write_peft_trained(folder, transformer_dir, seed=5, alpha=8),
        "mixed": write_diffusers(folder / "mixed.safetensors", mixed),
        "wide": write_diffusers(folder / "wide.safetensors", pairs(transformer, seed=6, rank=8)),
        "outside": write_diffusers(folder / "outside.safetensors", outside),
        "lightning": write_down_up(folder / "lightning.safetensors", pairs(transformer, seed=2)),
    }
    return {name: str(path) for name, path in paths.items()}


def jobs(files) -> dict[str, dict]:
    return {
        "a": {**PLAIN, "loras": [lora(files["a"], 0.7)]},
        "kohya": {**PLAIN, "loras": [lora(files["kohya"])]},
        "peft": {**PLAIN, "loras": [lora(files["peft"])]},
        "mixed": {**PLAIN, "loras": [lora(files["mixed"])]},
        "a+kohya": {**PLAIN, "loras": [lora(files["a"], 0.7), lora(files["kohya"], -0.5)]},
        "fast+a": {**PLAIN, "go_fast": True, "loras": [lora(files["a"], 0.7)]},
    }


def worker_with(tiny_models, files, **env):
    settings = {
        "QWEN_IMAGE_MODEL": str(tiny_models["qwen-image"]),
        "QWEN_IMAGE_EDIT_MODEL": "none",
        "SAFETY_CHECKER": "off",
        "LIGHTNING_LORA": files["lightning"],
        **env,
    }
    return build_worker(Settings.from_env(settings))


def pixels(output: dict) -> np.ndarray:
    assert "image_url" in output, output
    return np.asarray(open_image(decode_data_uri(output["image_url"])[1]), dtype=np.int16)


@pytest.fixture(scope="module")
def reference(tiny_models, files):
    """Each job's image by the per-job path (LORA_SLOT_RANK=0), and the plain image."""
    worker = worker_with(tiny_models, files, LORA_SLOT_RANK="0")
    assert worker.runner.pipeline_for(Task.TEXT_TO_IMAGE).slots is None
    images = {name: pixels(worker.handle({"id": name, "input": job})) for name, job in jobs(files).items()}
    images["plain"] = pixels(worker.handle({"id": "plain", "input": PLAIN}))
    return images


# --------------------------------------------------------------------------------------------- through runsync


@pytest.fixture(scope="module")
def slot_worker(start_worker, tmp_path_factory, files):
    """The default: LoRA slots of rank 64."""
    with start_worker(
        QWEN_IMAGE_EDIT_MODEL="none",
        SAFETY_CHECKER="off",
        LIGHTNING_LORA=files["lightning"],
        LORA_CACHE_DIR=str(tmp_path_factory.mktemp("slot-lora-cache")),
    ) as server:
        yield server


def runsync(server, job: dict) -> np.ndarray:
    return pixels(completed_output(server.runsync(job)))


def test_lora_jobs_through_the_slot_match_the_per_job_path(slot_worker, files, reference):
    for name, job in jobs(files).items():
        image = runsync(slot_worker, job)
        difference = int(np.abs(image - reference[name]).max())
        assert difference <= SLOT_TOLERANCE, (name, difference)
        assert int(np.abs(image - reference["plain"]).max()) > SLOT_TOLERANCE, name  # the LoRA shows beyond it
    log = slot_worker.log_text()
    assert "LoRA slots of rank 64" in log and "written into the LoRA slot of the fast (regular) tree" in log
    assert "applied LoRAs" not in log  # nothing went through the per-job loader


def test_the_slot_carries_nothing_into_the_next_job(slot_worker, files, reference):
    every = jobs(files)
    first = runsync(slot_worker, every["a+kohya"])
    assert np.array_equal(runsync(slot_worker, PLAIN), reference["plain"])  # plain runs the untouched transformer
    mixed = runsync(slot_worker, every["mixed"])  # fewer rows than the two-LoRA job filled, in fewer layers
    assert np.abs(mixed - reference["mixed"]).max() <= SLOT_TOLERANCE
    assert np.array_equal(runsync(slot_worker, every["a+kohya"]), first)
    assert np.array_equal(runsync(slot_worker, {**PLAIN, "loras": [lora(files["a"], 0.0)]}), reference["plain"])


# ------------------------------------------------------------------------------------------ in-process checks


def test_slot_copies_share_every_base_weight_and_leave_the_plain_transformer_alone(tiny_models, files):
    worker = worker_with(tiny_models, files)
    loaded = worker.runner.pipeline_for(Task.TEXT_TO_IMAGE)
    assert loaded.slots is not None
    base = dict(loaded.pipeline.transformer.named_parameters())
    lightning = dict(loaded.fast.copies[FastMode.REGULAR].named_parameters())
    for mode, source in ((FastMode.NONE, base), (FastMode.REGULAR, lightning)):
        tree = dict(loaded.slots.tree_for(mode).named_parameters())
        shared = [p for name, p in tree.items() if f".{SLOT_ADAPTER}." not in name]
        # Every other tensor is one of the source tree's own (the same objects): no second copy of any weight.
        assert len(shared) == len(source) and {id(p) for p in shared} == {id(p) for p in source.values()}
        slot = [p for name, p in tree.items() if f".{SLOT_ADAPTER}." in name]
        assert slot and all(p.abs().sum() == 0 for p in slot)  # zero until a job writes into it
    assert not any("lora" in type(module).__module__ for module in loaded.pipeline.transformer.modules())


@pytest.mark.parametrize("name", ["wide", "outside"])
def test_a_lora_that_does_not_fit_the_slot_is_loaded_per_job_when_not_compiled(
    tiny_models, files, name, caplog
):
    job = {**PLAIN, "loras": [lora(files[name])]}
    expected = pixels(worker_with(tiny_models, files, LORA_SLOT_RANK="0").handle({"id": "ref", "input": job}))
    worker = worker_with(tiny_models, files, LORA_SLOT_RANK="4")
    with caplog.at_level(logging.INFO, logger="qwen_worker"):
        output = worker.handle({"id": name, "input": job})
    assert np.array_equal(pixels(output), expected)  # the very same per-job path
    assert "loras[0] does not fit the LoRA slot" in caplog.text
    reason = "rank 8 (at transformer_blocks" if name == "wide" else "layers outside the LoRA slot"
    (note,) = [note for note in output["notes"] if "LoRA slot" in note]  # the caller is told why it was slower
    assert note.startswith("loras[0] does not fit this endpoint's LoRA slot (") and reason in note
    assert "takes longer" in note


@pytest.mark.slow
def test_compiled_jobs_switch_loras_and_modes_without_recompiling(tiny_models, files, reference):
    """COMPILE=regional on the CPU (inductor): the plain tree, the Lightning copy and each one's slot copy are compiled
    and warmed at start-up, so plain -> LoRA A -> LoRA B -> fast -> fast + LoRA -> plain compiles nothing more
    (torch._dynamo's graph counter), and LoRAs that do not fit the slot are refused, naming the rank or layers."""
    from torch._dynamo.utils import counters

    worker = worker_with(tiny_models, files, COMPILE="regional", COMPILE_WARMUP_SIZES="256*256", LORA_SLOT_RANK="4")
    compiled_at_start = counters["stats"]["unique_graphs"]
    assert compiled_at_start >= 4  # at least one graph per tree: plain, Lightning, and their two slot copies
    every = jobs(files)
    sequence = [PLAIN, every["a"], every["kohya"], {**PLAIN, "go_fast": True}, every["fast+a"], PLAIN, every["a"]]
    images = [pixels(worker.handle({"id": f"j{i}", "input": job})) for i, job in enumerate(sequence)]
    assert counters["stats"]["unique_graphs"] == compiled_at_start
    assert np.array_equal(images[0], images[5]) and np.array_equal(images[1], images[6])
    assert len({image.tobytes() for image in images[:5]}) == 5
    # Compiled and eager kernels round differently too: within the slot's tolerance of the per-job path, plus one.
    assert np.abs(images[1] - reference["a"]).max() <= SLOT_TOLERANCE + 1

    refused = [
        ([lora(files["wide"])], "Invalid LoRA (loras[0]): its rank 8 (at transformer_blocks.", "LORA_SLOT_RANK=4"),
        ([lora(files["a"]), lora(files["kohya"])], "Invalid LoRA (loras): the LoRAs' ranks add up to 8 at ",
         "LORA_SLOT_RANK=4"),
        ([lora(files["outside"])], "Invalid LoRA (loras[0]): it targets layers outside the LoRA slot",
         "transformer blocks: proj_out"),
    ]  # fmt: skip
    for loras, *expected in refused:
        error = worker.handle({"id": "r", "input": {**PLAIN, "loras": loras}})["error"]
        assert all(text in error for text in expected) and "(COMPILE=regional)" in error, error
    assert np.array_equal(pixels(worker.handle({"id": "after", "input": every["a"]})), images[1])
    assert counters["stats"]["unique_graphs"] == compiled_at_start
    # The counter does see a recompilation: the per-job loader the slot replaces, called by hand, changes modules.
    pipeline = worker.runner.pipeline_for(Task.TEXT_TO_IMAGE).pipeline
    with applied_loras(pipeline, [(Path(files["a"]), 1.0)]):
        worker.runner.generate(GenerationJob(parse_request(PLAIN), 256, 256))
    assert counters["stats"]["unique_graphs"] > compiled_at_start


def test_a_compiled_layered_endpoint_refuses_a_lora_outside_the_slot_too(tiny_models, files):
    """The layered pipeline is compiled but not warmed up (it takes no width/height): still compiled, so a LoRA that
    does not fit its slot is refused rather than loaded per job (which would recompile its blocks)."""
    from support.images import photo_like, to_bytes

    worker = build_worker(Settings.from_env({
        "QWEN_IMAGE_MODEL": "none", "QWEN_IMAGE_EDIT_MODEL": "none", "SAFETY_CHECKER": "off",
        "QWEN_IMAGE_LAYERED_MODEL": str(tiny_models["qwen-image-layered"]), "COMPILE": "regional",
    }))  # fmt: skip
    loaded = worker.runner.pipeline_for(Task.LAYERS)
    assert loaded.compiled_sizes == set() and loaded.slots is not None
    image = "data:image/png;base64," + base64.b64encode(to_bytes(photo_like(64, 64), "PNG")).decode()
    job = {"image": image, "layers": 2, "prompt": "a cat", "loras": [lora(files["outside"])]}
    error = worker.handle({"id": "layers", "input": job})["error"]
    assert "layers outside the LoRA slot" in error and "proj_out" in error and "(COMPILE=regional)" in error, error
