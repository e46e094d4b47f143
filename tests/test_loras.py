"""Per-job LoRAs: resolving (volume, local, downloaded and cached) and applying them to the tiny Qwen-Image pipeline.

Images are compared as the pipeline's float arrays (output_type="np"), so "unchanged" means bit-for-bit equal.
Images are 256x256, 2 steps, without true CFG (a LoRA acts the same with it, at twice the cost).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import synthetic_loras as lora_files
import torch
from support.file_server import Route, closed_port, file_server

from qwen_worker.errors import LoraError
from qwen_worker.lora_files import LoraRequest, LoraStore
from qwen_worker.loras import applied_loras

SIZE = 256
STEPS = 2
TIMEOUT = 5.0


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def pipe(tiny_models):
    from diffusers import QwenImagePipeline

    # One thread: the tiny model's matrices are too small to share out, and on a busy 2-core machine OpenMP's
    # spinning threads made each image ~50x slower (2.3 s instead of 0.03 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipeline = QwenImagePipeline.from_pretrained(tiny_models["qwen-image"], local_files_only=True, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    yield pipeline
    torch.set_num_threads(threads)


def generate(pipeline, seed: int = 7) -> np.ndarray:
    with torch.inference_mode():
        return pipeline(
            prompt="a red fox in the snow",
            true_cfg_scale=1.0,
            num_inference_steps=STEPS,
            width=SIZE,
            height=SIZE,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
        ).images


@pytest.fixture(scope="module")
def baseline(pipe):
    return generate(pipe)


def snapshot(transformer):
    """Everything that would make the next job differ: module classes, state_dict tensors, plain attributes."""
    return (
        [(name, type(module)) for name, module in transformer.named_modules()],
        {key: value.detach().clone() for key, value in transformer.state_dict().items()},
        {k: repr(v) for k, v in vars(transformer).items() if k not in ("_modules", "_parameters", "_buffers")},
    )


def assert_pristine(pipe, before, baseline=None):
    """The transformer is exactly as before any LoRA; with ``baseline``, it also draws the very same image."""
    modules, state, attributes = snapshot(pipe.transformer)
    assert modules == before[0]
    assert not any("lora" in type(module).__module__ for _name, module in pipe.transformer.named_modules())
    assert state.keys() == before[1].keys()
    assert all(torch.equal(state[key], before[1][key]) for key in state)
    assert attributes == before[2]
    if baseline is not None:
        assert np.array_equal(generate(pipe), baseline)


@pytest.fixture(scope="module")
def pristine(pipe):
    return snapshot(pipe.transformer)


@pytest.fixture(scope="module")
def loras(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    first = lora_files.random_pairs(pipe.transformer, seed=1)
    second = lora_files.random_pairs(pipe.transformer, seed=2)
    return {
        "first": first,
        "second": second,
        "folder": folder,
        "diffusers": lora_files.write_diffusers(folder / "first.safetensors", first),
        "second_file": lora_files.write_diffusers(folder / "second.safetensors", second),
    }


@pytest.fixture(scope="module")
def first_image(pipe, loras):
    """The image with the first LoRA (diffusers layout) at scale 1: the reference other layouts must reproduce."""
    with applied_loras(pipe, [(loras["diffusers"], 1.0)]):
        return generate(pipe)


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return np.allclose(a, b, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ applying


def test_lora_changes_the_image_and_is_removed_exactly(pipe, baseline, pristine, loras, first_image):
    with applied_loras(pipe, [(loras["diffusers"], 1.0)]) as names:
        assert len(names) == 1
        # peft layers really are in place during the job
        assert any("lora" in type(m).__module__ for _n, m in pipe.transformer.named_modules())
        with_lora = generate(pipe)
    assert np.abs(with_lora - baseline).max() > 1e-3
    assert_pristine(pipe, pristine, baseline)
    # and the same LoRA in a later job draws the same image again
    assert np.array_equal(with_lora, first_image)


LAYOUTS = {
    "kohya": lora_files.write_kohya,
    "comfy": lora_files.write_comfy,
    "musubi": lambda path, pairs: lora_files.write_down_up(path, pairs, key=lambda name: "diffusion_model." + name),
    "lightning": lora_files.write_down_up,
    "bare": lora_files.write_bare,
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_gives_the_diffusers_result(pipe, baseline, pristine, loras, first_image, layout):
    path = LAYOUTS[layout](loras["folder"] / f"first-{layout}.safetensors", loras["first"])
    with applied_loras(pipe, [(path, 1.0)]):
        converted = generate(pipe)
    assert not close(converted, baseline)
    assert close(converted, first_image)
    assert_pristine(pipe, pristine)


def test_kohya_alpha_scales_the_lora(pipe, loras, first_image):
    # alpha = rank / 2 means the LoRA acts at half strength: the same as the diffusers file at scale 0.5.
    half = lora_files.write_kohya(loras["folder"] / "half-alpha.safetensors", loras["first"], alpha=lora_files.RANK / 2)
    with applied_loras(pipe, [(half, 1.0)]):
        kohya_half = generate(pipe)
    with applied_loras(pipe, [(loras["diffusers"], 0.5)]):
        diffusers_half = generate(pipe)
    assert close(kohya_half, diffusers_half)
    assert not close(kohya_half, first_image)


def test_peft_trained_lora_keeps_its_alpha_from_the_metadata(pipe, tiny_models, loras):
    # lora_alpha = 2 x rank lives only in the file's adapter metadata; dropping it would halve the effect.
    path = lora_files.write_peft_trained(
        loras["folder"] / "peft", tiny_models["qwen-image"] / "transformer", seed=3, alpha=2 * lora_files.RANK
    )
    doubled = lora_files.write_diffusers(
        loras["folder"] / "peft-doubled.safetensors", lora_files.scaled(lora_files.peft_pairs(path), 2.0)
    )
    with applied_loras(pipe, [(path, 1.0)]):
        trained = generate(pipe)
    with applied_loras(pipe, [(doubled, 1.0)]):
        by_hand = generate(pipe)
    with applied_loras(pipe, [(doubled, 0.5)]):
        without_alpha = generate(pipe)
    assert close(trained, by_hand)
    assert not close(trained, without_alpha)


def test_scale_is_applied(pipe, baseline, loras, first_image):
    doubled = lora_files.write_diffusers(
        loras["folder"] / "first-doubled.safetensors", lora_files.scaled(loras["first"], 2.0)
    )
    with applied_loras(pipe, [(loras["diffusers"], 2.0)]):
        scale_two = generate(pipe)
    with applied_loras(pipe, [(doubled, 1.0)]):
        weights_two = generate(pipe)
    with applied_loras(pipe, [(loras["diffusers"], -1.0)]):
        negative = generate(pipe)
    assert close(scale_two, weights_two)
    assert not close(scale_two, first_image)
    assert not close(negative, first_image) and not close(negative, baseline)


def test_scale_zero_leaves_the_image_unchanged(pipe, baseline, loras):
    with applied_loras(pipe, [(loras["diffusers"], 0.0)]):
        assert close(generate(pipe), baseline)


def test_two_loras_combine_with_their_own_scales(pipe, baseline, pristine, loras, first_image):
    first_only = first_image
    with applied_loras(pipe, [(loras["second_file"], 1.0)]):
        second_only = generate(pipe)
    with applied_loras(pipe, [(loras["diffusers"], 1.0), (loras["second_file"], 1.0)]) as names:
        assert len(set(names)) == 2
        both = generate(pipe)
    with applied_loras(pipe, [(loras["diffusers"], 1.0), (loras["second_file"], 0.0)]):
        first_and_muted_second = generate(pipe)
    assert not close(both, first_only) and not close(both, second_only) and not close(both, baseline)
    assert close(first_and_muted_second, first_only)
    assert_pristine(pipe, pristine, baseline)


def test_an_empty_list_touches_nothing(pipe, pristine, baseline, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("peft code path touched")

    for method in ("load_lora_weights", "set_adapters", "delete_adapters", "unload_lora_weights"):
        monkeypatch.setattr(pipe, method, forbidden)
    with applied_loras(pipe, []) as names:
        assert names == []
        assert np.array_equal(generate(pipe), baseline)
    monkeypatch.undo()
    assert_pristine(pipe, pristine)


def test_lora_removed_when_the_job_fails(pipe, baseline, pristine, loras):
    with (
        pytest.raises(RuntimeError, match="generation blew up"),
        applied_loras(pipe, [(loras["diffusers"], 1.0), (loras["second_file"], 0.5)]),
    ):
        raise RuntimeError("generation blew up")
    assert_pristine(pipe, pristine, baseline)


def test_lora_for_another_model_is_refused_and_the_pipeline_is_unharmed(pipe, baseline, pristine, loras):
    wrong = lora_files.write_diffusers(loras["folder"] / "wide.safetensors", lora_files.shaped_pairs(64, seed=4))
    # The good first LoRA is already loaded when the second fails: both must be gone afterwards.
    with pytest.raises(LoraError) as caught, applied_loras(pipe, [(loras["diffusers"], 1.0), (wrong, 1.0)]):
        pytest.fail("the block must not run")
    assert caught.value.field == "loras[1]"
    assert "do not fit this model" in str(caught.value)
    assert_pristine(pipe, pristine, baseline)


@pytest.mark.parametrize(
    "keys, reason",
    [
        # a text-encoder-only LoRA: diffusers would load nothing and only log a warning
        ({"text_encoder.layers.0.q_proj": (32, 32)}, "no weights for this model's transformer"),
        # a Flux LoRA: its layers do not exist in Qwen-Image
        ({"transformer.single_transformer_blocks.0.attn.to_q": (32, 32)}, "do not exist in this model"),
    ],
)
def test_lora_with_nothing_for_this_transformer_is_refused(pipe, baseline, pristine, loras, keys, reason):
    from safetensors.torch import save_file

    tensors = {}
    for name, (out_features, in_features) in keys.items():
        tensors[f"{name}.lora_A.weight"] = torch.randn(4, in_features)
        tensors[f"{name}.lora_B.weight"] = torch.randn(out_features, 4)
    path = loras["folder"] / "other-model.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(LoraError, match=reason) as caught, applied_loras(pipe, [(path, 1.0)]):
        pytest.fail("the block must not run")
    assert caught.value.field == "loras[0]"
    assert_pristine(pipe, pristine)


# ------------------------------------------------------------------------------------------------ resolving


@pytest.fixture
def allow_private(monkeypatch):
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")


@pytest.fixture
def volume(tmp_path):
    folder = tmp_path / "volume"
    folder.mkdir()
    return folder


def make_store(tmp_path, volume=None, **overrides) -> LoraStore:
    settings = dict(
        cache_dir=tmp_path / "cache",
        max_cache_bytes=10_000_000,
        max_file_bytes=1_000_000,
        volume_path=volume or tmp_path / "no-volume",
        timeout_seconds=TIMEOUT,
    )
    settings.update(overrides)
    return LoraStore(**settings)


def refusal(store: LoraStore, path: str, field: str = "loras[0]") -> str:
    with pytest.raises(LoraError) as caught:
        store.resolve(LoraRequest(path, 1.0), field)
    assert caught.value.field == field
    return str(caught.value)


def cache_files(store: LoraStore) -> list[str]:
    return sorted(p.name for p in store.cache_dir.iterdir())


def test_download_once_then_served_from_the_cache(tmp_path, allow_private, pipe, loras, first_image):
    body = loras["diffusers"].read_bytes()
    store = make_store(tmp_path)
    with file_server() as server:
        url = server.add("/loras/first.safetensors", body, "application/octet-stream") + "?X-Amz-Signature=s3cr3t"
        first = store.resolve(LoraRequest(url, 1.0), "loras[0]")
        assert len(server.requests) == 1
        second = store.resolve(LoraRequest(url, 0.5), "loras[2]")
        assert len(server.requests) == 1  # no network at all the second time
    assert first == second and first.read_bytes() == body
    assert first.parent == store.cache_dir

    sidecar = json.loads(first.with_suffix(".json").read_text())
    assert sidecar["content_sha256"] == hashlib.sha256(body).hexdigest()
    assert sidecar["url_sha256"] == hashlib.sha256(url.encode()).hexdigest() == first.stem
    assert sidecar["size"] == len(body)
    assert sidecar["url"] == f"http://127.0.0.1:{server.port}/loras/first.safetensors"  # no query string
    assert not any(name.startswith(".") for name in cache_files(store))  # no temporaries left

    # A new store on the same folder (a restarted worker) finds it too, though the server is gone by now.
    assert make_store(tmp_path).resolve(LoraRequest(url, 1.0), "loras[0]") == first
    # and the downloaded file is the very LoRA that was served
    with applied_loras(pipe, [(first, 1.0)]):
        assert np.array_equal(generate(pipe), first_image)


def test_private_address_refused_without_the_sdk_switch(tmp_path, monkeypatch, loras):
    monkeypatch.delenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", raising=False)
    store = make_store(tmp_path)
    with file_server() as server:
        url = server.add("/first.safetensors", loras["diffusers"].read_bytes())
        message = refusal(store, url + "?token=hunter2")
        assert server.requests == []  # refused before any connection
    assert "non-public address" in message and "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS" in message
    assert "hunter2" not in message
    assert cache_files(store) == []


def test_http_errors_and_closed_ports(tmp_path, allow_private):
    store = make_store(tmp_path)
    with file_server() as server:
        message = refusal(store, server.url("/missing.safetensors?sig=SECRET"))
        assert "HTTP 404" in message and "127.0.0.1" in message and "SECRET" not in message
        # a redirect to a scheme the guard refuses: the SDK's message names the whole target, ours must not
        server.routes["/moved.safetensors"] = Route(b"", status=302, headers={"Location": "ftp://h/x?sig=SECRET2"})
        message = refusal(store, server.url("/moved.safetensors"))
        assert "blocked URL scheme" in message and "SECRET2" not in message
        assert len(server.requests) == 2
    assert "could not connect to 127.0.0.1" in refusal(store, f"http://127.0.0.1:{closed_port()}/a.safetensors")
    assert cache_files(store) == []


def test_oversized_download_is_refused(tmp_path, allow_private, loras):
    body = loras["diffusers"].read_bytes()
    store = make_store(tmp_path, max_file_bytes=len(body) - 1)
    with file_server() as server:
        declared = server.add("/big.safetensors", body)
        # no Content-Length: only the streaming cap can stop it
        undeclared = server.add("/big-undeclared.safetensors", body, send_length=False)
        assert f"larger than the LoRA download limit of {len(body) - 1} bytes" in refusal(store, declared)
        assert f"larger than the LoRA download limit of {len(body) - 1} bytes" in refusal(store, undeclared)
        assert len(server.requests) == 2
    assert cache_files(store) == []
    # exactly at the limit is fine
    with file_server() as server:
        url = server.add("/exact.safetensors", body)
        assert make_store(tmp_path, max_file_bytes=len(body)).resolve(LoraRequest(url, 1.0), "loras[0]").is_file()


def test_downloads_that_are_not_safetensors_are_refused(tmp_path, allow_private, loras):
    pickled = tmp_path / "lora.pt"
    torch.save({"transformer.x.lora_A.weight": torch.zeros(2, 2)}, pickled)
    store = make_store(tmp_path)
    with file_server() as server:
        for name, body in [
            ("/pickle.safetensors", pickled.read_bytes()),
            ("/plain-pickle.safetensors", pickle.dumps({"a": 1})),
            ("/random.safetensors", os.urandom(4096)),
            ("/page.safetensors", b"<html>login required</html>"),
        ]:
            assert "is not a safetensors file" in refusal(store, server.add(name, body))
        assert len(server.requests) == 4
    assert cache_files(store) == []  # nothing unusable was kept


def test_safetensors_without_lora_weights_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)}, str(path))
    assert "contains no LoRA weights" in refusal(make_store(tmp_path), str(path))


def test_local_absolute_paths(tmp_path, loras):
    store = make_store(tmp_path)
    assert store.resolve(LoraRequest(str(loras["diffusers"]), 1.0), "loras[0]") == loras["diffusers"]
    assert "no file at" in refusal(store, str(tmp_path / "missing.safetensors"))
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    assert "not a regular file" in refusal(store, str(folder))
    pickled = tmp_path / "lora.ckpt"
    torch.save({"a": torch.zeros(1)}, pickled)
    assert "not a .safetensors file" in refusal(store, str(pickled))
    renamed = tmp_path / "renamed.safetensors"
    renamed.write_bytes(pickled.read_bytes())
    assert "is not a safetensors file" in refusal(store, str(renamed))


def test_relative_paths_resolve_on_the_volume(tmp_path, volume, loras):
    (volume / "loras").mkdir()
    target = volume / "loras" / "style.safetensors"
    target.write_bytes(loras["diffusers"].read_bytes())
    store = make_store(tmp_path, volume)
    assert store.resolve(LoraRequest("loras/style.safetensors", 1.0), "loras[1]") == target.resolve()
    assert store.resolve(LoraRequest("./loras/style.safetensors", 1.0), "loras[1]") == target.resolve()
    assert "no file loras/other.safetensors on the network volume" in refusal(store, "loras/other.safetensors")


def test_volume_escapes_are_refused(tmp_path, volume, loras):
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(loras["diffusers"].read_bytes())
    (volume / "loras").mkdir()
    (volume / "loras" / "link.safetensors").symlink_to(outside)
    (volume / "inner.safetensors").write_bytes(loras["diffusers"].read_bytes())
    store = make_store(tmp_path, volume)
    assert "'..' is not allowed" in refusal(store, "../secret.safetensors")
    # '..' is refused even when it would stay inside the volume
    assert "'..' is not allowed" in refusal(store, "loras/../inner.safetensors")
    assert "points outside the network volume" in refusal(store, "loras/link.safetensors")


def test_relative_path_without_a_volume(tmp_path, loras):
    store = make_store(tmp_path, tmp_path / "not-mounted")
    assert "no network volume is mounted" in refusal(store, "loras/style.safetensors")


@pytest.mark.parametrize(
    "path, reason",
    [
        ("s3://bucket/lora.safetensors", "s3: paths are not supported"),
        ("file:///etc/lora.safetensors", "file: paths are not supported"),
        ("ftp://127.0.0.1/lora.safetensors", "ftp: paths are not supported"),
        ("hf://user/repo/lora.safetensors", "hf: paths are not supported"),
        ("https:lora.safetensors", "https: paths are not supported"),
        ("   ", "path is empty"),
    ],
)
def test_unsupported_references(tmp_path, path, reason):
    assert reason in refusal(make_store(tmp_path), path)


def test_cache_evicts_least_recently_used(tmp_path, allow_private, pipe):
    files = {}
    for seed in range(3):
        files[seed] = lora_files.write_diffusers(
            tmp_path / f"l{seed}.safetensors", lora_files.random_pairs(pipe.transformer, seed=10 + seed)
        ).read_bytes()
    entry_bytes = len(files[0]) + 300  # a file and its sidecar
    assert {len(body) for body in files.values()} == {len(files[0])}
    store = make_store(tmp_path, max_cache_bytes=2 * entry_bytes, protect_recent=1)

    with file_server() as server:
        urls = {seed: server.add(f"/l{seed}.safetensors", body) for seed, body in files.items()}
        resolve = lambda seed: store.resolve(LoraRequest(urls[seed], 1.0), "loras[0]")  # noqa: E731
        a, b = resolve(0), resolve(1)
        assert store.cache_bytes() <= store.max_cache_bytes
        resolve(0)  # a is now the more recently used one
        assert len(server.requests) == 2
        c = resolve(2)  # over the cap: b, the least recently used, goes
        assert store.cache_bytes() <= store.max_cache_bytes
        assert a.is_file() and c.is_file() and not b.exists() and not b.with_suffix(".json").exists()
        assert len(server.requests) == 3
        resolve(0)  # still cached
        assert len(server.requests) == 3
        resolve(1)  # evicted, so fetched again; now c is the least recently used
        assert len(server.requests) == 4
        assert not c.exists() and a.is_file() and b.is_file()
        assert store.cache_bytes() <= store.max_cache_bytes


def test_the_current_jobs_loras_are_never_evicted(tmp_path, allow_private, pipe):
    # A cap smaller than one file: each download is still kept until later ones push it out of the protected set,
    # so a job's LoRAs (resolved one after another) all exist when they are loaded.
    store = make_store(tmp_path, max_cache_bytes=100, protect_recent=3)
    with file_server() as server:
        paths = [
            store.resolve(
                LoraRequest(server.add(f"/p{i}.safetensors", lora_files.write_diffusers(
                    tmp_path / f"p{i}.safetensors", lora_files.random_pairs(pipe.transformer, seed=20 + i)
                ).read_bytes()), 1.0),
                f"loras[{i}]",
            )
            for i in range(4)
        ]
    assert not paths[0].exists()
    assert all(path.is_file() for path in paths[1:])


# ------------------------------------------------------------------------------------- prepared-LoRA memory cache


def test_a_cached_lora_is_applied_without_reading_its_file(pipe, loras, first_image, monkeypatch):
    from qwen_worker import lora_files as module
    from qwen_worker.lora_files import PreparedLoraCache

    cache = PreparedLoraCache(max_bytes=10_000_000)
    with applied_loras(pipe, [(loras["diffusers"], 1.0)], cache):
        assert np.array_equal(generate(pipe), first_image)
    assert (cache.hits, cache.misses) == (0, 1) and cache.nbytes > 0

    def no_disk(*args, **kwargs):
        raise AssertionError("a cached LoRA was read, parsed or converted again")

    monkeypatch.setattr(module, "prepare_lora", no_disk)
    monkeypatch.setattr(module, "verify_safetensors", no_disk)
    for _ in range(2):
        with applied_loras(pipe, [(loras["diffusers"], 1.0)], cache):
            assert np.array_equal(generate(pipe), first_image)
    assert (cache.hits, cache.misses) == (2, 1)
    # and the store, which checks every other file's header, trusts a file the cache already holds
    store = make_store(loras["folder"], prepared=cache)
    assert store.resolve(LoraRequest(str(loras["diffusers"]), 1.0), "loras[0]") == loras["diffusers"]


def test_the_cache_keeps_the_next_job_clean(pipe, baseline, pristine, loras):
    from qwen_worker.lora_files import PreparedLoraCache

    cache = PreparedLoraCache(max_bytes=10_000_000)
    for _ in range(2):
        with applied_loras(pipe, [(loras["diffusers"], 1.0), (loras["second_file"], 0.5)], cache):
            generate(pipe)
        assert_pristine(pipe, pristine, baseline)
    # the cached tensors were not changed by being loaded (peft takes them as they are on the CPU)
    with applied_loras(pipe, [(loras["diffusers"], 1.0)], cache):
        again = generate(pipe)
    with applied_loras(pipe, [(loras["diffusers"], 1.0)]):
        assert np.array_equal(again, generate(pipe))


def test_the_cache_is_bounded_in_bytes_least_recently_used_out(pipe, loras, tmp_path):
    from qwen_worker.lora_files import PreparedLoraCache

    paths = [
        lora_files.write_diffusers(tmp_path / f"c{i}.safetensors", lora_files.random_pairs(pipe.transformer, seed=seed))
        for i, seed in enumerate((30, 31, 32))
    ]
    one = PreparedLoraCache(10**9).get(paths[0], "loras[0]").nbytes
    cache = PreparedLoraCache(max_bytes=2 * one)
    cache.get(paths[0], "loras[0]")
    cache.get(paths[1], "loras[0]")
    cache.get(paths[0], "loras[0]")  # 0 is now the more recently used
    cache.get(paths[2], "loras[0]")  # over the cap: 1 goes
    assert cache.nbytes == 2 * one
    assert cache.knows(paths[0]) and cache.knows(paths[2]) and not cache.knows(paths[1])
    # a file larger than the whole cache is prepared for its job but not kept
    tiny = PreparedLoraCache(max_bytes=one - 1)
    assert tiny.get(paths[0], "loras[0]").nbytes == one and tiny.nbytes == 0 and not tiny.knows(paths[0])


def test_the_same_content_is_held_once_and_a_rewritten_file_is_read_again(pipe, loras, tmp_path):
    from qwen_worker.lora_files import PreparedLoraCache

    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(loras["diffusers"].read_bytes())
    cache = PreparedLoraCache(max_bytes=10**9)
    first = cache.get(loras["diffusers"], "loras[0]")
    assert cache.get(copy, "loras[1]") is first and cache.nbytes == first.nbytes  # keyed by content
    lora_files.write_diffusers(copy, loras["second"])
    os.utime(copy, ns=(1, 1))  # a rewrite within the same clock tick must still be seen: size or mtime differ
    assert cache.get(copy, "loras[1]").content_sha256 != first.content_sha256
    assert cache.misses == 3
