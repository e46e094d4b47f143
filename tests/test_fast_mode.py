"""Lightning fast mode read once at start-up (adapters.py): through runsync where a user sees it, on the tiny model.

Outputs are PNGs (lossless), so equal bytes mean equal pixels. "Today's per-job path" is the one this worker used
before: the Lightning file loaded as a peft adapter for the job with diffusers' ``load_lora_weights`` and removed
after it; it is rebuilt here in-process, literally, as the reference.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from support.lora_files import lightning_and_style, write_diffusers
from support.responses import completed_output, decode_data_uri, open_image
from support.worker_process import WorkerProcess

from qwen_worker.app import build_worker
from qwen_worker.config import Settings
from qwen_worker.errors import ConfigError
from qwen_worker.loras import applied_loras
from qwen_worker.runner import GenerationJob
from qwen_worker.schema import Task, parse_request

PLAIN = {"prompt": "a harbour at dawn", "size": "256*256", "seed": 4, "output_format": "png"}
FAST = {**PLAIN, "go_fast": True}
FAST_HIGH = {**PLAIN, "acceleration": "high"}
# The fused copy's tolerance: merging the LoRA into float32 weights rounds differently from adding its output.
FUSED_TOLERANCE = 2  # of 255, per pixel channel


@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory):
    return lightning_and_style(tiny_models["qwen-image"] / "transformer", tmp_path_factory.mktemp("fast-loras"))


@pytest.fixture(scope="module")
def installed(files, tmp_path_factory):
    """Copies of the Lightning files that the fast worker is configured with, and that a test deletes later."""
    folder = tmp_path_factory.mktemp("installed")
    return {name: shutil.copy(files[name], folder / files[name].name) for name in ("eight", "four")}


def start(start_worker, tmp_path_factory, name, **env) -> WorkerProcess:
    """A text-to-image worker on the tiny pipeline (support.tiny_worker's env), no checker, its own LoRA cache."""
    return start_worker(
        QWEN_IMAGE_EDIT_MODEL="none",
        SAFETY_CHECKER="off",
        LORA_CACHE_DIR=str(tmp_path_factory.mktemp(f"{name}-lora-cache")),
        **env,
    )


@pytest.fixture(scope="module")
def plain_worker(start_worker, tmp_path_factory):
    with start(start_worker, tmp_path_factory, "no-lightning") as server:
        yield server


@pytest.fixture(scope="module")
def fast_worker(start_worker, tmp_path_factory, installed):
    with start(
        start_worker,
        tmp_path_factory,
        "lightning",
        LIGHTNING_LORA=str(installed["eight"]),
        LIGHTNING_LORA_4STEP=str(installed["four"]),
    ) as server:
        yield server


def png(server: WorkerProcess, job: dict) -> bytes:
    mime, data = decode_data_uri(completed_output(server.runsync(job))["image_url"])
    assert mime == "image/png"
    return data


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(open_image(data), dtype=np.int16)


@pytest.fixture(scope="module")
def today(tiny_models, files):
    """Fast images by today's per-job path: load_lora_weights(file) for the job, unload_lora_weights after it."""
    worker = worker_with(tiny_models)
    pipeline = worker.runner.pipeline_for(Task.TEXT_TO_IMAGE).pipeline
    images = {}
    for name, job in (("eight", FAST), ("four", FAST_HIGH)):
        pipeline.load_lora_weights(str(files[name]), adapter_name="today", use_safetensors=True, local_files_only=True)
        try:
            # generate() without check_request: this worker has no Lightning configured, the LoRA is loaded by hand
            generation = worker.runner.generate(GenerationJob(parse_request(job), 256, 256))
        finally:
            pipeline.unload_lora_weights()
        images[name] = np.asarray(generation.images[0], dtype=np.int16)
    return images


@pytest.fixture(scope="module")
def reference_plain(plain_worker):
    return png(plain_worker, PLAIN)


def test_plain_jobs_are_byte_identical_to_a_worker_without_lightning_before_and_after_fast_jobs(
    fast_worker, reference_plain
):
    assert png(fast_worker, PLAIN) == reference_plain
    fast = png(fast_worker, FAST)
    png(fast_worker, FAST_HIGH)
    assert fast != reference_plain
    assert png(fast_worker, PLAIN) == reference_plain


def test_fast_jobs_equal_todays_per_job_path_exactly(fast_worker, today):
    assert np.array_equal(pixels(png(fast_worker, FAST)), today["eight"])
    assert np.array_equal(pixels(png(fast_worker, FAST_HIGH)), today["four"])
    assert not np.array_equal(today["eight"], today["four"])


def test_a_user_lora_on_a_fast_job_leaves_nothing_behind(fast_worker, files, today, reference_plain):
    styled = png(fast_worker, {**FAST, "loras": [{"path": str(files["style"]), "scale": 1.0}]})
    assert not np.array_equal(pixels(styled), today["eight"])
    # the same user LoRA again (from the memory cache) draws the same image
    assert png(fast_worker, {**FAST, "loras": [{"path": str(files["style"]), "scale": 1.0}]}) == styled
    assert np.array_equal(pixels(png(fast_worker, FAST)), today["eight"])
    assert png(fast_worker, PLAIN) == reference_plain


def test_fast_jobs_read_nothing_once_the_lightning_files_are_gone(fast_worker, installed, today, reference_plain):
    for path in installed.values():
        path.unlink()
    assert np.array_equal(pixels(png(fast_worker, FAST)), today["eight"])
    assert np.array_equal(pixels(png(fast_worker, FAST_HIGH)), today["four"])
    assert png(fast_worker, PLAIN) == reference_plain
    assert "Lightning regular resident" in fast_worker.log_text()


# ------------------------------------------------------------------------------------------ in-process checks


def worker_with(tiny_models, **env):
    return build_worker(
        Settings.from_env({"QWEN_IMAGE_MODEL": str(tiny_models["qwen-image"]), "SAFETY_CHECKER": "off", **env})
    )


def test_the_lightning_copy_shares_every_weight_with_the_plain_transformer(tiny_models, files):
    worker = worker_with(tiny_models, LIGHTNING_LORA=str(files["eight"]))
    loaded = worker.runner.pipeline_for(Task.TEXT_TO_IMAGE)
    base = dict(loaded.pipeline.transformer.named_parameters())
    (copy,) = loaded.fast.copies.values()
    copied = {name.replace("base_layer.", ""): p for name, p in copy.named_parameters() if "lora_" not in name}
    assert copied.keys() == base.keys()
    assert all(copied[name] is base[name] for name in base)  # the same tensors: no second copy of the model
    assert not any("lora" in type(module).__module__ for module in loaded.pipeline.transformer.modules())


def test_lightning_fuse_serves_only_its_mode_within_the_stated_tolerance(tiny_models, files, today):
    worker = worker_with(tiny_models, LIGHTNING_LORA=str(files["eight"]), LIGHTNING_FUSE="true")
    transformer = worker.runner.pipeline_for(Task.TEXT_TO_IMAGE).pipeline.transformer
    assert not any("lora" in type(module).__module__ for module in transformer.modules())
    fused = np.asarray(open_image(decode_data_uri(worker.handle({"id": "f", "input": FAST})["image_url"])[1]), np.int16)
    assert np.abs(fused - today["eight"]).max() <= FUSED_TOLERANCE
    plain = worker.handle({"id": "p", "input": PLAIN})
    assert "only fast mode (regular)" in plain["error"] and "LIGHTNING_FUSE=true" in plain["error"]
    assert "only fast mode (regular)" in worker.handle({"id": "h", "input": FAST_HIGH})["error"]


def test_lightning_fuse_with_two_files_is_refused(tiny_models, files):
    with pytest.raises(ConfigError, match="LIGHTNING_FUSE=true .* both the 8-step and the 4-step"):
        worker_with(tiny_models, LIGHTNING_LORA=str(files["eight"]), LIGHTNING_LORA_4STEP=str(files["four"]),
                    LIGHTNING_FUSE="true")


def test_a_lightning_file_for_another_model_stops_the_worker(tiny_models, tmp_path):
    from support.lora_files import shaped_pairs

    wrong = write_diffusers(tmp_path / "wide.safetensors", shaped_pairs(64, seed=4))
    with pytest.raises(ConfigError, match="Lightning LoRA .*wide.safetensors cannot be applied"):
        worker_with(tiny_models, LIGHTNING_LORA=str(wrong))


LIGHTNING_8STEP = "lightx2v/Qwen-Image-Lightning:Qwen-Image-Lightning-8steps-V1.1.safetensors"


def test_lightning_named_as_a_repo_file_is_found_offline_on_the_volume(tiny_models, files, tmp_path):
    """LIGHTNING_LORA=org/name:file, as builder/fetch_models.py --models lightning-8step leaves it on a volume: found
    in the volume's Hugging Face cache and applied; a name found nowhere stops the worker naming the variable."""
    volume = tmp_path / "vol"
    repo = volume / ".cache/huggingface/hub/models--lightx2v--Qwen-Image-Lightning"
    snapshot = repo / "snapshots" / ("e" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(files["eight"], snapshot / "Qwen-Image-Lightning-8steps-V1.1.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("e" * 40)

    worker = worker_with(tiny_models, LIGHTNING_LORA=LIGHTNING_8STEP, RUNPOD_VOLUME_PATH=str(volume))
    loaded = worker.runner.pipeline_for(Task.TEXT_TO_IMAGE)
    assert loaded.lightning.eight_step == snapshot / "Qwen-Image-Lightning-8steps-V1.1.safetensors"
    assert len(loaded.fast.copies) == 1  # the resident Lightning copy, as with a local path

    missing = LIGHTNING_8STEP.replace("8steps-V1.1", "4steps-V1.0")
    with pytest.raises(ConfigError, match=r"LIGHTNING_LORA_4STEP.*not found.*fetch_models\.py --file"):
        worker_with(tiny_models, LIGHTNING_LORA_4STEP=missing, RUNPOD_VOLUME_PATH=str(volume))


@pytest.mark.slow
def test_compiled_plain_and_fast_jobs_switch_without_recompiling(tiny_models, files):
    """COMPILE=regional: the plain transformer and the Lightning copy are each compiled and warmed at start-up, so
    plain -> fast -> plain -> fast after start-up compiles nothing (torch._dynamo's graph counter stays put)."""
    from torch._dynamo.utils import counters

    worker = worker_with(
        tiny_models, LIGHTNING_LORA=str(files["eight"]), COMPILE="regional", COMPILE_WARMUP_SIZES="256*256"
    )
    compiled_at_start = counters["stats"]["unique_graphs"]
    assert compiled_at_start >= 2  # at least the plain block and the Lightning copy's block
    results = [worker.handle({"id": f"j{i}", "input": job}) for i, job in enumerate((PLAIN, FAST, PLAIN, FAST))]
    assert all("image_url" in result for result in results), results
    assert counters["stats"]["unique_graphs"] == compiled_at_start
    assert results[0]["image_url"] == results[2]["image_url"] and results[1]["image_url"] == results[3]["image_url"]
    assert results[0]["image_url"] != results[1]["image_url"]
    # The counter does see a recompilation: a LoRA loaded per job by hand changes the modules (the worker writes
    # user LoRAs into a slot instead: tests/test_lora_slots.py).
    pipeline = worker.runner.pipeline_for(Task.TEXT_TO_IMAGE).pipeline
    with applied_loras(pipeline, [(files["style"], 1.0)]):
        worker.runner.generate(GenerationJob(parse_request(PLAIN), 256, 256))
    assert counters["stats"]["unique_graphs"] > compiled_at_start
