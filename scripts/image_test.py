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
- Hub build    the Dockerfile with its defaults and no build argument, as the Runpod Hub builds it: it bakes the
               tiny pipeline served as ``Qwen/Qwen-Image`` by the stand-in hub, and the checker;
- Hub rehearsal  in that image: every ``.runpod/tests.json`` case with that file's env, in one worker, each must be
               COMPLETED with an image; then each ``hub.json`` preset's env (the env inputs' defaults and static
               values, the preset's defaults on top, JSON numbers and booleans as their JSON text) far enough to answer
               a ``dry_run`` per task it configures. The Hub's test endpoint has no cached model; a preset may name one
               repo the image lacks, which is then mounted as the endpoint's one cached model (Runpod allows one). Input
               URLs are replaced by a loopback PNG (no network here), and REQUIRE_CUDA=0 (no GPU). Every check is
               reported; any that fails makes the run fail at the end, after the other stages, naming the file, the
               case and the worker's error;
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
# An input image the jobs refer to: replaced inside the network namespace by a loopback URL serving a small PNG.
FIXTURE_IMAGE = "image-test:fixture-image"

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
    """The tiny checker and the tiny Qwen-Image pipeline under their real repo ids (what a build with no build args,
    the Hub's, fetches), at a fixed port: the port is a build arg, so it must not change between runs or the fetch
    step's cache would never hit."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_fetch_models import FakeHub, FakeRepo  # the Hub protocol fetch_models.py's tests already serve

    repos = {}
    for repo, folder in ((CHECKER_REPO, TINY / "safety-checker"), (PIPELINE_REPO, TINY / "qwen-image")):
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        commit = hashlib.sha1(b"".join(name.encode() + files[name] for name in sorted(files))).hexdigest()
        repos[repo] = FakeRepo(commits={commit: files}, refs={"main": commit})
    return FakeHub(repos, port=HUB_PORT)


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


def serve_jobs(tag: str, mounts: list[str], env: dict[str, str], jobs: list[dict], label: str) -> dict:
    """The image's worker in the SDK's local API mode, offline, answering ``jobs`` over /runsync.

    Both run inside one empty network namespace: this script re-enters itself under ``unshare --net``
    (``--in-netns``), so the client shares the container's loopback and nothing else. Each job is ``{"name", "input",
    "timeout"}``; an input string equal to FIXTURE_IMAGE is replaced by a loopback URL serving a small PNG (the
    namespace has no network, and the worker then needs RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS=true). Returns
    ``{"start": seconds until it listened, "jobs": [{"name", "status", "error", "seconds"}]}``; each job's answer is
    reported, not judged."""
    container = container_for(tag, env)
    try:
        request = CACHE / "tmp" / f"jobs-{label}.json"
        request.write_text(json.dumps(jobs))
        volumes = [arg for mount in mounts for arg in ("-v", mount)]
        done = sh(*no_network(sys.executable, __file__, "--in-netns", container, str(request), label, *volumes),
                  capture=True, check=False, env=ENV, timeout=900)
    finally:
        buildah("rm", container, check=False)
    if done.returncode != 0:
        print((done.stdout + done.stderr)[-8000:])
        raise SystemExit(f"image-test: FAILED: {label}: the worker did not start listening")
    return json.loads(done.stdout.strip().splitlines()[-1])


def serve_and_runsync(tag: str, mounts: list[str], env: dict[str, str]) -> tuple[float, float]:
    """One text-to-image job on the slim worker, which must come back COMPLETED."""
    payload = json.loads((ROOT / "test_input.json").read_text())
    payload["input"]["size"] = "512*512"
    result = serve_jobs(tag, mounts, env, [{"name": "runsync", "input": payload["input"]}], "slim")
    (job,) = result["jobs"]
    if job["status"] != "COMPLETED" or not job["image_url"]:
        raise SystemExit(f"image-test: FAILED: slim runsync: {job}")
    return result["start"], job["seconds"]


def in_netns(container: str, request: str, label: str, volumes: list[str]) -> int:
    """(Inside the empty namespace.) Start the API server in the container, wait, send each job, print the results."""
    sys.path.insert(0, str(ROOT / "tests"))
    from support.file_server import file_server
    from support.images import photo_like, to_bytes

    log_path = CACHE / "logs" / f"api-server-{label}.log"
    log = open(log_path, "w")  # noqa: SIM115 - the server's stdout until it is stopped
    started = time.monotonic()
    server = subprocess.Popen(
        ["buildah", "run", *volumes, container, "--", "python", "handler.py", "--rp_serve_api",
         "--rp_api_host", "127.0.0.1", "--rp_api_port", str(API_PORT)],
        stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True,
    )
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"API server exited {server.returncode}: {log_path.read_text()[-4000:]}")
            if time.monotonic() - started > 600:
                raise SystemExit("API server did not listen within 600 s")
            try:
                with socket.create_connection(("127.0.0.1", API_PORT), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        start = time.monotonic() - started
        results = []
        with file_server() as files:
            fixture = files.add("/input.png", to_bytes(photo_like(128, 96)))
            for job in json.loads(Path(request).read_text()):
                payload = with_fixture(job["input"], fixture)
                began = time.monotonic()
                req = urllib.request.Request(
                    f"http://127.0.0.1:{API_PORT}/runsync", data=json.dumps({"input": payload}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(req, timeout=min(job.get("timeout", 600_000) / 1000, 600)) as response:
                    body = json.loads(response.read())
                output = body.get("output") if isinstance(body.get("output"), dict) else {}
                results.append({
                    "name": job["name"],
                    "status": body.get("status"),
                    "error": body.get("error") or output.get("error"),
                    "image_url": bool(output.get("image_url")),
                    "dry_run": bool(output.get("dry_run")),
                    "seconds": time.monotonic() - began,
                })
        print(json.dumps({"start": start, "jobs": results}))
        return 0
    finally:
        os.killpg(server.pid, 15)  # our own session: the buildah run we started and its child
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()
        log.close()


# --------------------------------------------------------------------------------------------- the Hub rehearsal


def hub_env(entries: list[dict]) -> dict[str, str]:
    """hub.json's ``env``: each static ``value`` and each input's ``default``, as the endpoint would receive them."""
    env = {}
    for entry in entries:
        value = entry["value"] if "value" in entry else entry.get("input", {}).get("default")
        if value is not None:
            env[entry["key"]] = env_string(value)
    return env


def env_string(value: object) -> str:
    """A Hub value as the worker's environment holds it: JSON numbers and booleans become their JSON text."""
    return value if isinstance(value, str) else json.dumps(value)


def rehearsal_env(env: dict[str, str]) -> dict[str, str]:
    """What the rehearsal adds to an endpoint's env: no GPU here (REQUIRE_CUDA=0 overrides whatever is set), two steps
    on the tiny pipelines unless the env chooses, and loopback input images (the namespace has no network)."""
    return {"DEFAULT_STEPS": RUN_ENV["DEFAULT_STEPS"], **env, "REQUIRE_CUDA": "0",
            "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS": "true"}


def offline_input(value: object) -> object:
    """A test's input with each http(s) URL replaced by the loopback fixture (the real file cannot be fetched here)."""
    if isinstance(value, dict):
        return {key: offline_input(item) for key, item in value.items()}
    if isinstance(value, list):
        return [offline_input(item) for item in value]
    return FIXTURE_IMAGE if isinstance(value, str) and re.match(r"https?://", value) else value


def with_fixture(value: object, url: str) -> object:
    """(Inside the namespace.) FIXTURE_IMAGE replaced by the loopback URL serving it."""
    if isinstance(value, dict):
        return {key: with_fixture(item, url) for key, item in value.items()}
    if isinstance(value, list):
        return [with_fixture(item, url) for item in value]
    return url if value == FIXTURE_IMAGE else value


# The worker variables that name a model, and the tiny pipeline standing in for each real repo id.
MODEL_VARIABLES = (
    "QWEN_IMAGE_MODEL", "QWEN_IMAGE_EDIT_MODEL", "QWEN_IMAGE_LAYERED_MODEL", "QWEN_IMAGE_CONTROLNET_MODEL",
)
TINY_STANDINS = {
    "Qwen/Qwen-Image": "qwen-image",
    "Qwen/Qwen-Image-2512": "qwen-image",
    "Qwen/Qwen-Image-Edit": "qwen-image-edit",
    "Qwen/Qwen-Image-Edit-2509": "qwen-image-edit-plus",
    "Qwen/Qwen-Image-Edit-2511": "qwen-image-edit-plus",
    "Qwen/Qwen-Image-Layered": "qwen-image-layered",
    "Qwen/Qwen-Image-2.1": "qwen-image-2.1",
    "InstantX/Qwen-Image-ControlNet-Union": "qwen-image-controlnet",
}


def cached_model_volume(repo: str) -> Path:
    """A volume holding ``repo``'s tiny stand-in where Runpod puts an endpoint's cached model."""
    volume = CACHE / "tmp" / f"cached-model-{repo.replace('/', '--')}"
    snapshot = volume / "huggingface-cache/hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / ("c" * 40)
    if not snapshot.is_dir():
        shutil.copytree(TINY / TINY_STANDINS[repo], snapshot)
        sh("chmod", "-R", "a+rX", str(volume))
    return volume


def hub_rehearsal(tag: str) -> list[str]:
    """Every .runpod/tests.json case with its env, and a dry_run per task of each hub.json preset, in the image the
    Hub builds. Returns one line per check that did not complete, each naming the file, the case and the error."""
    hub = json.loads((ROOT / ".runpod/hub.json").read_text())
    tests = json.loads((ROOT / ".runpod/tests.json").read_text())
    failures: list[str] = []

    def report(source: str, result: dict, want: str) -> None:
        say(f"STAGE Hub rehearsal, {source}: worker listening after {result['start']:.1f} s")
        said: set[str] = set()
        for job in result["jobs"]:
            ok = job["status"] == "COMPLETED" and job[want]
            line = f"{source} / {job['name']}: {job['status']} in {job['seconds']:.2f} s"
            if not ok:
                error = str(job["error"] or f"no {want} in the output")
                line += ": " + ("(the same error)" if error in said else error)
                if "could not start" in error and error not in said:
                    line += (" [a default build (the Hub's) bakes only Qwen/Qwen-Image and the checker: tests.json "
                             "may use only those; a preset may add one repo, the endpoint's one cached model]")
                said.add(error)
                failures.append(line)
            say(("   ok  " if ok else "   FAILED  ") + line)

    # The Hub's test endpoint has no cached model (tests.json has no field for one): only what the image holds.
    env = {entry["key"]: env_string(entry["value"]) for entry in tests["config"].get("env", [])}
    jobs = [{"name": case["name"], "input": offline_input(case["input"]), "timeout": case.get("timeout", 600_000)}
            for case in tests["tests"]]
    started = time.monotonic()
    report(".runpod/tests.json", serve_jobs(tag, [], rehearsal_env(env), jobs, "hub-tests"), "image_url")
    timings.append((f"Hub rehearsal: .runpod/tests.json, {len(jobs)} case(s), one worker", time.monotonic() - started))

    base = hub_env(hub["config"].get("env", []))
    for index, preset in enumerate(hub["config"].get("presets", [])):
        env = {**base, **{key: env_string(value) for key, value in preset.get("defaults", {}).items()}}
        # A deployer may add one cached model to an endpoint made from a preset (Runpod allows one per endpoint): a
        # preset may name one repo the default build lacks, which then comes from Runpod's cached-model folder.
        wanted = [env[name] for name in MODEL_VARIABLES if env.get(name, "none").lower() not in ("none", "")]
        missing = [repo for repo in dict.fromkeys(wanted) if repo != PIPELINE_REPO]
        mounts, label = [], f"hub.json preset {preset['name']!r}"
        if len(missing) == 1 and missing[0] in TINY_STANDINS:
            mounts = [f"{cached_model_volume(missing[0])}:/runpod-volume:ro"]
            label += f" (+ cached model {missing[0]})"
        jobs = []
        if env.get("QWEN_IMAGE_MODEL", "Qwen/Qwen-Image").lower() not in ("none", ""):
            jobs.append({"name": "text-to-image dry_run", "input": {"prompt": "a rehearsal", "dry_run": True}})
        if env.get("QWEN_IMAGE_EDIT_MODEL", "none").lower() not in ("none", ""):
            jobs.append({"name": "edit dry_run",
                         "input": {"prompt": "a rehearsal", "image": FIXTURE_IMAGE, "dry_run": True}})
        if not jobs:  # a preset serving neither: the worker's answer to a text-to-image dry_run says what it serves
            jobs.append({"name": "text-to-image dry_run", "input": {"prompt": "a rehearsal", "dry_run": True}})
        started = time.monotonic()
        result = serve_jobs(tag, mounts, rehearsal_env(env), jobs, f"hub-preset-{index}")
        report(label, result, "dry_run")
        timings.append((f"Hub rehearsal: preset {preset['name']!r} (dry_run)", time.monotonic() - started))
    return failures


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
        slim, none, hub_tag = f"{IMAGE}:slim", f"{IMAGE}:checker-none", f"{IMAGE}:hub"
        started = time.monotonic()
        build(base, slim, {"BAKE_MODELS": "false"})
        stage("build (slim: BAKE_MODELS=false, checker baked)", started)
        started = time.monotonic()
        build(base, none, {"BAKE_MODELS": "false", "SAFETY_CHECKER_MODEL": "none"})
        stage("build (checker-none: SAFETY_CHECKER_MODEL=none)", started)
        started = time.monotonic()
        build(base, hub_tag, {})  # the Hub passes no build arguments
        stage("build (Hub: Dockerfile defaults, no build args; bakes the tiny Qwen/Qwen-Image)", started)
    finally:
        hub.close()

    for tag, checker, pipeline in ((slim, CHECKER_REPO, False), (none, "none", False), (hub_tag, CHECKER_REPO, True)):
        env = dict(item.split("=", 1) for item in image_config(tag)["Env"])
        assert env.get("SAFETY_CHECKER_MODEL") == checker, (tag, env.get("SAFETY_CHECKER_MODEL"))
        container = buildah("from", "--pull-never", tag).stdout.strip().splitlines()[-1]
        try:
            mount = Path(buildah("mount", container).stdout.strip())
            assert not (mount / "app/build").exists(), f"{tag}: /app/build left behind"
            hub_cache = mount / "models/huggingface/hub"
            baked = hub_cache / ("models--" + CHECKER_REPO.replace("/", "--"))
            assert baked.is_dir() == (checker != "none"), f"{tag}: checker baked? {baked.is_dir()}"
            baked = hub_cache / ("models--" + PIPELINE_REPO.replace("/", "--"))
            assert baked.is_dir() == pipeline, f"{tag}: {PIPELINE_REPO} baked? {baked.is_dir()}"
            others = sorted(p.name for p in hub_cache.glob("models--*")) if hub_cache.is_dir() else []
            assert len(others) == (checker != "none") + pipeline, f"{tag}: baked {others}"
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

    # The Runpod Hub's own path: its build (above), then its tests and presets in that image. Reported here, judged
    # at the end, so that a fault in the .runpod files does not hide the stages after it.
    hub_failures = hub_rehearsal(hub_tag)

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

    sizes = {tag: buildah("images", "--format", "{{.Size}}", tag).stdout.strip() for tag in (slim, none, hub_tag)}
    print()
    print("image-test summary")
    for name, seconds in timings:
        print(f"  {seconds:8.1f} s  {name}")
    print(f"  {time.monotonic() - total:8.1f} s  total")
    for tag, size in sizes.items():
        print(f"  image {tag}: {size}")
    print("  not proven here: the nvidia/cuda base image itself (a Debian stand-in was used) and anything on a GPU")
    if hub_failures:
        print()
        print(f"Hub rehearsal: {len(hub_failures)} check(s) did not complete in the image the Hub builds:")
        for line in hub_failures:
            print(f"  - {line}")
        print("image-test: FAILED: the Runpod Hub's tests or presets would fail (fix .runpod/hub.json / tests.json, "
              "or what they need from the image)")
        return 1
    return 0


ENV: dict[str, str] = {}

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--in-netns":
        ENV = dict(os.environ)  # the parent's buildah settings, inherited
        sys.exit(in_netns(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]))
    sys.exit(main())
