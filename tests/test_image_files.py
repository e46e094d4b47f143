"""What can be checked of the worker image without Docker: the Dockerfile, .dockerignore and the Runpod Hub files."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from support.file_server import file_server
from support.images import photo_like, to_bytes
from support.responses import completed_output

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def dockerignore_excludes(path: str) -> bool:
    """Evaluate .dockerignore's patterns in order (last match wins), as Docker does."""
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern + "/*") or path.startswith(pattern + "/"):
            excluded = not negate
    return excluded


def test_every_copy_source_exists_and_is_in_the_build_context():
    copies = [args for word, args in instructions() if word == "COPY"]
    assert copies
    for args in copies:
        *sources, _destination = [part for part in shlex.split(args) if not part.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY source {source} is missing"
            assert not dockerignore_excludes(source.rstrip("/")), f"{source} is excluded by .dockerignore"


def test_dockerignore_keeps_the_context_small():
    for heavy in (".venv", "models", "outputs", ".git", "tests", ".s3"):
        assert dockerignore_excludes(heavy), heavy


def test_cmd_runs_the_handler_unbuffered():
    cmds = [args for word, args in instructions() if word == "CMD"]
    assert cmds == ['["python", "-u", "handler.py"]']


def test_base_is_cuda_base_matching_the_torch_build_and_python_312():
    # The "base" flavour: torch's wheels bring CUDA's math libraries themselves (see the Dockerfile's comment).
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:13\.0\.\d+-base-ubuntu24\.04$", DOCKERFILE, re.M)
    assert re.search(r"^ARG PYTHON=python3\.12$", DOCKERFILE, re.M)  # Ubuntu 24.04's Python
    torch_pin = re.search(r"^torch==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M)
    assert torch_pin and torch_pin.group(1) == "2.13.0"  # PyPI's 2.13.0 wheel is the CUDA 13.0 build


def test_requirements_are_pinned():
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][A-Za-z0-9.+\-]*", line), f"unpinned: {line}"


def test_dependencies_install_before_the_code_is_copied():
    order = [(word, args) for word, args in instructions() if word in ("COPY", "RUN")]
    install = next(i for i, (word, args) in enumerate(order) if word == "RUN" and "requirements.txt" in args)
    code = next(i for i, (word, args) in enumerate(order) if word == "COPY" and args.startswith("src/"))
    assert install < code


def test_no_secret_reaches_a_layer():
    for word, args in instructions():
        if word in ("ARG", "ENV"):
            assert not re.search(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY", args, re.I), f"{word} {args}"
    fetch = next(args for word, args in instructions() if word == "RUN" and "fetch_models.py" in args)
    assert "--mount=type=secret,id=hf_token" in fetch  # the token exists only while that step runs


def test_runtime_environment_and_weights_location():
    env = " ".join(args for word, args in instructions() if word == "ENV")
    for setting in ("HF_HUB_OFFLINE=1", "RUNPOD_LOG_LEVEL=INFO", "HF_ENABLE_PARALLEL_LOADING=yes", "REQUIRE_CUDA=1"):
        assert setting in env
    home = re.search(r"HF_HOME=(\S+)", env)
    assert home and not home.group(1).startswith("/runpod-volume")


def test_fetch_step_uses_options_the_builder_accepts():
    import fetch_models  # builder/fetch_models.py

    fetch = next(args for word, args in instructions() if word == "RUN" and "fetch_models.py" in args)
    used = set(re.findall(r"(--[a-z0-9-]+)", fetch.split("fetch_models.py", 1)[1]))
    parser_options = set(re.findall(r'"(--[a-z0-9-]+)"', (ROOT / "builder/fetch_models.py").read_text()))
    assert used <= parser_options, used - parser_options
    assert callable(fetch_models.main)


def load_json(name: str) -> dict:
    return json.loads((ROOT / ".runpod" / name).read_text())


def test_hub_json_shape():
    hub = load_json("hub.json")
    assert {"title", "description", "type", "category", "config"} <= hub.keys()
    assert hub["type"] == "serverless" and hub["category"] == "image"
    config = hub["config"]
    assert config["runsOn"] == "GPU" and config["gpuCount"] == 1 and isinstance(config["containerDiskInGb"], int)
    assert all(pool in ("ADA_80_PRO", "HOPPER_141", "AMPERE_80") for pool in config["gpuIds"].split(","))  # >= 80 GB
    keys = [entry["key"] for entry in config["env"]]
    assert len(keys) == len(set(keys))
    readme = (ROOT / "README.md").read_text()
    for entry in config["env"]:
        assert ("value" in entry) != ("input" in entry), entry["key"]
        assert f"`{entry['key']}`" in readme, f"{entry['key']} is not documented in the README"
        if "input" in entry:
            assert {"name", "type", "description"} <= entry["input"].keys()
    for preset in config["presets"]:
        assert set(preset["defaults"]) <= set(keys)


def test_tests_json_shape():
    tests = load_json("tests.json")
    names = [test["name"] for test in tests["tests"]]
    assert len(names) == len(set(names)) == 2
    # Both text-to-image: the Hub's build bakes only Qwen/Qwen-Image and its tests cannot name a cached model, so an
    # edit test could not start there (tests/test_hub_files.py holds that rule).
    assert all("prompt" in test["input"] and "image" not in test["input"] for test in tests["tests"])
    assert tests["config"]["gpuCount"] == 1


@pytest.mark.slow
def test_every_hub_test_completes_on_the_tiny_pipelines(start_worker, tiny_models):
    tests = load_json("tests.json")["tests"]
    with file_server() as images:
        fixture = images.add("/hub-fixture.png", to_bytes(photo_like(128, 96)))
        with start_worker(
            QWEN_IMAGE_EDIT_MODEL=str(tiny_models["qwen-image-edit"]),
            RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS="true",
            DEFAULT_STEPS="1",
        ) as worker:
            for test in tests:
                payload = dict(test["input"])
                if "image" in payload:
                    payload["image"] = fixture  # never fetch the real URL
                output = completed_output(worker.runsync(payload, timeout=test.get("timeout", 600_000) / 1000))
                assert output["image_url"] and output["cost"] > 0, test["name"]


# ------------------------------------------------------------------------------- the Dockerfile's steps, evaluated


def run_step(marker: str) -> str:
    """The shell text of the RUN step containing ``marker``, without its --mount options."""
    step = next(args for word, args in instructions() if word == "RUN" and marker in args)
    return re.sub(r"^(--\S+\s+)+", "", step)


def image_env(build_args: dict[str, str]) -> dict[str, str]:
    """The runtime environment the Dockerfile gives its image for these build args (ARG defaults, ENV, ${VAR})."""
    values: dict[str, str] = {}
    env: dict[str, str] = {}

    def expand(text: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), ""), text)

    for word, args in instructions():
        if word == "ARG":
            name, _, default = args.partition("=")
            values[name] = build_args.get(name, expand(default))
        elif word == "ENV":
            for pair in shlex.split(args):
                name, _, value = pair.partition("=")
                env[name] = values[name] = expand(value)
    return env


DEFAULT_CHECKER = "CompVis/stable-diffusion-safety-checker"


def run_fetch_step(tmp_path: Path, **build_args: str) -> list[str]:
    """The fetch RUN step's own shell text, with a stub python recording the arguments fetch_models.py gets.

    Only the build args given are set (as in a build that leaves the others at their defaults, which the step's
    ``${VAR:-default}`` supplies); /models must exist afterwards whatever is baked."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "python").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$STUB_ARGS"\n')
    (stub / "python").chmod(0o755)
    models = tmp_path / "models"
    script = run_step("fetch_models.py").replace("/models", str(models))
    env = {"PATH": f"{stub}:/usr/bin:/bin", "STUB_ARGS": str(tmp_path / "args"), **build_args}
    done = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert models.is_dir()
    script_path, *args = (tmp_path / "args").read_text().split("\n")[:-1]
    assert script_path == "builder/fetch_models.py"
    return args


BASE_ARGS = {
    "QWEN_IMAGE_MODEL": "Qwen/Qwen-Image",
    "QWEN_IMAGE_EDIT_MODEL": "none",
    "QWEN_IMAGE_REVISION": "main",
    "QWEN_IMAGE_EDIT_REVISION": "main",
}


@pytest.mark.parametrize("bake", ["true", "false"])
@pytest.mark.parametrize("checker", [DEFAULT_CHECKER, "none"])
def test_fetch_step_succeeds_for_every_bake_choice_and_always_bakes_the_checker(bake, checker, tmp_path):
    """A slim build (BAKE_MODELS=false) fetches no pipeline but still bakes the checker, unless it is "none"; whatever
    is baked, /models exists afterwards (the step's chmod used to fail on a build that bakes nothing)."""
    args = run_fetch_step(tmp_path, **BASE_ARGS, BAKE_MODELS=bake, SAFETY_CHECKER_MODEL=checker)
    assert args[args.index("--models") + 1] == ("t2i" if bake == "true" else "none")
    if checker == "none":
        assert "--extra-repo" not in args
    else:
        assert args[args.index("--extra-repo") + 1] == checker


def test_every_model_has_a_build_arg_that_bakes_it_and_the_image_serves_it(tmp_path):
    """One build arg per worker variable, named like it: the fetch step turns each into what fetch_models.py fetches
    (the same targets its catalogue names), and the image's environment serves exactly that."""
    import fetch_models  # builder/fetch_models.py

    from qwen_worker.config import Settings

    chosen = {
        name: fetch_models.setting(fetch_models.ENTRIES[entry])
        for name, entry in (
            ("QWEN_IMAGE_MODEL", "qwen-image-2.1"),
            ("QWEN_IMAGE_EDIT_MODEL", "edit-plus-2511"),
            ("QWEN_IMAGE_LAYERED_MODEL", "layered"),
            ("QWEN_IMAGE_CONTROLNET_MODEL", "controlnet-union"),
            ("LIGHTNING_LORA", "lightning-8step"),
            ("LIGHTNING_LORA_4STEP", "lightning-4step"),
            ("LIGHTNING_EDIT_LORA", "lightning-edit-2511-8step"),
            ("LIGHTNING_EDIT_LORA_4STEP", "lightning-edit-2511-4step"),
        )
    }
    build_args = {**BASE_ARGS, **chosen, "QWEN_IMAGE_ACCEPT_RESEARCH_LICENSE": "true", "BAKE_MODELS": "true",
                  "SAFETY_CHECKER_MODEL": DEFAULT_CHECKER}
    args = run_fetch_step(tmp_path, **build_args)
    targets = fetch_models.plan(fetch_models.build_parser().parse_args(args))
    fetched = {(t.repo_id, file) for t in targets for file in (t.files or ("",))}
    expected = {tuple(value.split(":")) if ":" in value else (value, "") for value in chosen.values()}
    assert fetched == expected | {(DEFAULT_CHECKER, "")}

    env = image_env(build_args)
    assert {name: env[name] for name in chosen} == chosen
    settings = Settings.from_env(env)
    assert settings.accept_research_license and settings.layered_model == chosen["QWEN_IMAGE_LAYERED_MODEL"]
    assert str(settings.lightning_edit_lora_4step) == chosen["LIGHTNING_EDIT_LORA_4STEP"]

    # Without the licence arg the build stops at the fetch step, before downloading anything.
    (tmp_path / "refused").mkdir()
    args = run_fetch_step(tmp_path / "refused", **{**build_args, "QWEN_IMAGE_ACCEPT_RESEARCH_LICENSE": "false"})
    with pytest.raises(fetch_models.UsageError, match="Research License"):
        fetch_models.plan(fetch_models.build_parser().parse_args(args))


def test_a_default_build_bakes_qwen_image_and_the_checker_only(tmp_path):
    """What the Runpod Hub builds (no build args): Qwen/Qwen-Image and the checker, no other model, no Lightning."""
    import fetch_models  # builder/fetch_models.py

    defaults = {}
    for word, args in instructions():
        if word == "ARG":
            name, _, value = args.partition("=")
            defaults[name] = value
    args = run_fetch_step(tmp_path, **defaults)
    targets = fetch_models.plan(fetch_models.build_parser().parse_args(args))
    assert [(t.repo_id, t.kind) for t in targets] == [("Qwen/Qwen-Image", "pipeline"), (DEFAULT_CHECKER, "model")]
    env = image_env({})
    assert env["QWEN_IMAGE_EDIT_MODEL"] == "none" and env["LIGHTNING_LORA"] == ""


@pytest.mark.parametrize("checker", [DEFAULT_CHECKER, "Org/other-checker", "none"])
def test_the_checker_build_arg_reaches_the_worker_and_a_slim_image_starts_with_its_defaults(checker):
    from qwen_worker.config import Settings

    env = image_env({"BAKE_MODELS": "false", "SAFETY_CHECKER_MODEL": checker})
    assert env["SAFETY_CHECKER_MODEL"] == checker
    settings = Settings.from_env(env)  # a ConfigError here is a worker that refuses to start
    assert settings.safety_checker == ("off" if checker == "none" else "on")
    assert settings.safety_checker_model == checker


def test_python_is_named_once_as_a_build_arg():
    code = "\n".join(f"{word} {args}" for word, args in instructions())
    assert re.findall(r"python3\.\d+", code) == ["python3.12"]  # only ARG PYTHON's default
    apt = run_step("apt-get install")
    assert '"$PYTHON" "$PYTHON-venv"' in apt and '"$PYTHON" -m venv' in apt


def test_requirements_say_where_the_image_takes_torch_from():
    comment = " ".join(
        line.lstrip("# ") for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("#")
    )
    uses_pytorch_index = "download.pytorch.org" in DOCKERFILE or "index-url" in DOCKERFILE
    claims_pytorch_index = bool(re.search(r"from the PyTorch (CUDA )?index", comment))
    assert claims_pytorch_index == uses_pytorch_index, comment
    assert "PyPI" in comment and "CUDA 13" in comment


def test_the_package_is_built_outside_app():
    """``pip install .`` in /app leaves /app/build (and an egg-info) in the image."""
    install = run_step("--no-deps")
    for command in re.split(r";|&&", install):
        words = shlex.split(command)
        if words[:2] == ["pip", "install"]:
            target = [word for word in words[2:] if not word.startswith("-")]
            assert target and not any(t in (".", "./", "/app", "/app/") for t in target), command
            assert target[0].startswith("/tmp/")
