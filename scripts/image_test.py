#!/usr/bin/env python3
"""Build the worker's Dockerfile for real and serve from the images it makes: ``make image-test``.

No container registry is reachable from CI, so ``nvidia/cuda`` cannot be pulled. A Debian base made by debootstrap
stands in for it (``--build-arg CUDA_IMAGE=<stand-in> --build-arg PYTHON=python3.11``; nothing else of the
Dockerfile changes), and Debian's buildah builds it (chroot isolation, as root, no daemon). Then, with no network
(an empty network namespace of our own, loopback only), each image serves the tiny random-weight models:

- build        the slim image (``BAKE_MODELS=false``: the safety checker is still baked, from a stand-in Hugging
               Face Hub on 127.0.0.1 reached through the ``HF_ENDPOINT`` build arg) and one with
               ``SAFETY_CHECKER_MODEL=none``;
- slim start   the slim image's worker in the SDK's local API mode, the pipeline in Runpod's cached-model folder
               (``/runpod-volume/huggingface-cache/hub/models--Qwen--Qwen-Image/snapshots/<rev>/``), until it listens;
- runsync      one job over that API, which must come back COMPLETED;
- test_input   the slim image's own CMD (``python -u handler.py``: the SDK's local test of ``test_input.json``);
- checker-none start   the checker-none image's own CMD, the pipeline in a baked-style HF cache (``$HF_HOME/hub``),
               with nothing else set: it must start (SAFETY_CHECKER defaults to off) and complete the job;
- rebuild      the slim build again after a code-only change: every step before ``COPY src/`` must come from the
               layer cache, and only the code's steps run.

Each stage prints its name and time, then the image size. What the stand-in does not prove: the CUDA base image
itself and anything on a GPU (REQUIRE_CUDA=0 here; the image's default is 1).

The buildah store, the debootstrap tarball and buildah's cache mounts live outside the clone
(``QWEN_IMAGE_TEST_CACHE``, default ``/var/cache/qwen-worker-image-test``), so a second run reuses every layer.

Needs root. Without it: exits 1 under ``CI=true`` or ``REQUIRE_IMAGE_TEST=1``, else skips loudly (exit 0).
Run it with the project's venv (``make image-test``): the stand-in hub comes from tests/test_fetch_models.py.

Environment: QWEN_IMAGE_TEST_CACHE, QWEN_IMAGE_TEST_STORAGE_DRIVER (overlay when the kernel allows it, else vfs),
QWEN_IMAGE_TEST_SUITE (bookworm), QWEN_IMAGE_TEST_PYTHON (python3.11), QWEN_IMAGE_TEST_MIRROR (apt's own),
QWEN_IMAGE_TEST_EXTRA_CA (a PEM file or folder of *.crt copied into the stand-in for a TLS-inspecting proxy;
default: /usr/local/share/ca-certificates/*.crt; "none" to copy nothing), QWEN_IMAGE_TEST_HUB_PORT (38517).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("QWEN_IMAGE_TEST_CACHE", "/var/cache/qwen-worker-image-test"))
SUITE = os.environ.get("QWEN_IMAGE_TEST_SUITE", "bookworm")
PYTHON = os.environ.get("QWEN_IMAGE_TEST_PYTHON", "python3.11")
HUB_PORT = int(os.environ.get("QWEN_IMAGE_TEST_HUB_PORT", "38517"))
API_PORT = 8765
TINY = ROOT / "models" / "tiny"
CHECKER_REPO = "CompVis/stable-diffusion-safety-checker"
PIPELINE_REPO = "Qwen/Qwen-Image"
IMAGE = "localhost/qwen-worker-image-test"
CONTEXT_FILES = (
    "requirements.txt", "pyproject.toml", "handler.py", "test_input.json", "builder/fetch_models.py", "src",
)
# The worker's run-time settings for the tiny models on a CPU: nothing else differs from the image's own ENV.
RUN_ENV = {"REQUIRE_CUDA": "0", "DEFAULT_STEPS": "2"}

timings: list[tuple[str, float]] = []


def say(message: str) -> None:
    print(f"image-test: {message}", flush=True)


def stage(name: str, started: float) -> None:
    elapsed = time.monotonic() - started
    timings.append((name, elapsed))
    say(f"STAGE {name}: {elapsed:.1f} s")


def sh(*args: str, capture: bool = False, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), text=True, capture_output=capture, **kwargs)
    if check and result.returncode != 0:
        detail = (result.stdout or "")[-4000:] + (result.stderr or "")[-4000:] if capture else ""
        raise SystemExit(f"image-test: FAILED: {' '.join(args[:6])} ... exited {result.returncode}\n{detail}")
    return result


# ------------------------------------------------------------------------------------------------ buildah setup


def storage_driver() -> str:
    chosen = os.environ.get("QWEN_IMAGE_TEST_STORAGE_DRIVER")
    if chosen:
        return chosen
    # overlay: each layer stores only its changes. vfs stores a full copy of the tree per layer (~6 GB here), which
    # needs tens of GB for the two variants and minutes per rebuild; it is the fallback where overlay cannot mount
    # (e.g. inside a container whose root is itself overlay).
    probe = Path(tempfile.mkdtemp(dir=CACHE))
    try:
        for part in ("l", "u", "w", "m"):
            (probe / part).mkdir()
        options = f"lowerdir={probe}/l,upperdir={probe}/u,workdir={probe}/w"
        ok = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(probe / "m")],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe / "m")], check=True)
        return "overlay" if ok else "vfs"
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def buildah_env(driver: str) -> dict[str, str]:
    conf = CACHE / f"storage-{driver}.conf"
    conf.write_text(
        "[storage]\n"
        f'driver = "{driver}"\n'
        f'graphroot = "{CACHE}/storage-{driver}"\n'
        f'runroot = "{CACHE}/run-{driver}"\n'
    )
    tmp = CACHE / "tmp"  # buildah's RUN --mount=type=cache folders and its temporary files
    tmp.mkdir(exist_ok=True)
    env = dict(os.environ, CONTAINERS_STORAGE_CONF=str(conf), BUILDAH_ISOLATION="chroot", TMPDIR=str(tmp))
    return env


def buildah(*args: str, capture: bool = True, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return sh("buildah", *args, capture=capture, check=check, env=ENV, **kwargs)


def image_exists(name: str) -> bool:
    return buildah("inspect", "--type", "image", name, check=False).returncode == 0


# --------------------------------------------------------------------------------------------- stand-in base


def apt_mirror() -> str:
    if os.environ.get("QWEN_IMAGE_TEST_MIRROR"):
        return os.environ["QWEN_IMAGE_TEST_MIRROR"]
    sources = sorted(Path("/etc/apt").glob("sources.list.d/*.sources")) + [Path("/etc/apt/sources.list")]
    for source in sources:
        if source.is_file():
            text = source.read_text()
            match = re.search(r"^URIs:\s*(\S+/debian)/?\s*$", text, re.M) or re.search(
                r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s", text, re.M
            )
            if match:
                return match.group(1)
    return "http://deb.debian.org/debian"


def extra_ca_files() -> list[Path]:
    setting = os.environ.get("QWEN_IMAGE_TEST_EXTRA_CA", "/usr/local/share/ca-certificates")
    if setting == "none":
        return []
    path = Path(setting)
    if path.is_dir():
        return sorted(path.rglob("*.crt"))
    return [path] if path.is_file() else []


def standin_base() -> str:
    """The stand-in for nvidia/cuda: debootstrap's minbase of SUITE, with ca-certificates and the build machine's
    extra CAs (pip in the build must trust a TLS-inspecting proxy the way the host does), as a buildah image."""
    mirror = apt_mirror()
    cas = extra_ca_files()
    key = hashlib.sha256(
        json.dumps([SUITE, mirror, [hashlib.sha256(ca.read_bytes()).hexdigest() for ca in cas]]).encode()
    ).hexdigest()[:12]
    name = f"localhost/qwen-worker-standin:{SUITE}-{key}"
    if image_exists(name):
        say(f"stand-in base {name}: cached")
        return name
    tarball = CACHE / "debootstrap" / f"{SUITE}-minbase.tar"
    if not tarball.is_file():
        say(f"debootstrap {SUITE} (minbase + ca-certificates) from {mirror}")
        rootfs = CACHE / "debootstrap" / f"{SUITE}-rootfs"
        shutil.rmtree(rootfs, ignore_errors=True)
        rootfs.parent.mkdir(parents=True, exist_ok=True)
        sh("debootstrap", "--variant=minbase", "--include=ca-certificates", SUITE, str(rootfs), mirror,
           capture=True)
        shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
        (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True)
        sh("tar", "-C", str(rootfs), "-cf", f"{tarball}.part", ".")
        os.replace(f"{tarball}.part", tarball)
        shutil.rmtree(rootfs)
    container = buildah("from", "scratch").stdout.strip()
    try:
        buildah("add", container, str(tarball), "/")
        env = []
        if cas:
            mount = Path(buildah("mount", container).stdout.strip())
            for ca in cas:
                shutil.copy(ca, mount / "usr/local/share/ca-certificates" / f"build-machine-{ca.stem}.crt")
            buildah("umount", container)
            buildah("run", container, "--", "update-ca-certificates")
            # pip inside the build uses certifi unless told; the stand-in's ENV is the build machine's setting.
            env = ["--env", "PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
                   "--env", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"]
        buildah("config", *env, "--cmd", "/bin/bash", container)
        buildah("commit", "--rm", container, name)
    except BaseException:
        buildah("rm", container, check=False)
        raise
    say(f"stand-in base {name}: made ({len(cas)} extra CA file(s))")
    return name


# ------------------------------------------------------------------------------------- stand-in Hugging Face Hub


def start_hub():
    """The tiny checker served as CompVis/stable-diffusion-safety-checker at a fixed port (the port is a build arg,
    so it must not change between runs or the fetch step's cache would never hit)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_fetch_models import FakeHub, FakeRepo  # the Hub protocol fetch_models.py's tests already serve

    files = {p.name: p.read_bytes() for p in sorted((TINY / "safety-checker").iterdir()) if p.is_file()}
    commit = hashlib.sha1(b"".join(files[name] for name in sorted(files))).hexdigest()
    return FakeHub({CHECKER_REPO: FakeRepo(commits={commit: files}, refs={"main": commit})}, port=HUB_PORT)


# ------------------------------------------------------------------------------------------------------- builds


def build(base: str, tag: str, args: dict[str, str], context: Path = ROOT) -> str:
    command = ["build", "--layers", "--pull-never", "-f", str(ROOT / "Dockerfile"), "-t", tag,
               "--build-arg", f"CUDA_IMAGE={base}", "--build-arg", f"PYTHON={PYTHON}",
               "--build-arg", f"HF_ENDPOINT=http://127.0.0.1:{HUB_PORT}"]
    for name, value in args.items():
        command += ["--build-arg", f"{name}={value}"]
    log = CACHE / "logs" / f"build-{tag.rsplit(':', 1)[1]}.log"
    log.parent.mkdir(exist_ok=True)
    with open(log, "w") as out:
        done = subprocess.run(["buildah", *command, str(context)], env=ENV, stdout=out, stderr=subprocess.STDOUT)
    text = log.read_text()
    if done.returncode != 0:
        print(text[-6000:])
        raise SystemExit(f"image-test: FAILED: build {tag} (log: {log})")
    return text


def steps(build_log: str) -> list[tuple[str, bool, str | None]]:
    """(instruction, from cache?, committed layer id) per STEP of a buildah build's output."""
    parts = re.split(r"^STEP \d+/\d+: ", build_log, flags=re.M)[1:]
    result = []
    for part in parts:
        instruction = part.splitlines()[0]
        ids = re.findall(r"^--> (?:Using cache )?([0-9a-f]{11,64})\s*$", part, re.M)
        result.append((instruction, "--> Using cache" in part, ids[-1] if ids else None))
    return result


def image_config(tag: str) -> dict:
    return json.loads(buildah("inspect", "--type", "image", tag).stdout)["OCIv1"]["config"]


# ------------------------------------------------------------------------------------------------------ running


def container_for(tag: str, env: dict[str, str]) -> str:
    container = buildah("from", "--pull-never", tag).stdout.strip().splitlines()[-1]
    for name, value in env.items():
        buildah("config", "--env", f"{name}={value}", container)
    return container


def no_network(*command: str) -> list[str]:
    """``command`` in a new, empty network namespace with only loopback up."""
    return ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]


def run_cmd(tag: str, mounts: list[str], env: dict[str, str], expect: str) -> str:
    """The image's own CMD, offline; it must exit 0 and log ``expect``."""
    container = container_for(tag, env)
    try:
        cmd = image_config(tag)["Cmd"]
        volumes = [arg for mount in mounts for arg in ("-v", mount)]
        done = sh(*no_network("buildah", "run", *volumes, container, "--", *cmd), capture=True, check=False,
                  env=ENV, timeout=600)
    finally:
        buildah("rm", container, check=False)
    output = done.stdout + done.stderr
    if done.returncode != 0 or expect not in output:
        print(output[-6000:])
        raise SystemExit(f"image-test: FAILED: {tag}'s CMD exited {done.returncode} or did not log {expect!r}")
    return output


def serve_and_runsync(tag: str, mounts: list[str], env: dict[str, str]) -> tuple[float, float]:
    """The slim worker in the SDK's local API mode and one runsync, both inside one empty network namespace.

    This script re-enters itself under ``unshare --net`` (``--in-netns``), so the client shares the container's
    loopback and nothing else."""
    container = container_for(tag, env)
    try:
        payload = json.loads((ROOT / "test_input.json").read_text())
        payload["input"]["size"] = "512*512"
        request = CACHE / "tmp" / "runsync.json"
        request.write_text(json.dumps({"input": payload["input"]}))
        volumes = [arg for mount in mounts for arg in ("-v", mount)]
        done = sh(*no_network(sys.executable, __file__, "--in-netns", container, str(request), *volumes),
                  capture=True, check=False, env=ENV, timeout=900)
    finally:
        buildah("rm", container, check=False)
    if done.returncode != 0:
        print((done.stdout + done.stderr)[-8000:])
        raise SystemExit("image-test: FAILED: slim start / runsync")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["start"], result["runsync"]


def in_netns(container: str, request: str, volumes: list[str]) -> int:
    """(Inside the empty namespace.) Start the API server in the container, wait, POST /runsync, print timings."""
    log = open(CACHE / "logs" / "api-server.log", "w")  # noqa: SIM115 - the server's stdout until it is stopped
    started = time.monotonic()
    server = subprocess.Popen(
        ["buildah", "run", *volumes, container, "--", "python", "handler.py", "--rp_serve_api",
         "--rp_api_host", "127.0.0.1", "--rp_api_port", str(API_PORT)],
        stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True,
    )
    try:
        while True:
            if server.poll() is not None:
                output = (CACHE / "logs/api-server.log").read_text()[-4000:]
                raise SystemExit(f"API server exited {server.returncode}: {output}")
            if time.monotonic() - started > 600:
                raise SystemExit("API server did not listen within 600 s")
            try:
                with socket.create_connection(("127.0.0.1", API_PORT), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        start = time.monotonic() - started
        began = time.monotonic()
        req = urllib.request.Request(f"http://127.0.0.1:{API_PORT}/runsync", data=Path(request).read_bytes(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as response:
            body = json.loads(response.read())
        runsync = time.monotonic() - began
        if body.get("status") != "COMPLETED" or not body.get("output", {}).get("image_url"):
            raise SystemExit(f"runsync did not complete: {json.dumps(body)[:2000]}")
        print(json.dumps({"start": start, "runsync": runsync, "status": body["status"]}))
        return 0
    finally:
        os.killpg(server.pid, 15)  # our own session: the buildah run we started and its child
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()
        log.close()


# ---------------------------------------------------------------------------------------------- model layouts


def model_layouts(work: Path) -> tuple[Path, Path]:
    """The tiny pipeline as Runpod's cached-model folder (a volume) and as a baked HF cache (an HF_HOME)."""
    revision = hashlib.sha1(b"tiny qwen-image").hexdigest()
    folder = "models--" + PIPELINE_REPO.replace("/", "--")
    volume = work / "runpod-volume"
    shutil.copytree(TINY / "qwen-image", volume / "huggingface-cache/hub" / folder / "snapshots" / revision)
    hf_home = work / "hf-home"
    repo = hf_home / "hub" / folder
    shutil.copytree(TINY / "qwen-image", repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for path in (volume, hf_home):
        sh("chmod", "-R", "a+rX", str(path))
    return volume, hf_home


# --------------------------------------------------------------------------------------------------------- main


def require_root() -> bool:
    if os.geteuid() == 0:
        return True
    if os.environ.get("CI") == "true" or os.environ.get("REQUIRE_IMAGE_TEST") == "1":
        say("ERROR: the image test needs root (buildah with chroot isolation, debootstrap, unshare --net) "
            "and CI=true / REQUIRE_IMAGE_TEST=1 forbids skipping it.")
        raise SystemExit(1)
    say("SKIPPED: not root. The image was NOT built or tested; run `sudo make image-test` to do so.")
    return False


def main() -> int:
    global ENV
    if not require_root():
        return 0
    if not (TINY / "qwen-image" / "model_index.json").is_file():
        raise SystemExit(f"image-test: the tiny models are missing: run `make models` (builds {TINY})")
    sh("bash", str(ROOT / "scripts" / "install_image_tools.sh"))
    CACHE.mkdir(parents=True, exist_ok=True)
    driver = storage_driver()
    ENV = buildah_env(driver)
    version = sh("buildah", "--version", capture=True).stdout.strip()
    say(f"store {CACHE}/storage-{driver} ({driver}), stand-in {SUITE} with {PYTHON}; {version}")
    total = time.monotonic()

    started = time.monotonic()
    base = standin_base()
    stage("stand-in base", started)

    hub = start_hub()
    try:
        slim, none = f"{IMAGE}:slim", f"{IMAGE}:checker-none"
        started = time.monotonic()
        build(base, slim, {"BAKE_MODELS": "false"})
        stage("build (slim: BAKE_MODELS=false, checker baked)", started)
        started = time.monotonic()
        build(base, none, {"BAKE_MODELS": "false", "SAFETY_CHECKER_MODEL": "none"})
        stage("build (checker-none: SAFETY_CHECKER_MODEL=none)", started)
    finally:
        hub.close()

    for tag, checker in ((slim, CHECKER_REPO), (none, "none")):
        env = dict(item.split("=", 1) for item in image_config(tag)["Env"])
        assert env.get("SAFETY_CHECKER_MODEL") == checker, (tag, env.get("SAFETY_CHECKER_MODEL"))
        container = buildah("from", "--pull-never", tag).stdout.strip().splitlines()[-1]
        try:
            mount = Path(buildah("mount", container).stdout.strip())
            assert not (mount / "app/build").exists(), f"{tag}: /app/build left behind"
            baked = mount / "models/huggingface/hub" / ("models--" + CHECKER_REPO.replace("/", "--"))
            assert baked.is_dir() == (checker != "none"), f"{tag}: checker baked? {baked.is_dir()}"
        finally:
            buildah("rm", container, check=False)

    with tempfile.TemporaryDirectory(dir=CACHE / "tmp") as tmp:
        volume, hf_home = model_layouts(Path(tmp))
        start, runsync = serve_and_runsync(slim, [f"{volume}:/runpod-volume:ro"], RUN_ENV)
        timings.append(("slim start (API server listening; pipeline from Runpod's model cache)", start))
        say(f"STAGE slim start: {start:.1f} s")
        timings.append(("runsync (COMPLETED over the SDK's local API, no network)", runsync))
        say(f"STAGE runsync: {runsync:.1f} s")

        started = time.monotonic()
        run_cmd(slim, [f"{volume}:/runpod-volume:ro"], RUN_ENV, "Job local_test completed successfully")
        stage("test_input (slim image's own CMD on test_input.json)", started)

        started = time.monotonic()
        output = run_cmd(none, [f"{hf_home}:/models/huggingface:ro"], RUN_ENV, "Job local_test completed successfully")
        assert "safety checker disabled by operator" in output, output[-3000:]
        stage("checker-none start (own CMD, defaults; pipeline from a baked HF cache)", started)

    # A code-only change: the same build, one source file edited; only the code's layers may be rebuilt.
    with tempfile.TemporaryDirectory(dir=CACHE / "tmp") as tmp:
        context = Path(tmp)
        for name in CONTEXT_FILES:
            source = ROOT / name
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, context / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy(source, context / name)
        shutil.copy(ROOT / ".dockerignore", context / ".dockerignore")
        with open(context / "src/qwen_worker/__init__.py", "a") as init:
            init.write(f"# image-test code-only change {time.time_ns()}\n")
        hub = start_hub()
        try:
            started = time.monotonic()
            rebuilt = steps(build(base, f"{IMAGE}:rebuild", {"BAKE_MODELS": "false"}, context))
            elapsed = time.monotonic() - started
        finally:
            hub.close()
    first_code = next(i for i, (instruction, _, _) in enumerate(rebuilt) if instruction.startswith("COPY src/"))
    layer_steps = [(i, cached) for i, (instruction, cached, _) in enumerate(rebuilt)
                   if instruction.split()[0] in ("RUN", "COPY")]
    assert all(cached for i, cached in layer_steps if i < first_code), rebuilt
    assert not any(cached for i, cached in layer_steps if i >= first_code), rebuilt
    hits = sum(cached for _, cached in layer_steps)
    rebuild_label = f"rebuild after a code-only change ({hits}/{len(layer_steps)} RUN/COPY layers from cache)"
    timings.append((rebuild_label, elapsed))
    say(f"STAGE rebuild: {elapsed:.1f} s; cache hits up to COPY src/, rebuilt from there: "
        + ", ".join(f"{instr.split()[0]} {'hit' if cached else 'ran'}" for instr, cached, _ in rebuilt
                    if instr.split()[0] in ("RUN", "COPY")))
    # Drop what the edit made (the rebuilt code layers), so repeated runs do not pile up images.
    new_ids = [layer for instr, cached, layer in rebuilt if layer and not cached]
    buildah("rmi", f"{IMAGE}:rebuild", check=False)
    for layer in reversed(new_ids):
        buildah("rmi", layer, check=False)

    sizes = {tag: buildah("images", "--format", "{{.Size}}", tag).stdout.strip() for tag in (slim, none)}
    print()
    print("image-test summary")
    for name, seconds in timings:
        print(f"  {seconds:8.1f} s  {name}")
    print(f"  {time.monotonic() - total:8.1f} s  total")
    for tag, size in sizes.items():
        print(f"  image {tag}: {size}")
    print("  not proven here: the nvidia/cuda base image itself (a Debian stand-in was used) and anything on a GPU")
    return 0


ENV: dict[str, str] = {}

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--in-netns":
        ENV = dict(os.environ)  # the parent's buildah settings, inherited
        sys.exit(in_netns(sys.argv[2], sys.argv[3], sys.argv[4:]))
    sys.exit(main())
