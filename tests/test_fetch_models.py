"""builder/fetch_models.py against a stand-in Hugging Face Hub on 127.0.0.1: no real hub is ever contacted.

The stand-in implements what huggingface_hub 2.4's ``snapshot_download`` actually calls, and nothing more:

- ``GET /api/models/{repo}/revision/{rev}``: ``{"id", "sha", "siblings"}``, to turn a branch or tag into a commit
  (skipped when the revision already is a 40-hex commit);
- ``GET /api/models/{repo}/tree/{commit}?recursive=True``: the file list with sizes, git oids and LFS metadata
  (cached on disk as ``trees/<commit>.json`` afterwards, so a re-run needs only the first call);
- ``HEAD /{repo}/resolve/{commit}/{file}``: ``X-Repo-Commit`` and ``ETag`` (+ ``Content-Length``) for a regular
  file; for an LFS file, like the real Hub, a 302 to a "CDN" on another origin (``localhost`` instead of
  ``127.0.0.1``) carrying ``X-Linked-Etag`` / ``X-Linked-Size``; no ``X-Xet-*`` header, so it is a plain HTTP download;
- ``GET`` of the resolve URL or of the CDN location: the bytes.

fetch_models.py runs in a subprocess (huggingface_hub reads HF_ENDPOINT and friends at import time) with proxies
cleared and a ``sitecustomize`` guard that refuses any name lookup or connection that is not loopback.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from safetensors.numpy import save as safetensors_bytes

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "builder" / "fetch_models.py"
TOKEN = "hf_secret_test_value"
REPO = "Qwen/Qwen-Image"
SHA_MAIN = hashlib.sha1(b"commit main").hexdigest()
SHA_V1 = hashlib.sha1(b"commit v1").hexdigest()
SHA_BROKEN = hashlib.sha1(b"commit broken").hexdigest()
SHA_PLAIN = hashlib.sha1(b"commit plain").hexdigest()
SHARD_1 = "transformer/diffusion_pytorch_model-00001-of-00002.safetensors"
SHARD_2 = "transformer/diffusion_pytorch_model-00002-of-00002.safetensors"

# What a pipeline download must bring, exactly; the stand-in also serves README.md, .gitattributes, a *.bin,
# a *.bin index and an fp16 variant, none of which may be fetched.
WANTED = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/generation_config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/chat_template.jinja",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    SHARD_1,
    SHARD_2,
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
}
UNWANTED = {
    "README.md",
    ".gitattributes",
    "transformer/diffusion_pytorch_model.bin",
    "text_encoder/pytorch_model.bin.index.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
}


# ----------------------------------------------------------------------------------------------- fake pipeline repo


def _weights(seed: int, *names: str, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    return safetensors_bytes({name: rng.standard_normal((size, size)).astype(np.float32) for name in names})


def fake_pipeline(version: str = "a") -> dict[str, bytes]:
    """A small diffusers QwenImagePipeline-shaped repo: configs, tokenizer files, safetensors (one model sharded)."""

    def js(obj: object) -> bytes:
        return json.dumps(obj, indent=1).encode()

    shard_1 = _weights(1, "blocks.0.weight")
    shard_2 = _weights(2, "blocks.1.weight")
    return {
        "model_index.json": js(
            {
                "_class_name": "QwenImagePipeline",
                "_diffusers_version": "0.35.0",
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
                "tokenizer": ["transformers", "Qwen2Tokenizer"],
                "transformer": ["diffusers", "QwenImageTransformer2DModel"],
                "vae": ["diffusers", "AutoencoderKLQwenImage"],
            }
        ),
        "scheduler/scheduler_config.json": js({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0}),
        "text_encoder/config.json": js({"architectures": ["Qwen2_5_VLForConditionalGeneration"]}),
        "text_encoder/generation_config.json": js({"do_sample": False}),
        "text_encoder/model.safetensors": _weights(3, "embed.weight"),
        "text_encoder/pytorch_model.bin.index.json": js({"weight_map": {"embed.weight": "pytorch_model.bin"}}),
        "tokenizer/tokenizer_config.json": js({"tokenizer_class": "Qwen2Tokenizer"}),
        "tokenizer/vocab.json": js({"a": 0, "b": 1}),
        "tokenizer/merges.txt": b"#version: 0.2\na b\n",
        "tokenizer/chat_template.jinja": b"{{ messages }}",
        "transformer/config.json": js({"_class_name": "QwenImageTransformer2DModel", "version": version}),
        "transformer/diffusion_pytorch_model.safetensors.index.json": js(
            {
                "metadata": {"total_size": len(shard_1) + len(shard_2)},
                "weight_map": {"blocks.0.weight": SHARD_1.split("/")[1], "blocks.1.weight": SHARD_2.split("/")[1]},
            }
        ),
        SHARD_1: shard_1,
        SHARD_2: shard_2,
        "transformer/diffusion_pytorch_model.bin": b"PK\x03\x04 pickled weights we must not fetch" * 100,
        "vae/config.json": js({"_class_name": "AutoencoderKLQwenImage"}),
        "vae/diffusion_pytorch_model.safetensors": _weights(4, "decoder.weight"),
        "vae/diffusion_pytorch_model.fp16.safetensors": _weights(5, "decoder.weight", size=8),
        "README.md": b"# Qwen-Image (stand-in)\n",
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    }


# A plain (non-pipeline) model repo with its files at the root, as --extra-repo may name.
PLAIN_MODEL = {
    "config.json": b'{"architectures": ["StableDiffusionSafetyChecker"]}',
    "preprocessor_config.json": b'{"crop_size": 224}',
    "model.safetensors": _weights(6, "vision.weight", size=16),
    "pytorch_model.bin": b"pickle" * 50,
    "README.md": b"# safety checker\n",
}


# The Lightning repo as lightx2v publishes it: LoRA files at the root and in a folder, plus what we must not fetch.
LIGHTNING_REPO = "lightx2v/Qwen-Image-Lightning"
SHA_LIGHTNING = hashlib.sha1(b"commit lightning").hexdigest()
LIGHTNING_FILES = {
    "Qwen-Image-Lightning-8steps-V1.1.safetensors": _weights(7, "transformer_blocks.0.attn.to_q.lora_down.weight"),
    "Qwen-Image-Lightning-4steps-V1.0.safetensors": _weights(8, "transformer_blocks.0.attn.to_q.lora_down.weight"),
    "Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16.safetensors": _weights(9, "x.lora_A.weight"),
    "Qwen-Image-Lightning-8steps-V2.0.safetensors": _weights(10, "y.lora_down.weight"),
    "broken.safetensors": b"<html>not a safetensors file</html>",
    "README.md": b"# Lightning\n",
}
# A ControlNet repo: config.json and the weights at the root (diffusers' QwenImageControlNetModel layout).
CONTROLNET = {
    "config.json": b'{"_class_name": "QwenImageControlNetModel"}',
    "diffusion_pytorch_model.safetensors": _weights(11, "controlnet_blocks.0.weight", size=16),
    "README.md": b"# union\n",
}


# ------------------------------------------------------------------------------------------------- stand-in hub


def _is_lfs(path: str) -> bool:
    return path.endswith((".safetensors", ".bin"))


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    commits: dict[str, dict[str, bytes]]  # commit -> {path: bytes}
    refs: dict[str, str]  # branch/tag -> commit
    private: bool = False  # every request answered 401, whatever the token


@dataclass(frozen=True)
class Seen:
    method: str
    host: str
    path: str
    authorization: str | None


class FakeHub:
    API_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
    API_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/.*)?$")
    RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")

    def __init__(self, repos: dict[str, FakeRepo], port: int = 0) -> None:
        self.repos = repos
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self._blobs = {
            hashlib.sha256(data).hexdigest(): data
            for repo in repos.values()
            for files in repo.commits.values()
            for data in files.values()
        }
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                hub._handle(self, head=False)

            def do_HEAD(self) -> None:  # noqa: N802
                hub._handle(self, head=True)

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def since(self, mark: int) -> list[Seen]:
        with self._lock:
            return list(self.requests[mark:])

    def mark(self) -> int:
        with self._lock:
            return len(self.requests)

    # -- request handling

    def _handle(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        path = urlsplit(req.path).path
        with self._lock:
            self.requests.append(
                Seen("HEAD" if head else "GET", req.headers.get("Host", ""), path, req.headers.get("Authorization"))
            )
        if path.startswith("/cdn/"):
            data = self._blobs.get(path.removeprefix("/cdn/"))
            if data is None:
                return self._send(req, head, 404)
            return self._send(req, head, 200, data)
        for pattern, handler in (
            (self.API_TREE, self._tree),
            (self.API_INFO, self._info),
            (self.RESOLVE, self._resolve),
        ):
            match = pattern.match(path)
            if match:
                repo = self.repos.get(match["repo"])
                if repo is None:
                    return self._send(req, head, 404, headers={"X-Error-Code": "RepoNotFound"})
                if repo.private:
                    headers = {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Invalid username or password."}
                    return self._send(req, head, 401, headers=headers)
                rev = unquote(match["rev"] or "main")
                commit = rev if rev in repo.commits else repo.refs.get(rev)
                if commit is None:
                    return self._send(req, head, 404, headers={"X-Error-Code": "RevisionNotFound"})
                return handler(req, head, match, repo, commit)
        return self._send(req, head, 404)

    def _info(self, req, head, match, repo: FakeRepo, commit: str) -> None:
        files = repo.commits[commit]
        body = {"id": match["repo"], "sha": commit, "private": False, "siblings": [{"rfilename": p} for p in files]}
        self._send(req, head, 200, json.dumps(body).encode(), content_type="application/json")

    def _tree(self, req, head, match, repo: FakeRepo, commit: str) -> None:
        files = repo.commits[commit]
        folders = sorted({p.rsplit("/", 1)[0] for p in files if "/" in p})
        entries: list[dict] = [
            {"type": "directory", "path": folder, "oid": _git_oid(folder.encode()), "size": 0} for folder in folders
        ]
        for path, data in sorted(files.items()):
            entry = {"type": "file", "path": path, "oid": _git_oid(data), "size": len(data)}
            if _is_lfs(path):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._send(req, head, 200, json.dumps(entries).encode(), content_type="application/json")

    def _resolve(self, req, head, match, repo: FakeRepo, commit: str) -> None:
        filename = unquote(match["file"])
        data = repo.commits[commit].get(filename)
        if data is None:
            return self._send(req, head, 404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
        headers = {"X-Repo-Commit": commit, "ETag": f'"{_git_oid(data)}"'}
        if _is_lfs(filename):
            sha256 = hashlib.sha256(data).hexdigest()
            headers.update(
                {
                    "Location": f"http://localhost:{self.port}/cdn/{sha256}",
                    "X-Linked-Etag": f'"{sha256}"',
                    "X-Linked-Size": str(len(data)),
                }
            )
            return self._send(req, head, 302, headers=headers)
        self._send(req, head, 200, data, headers=headers)

    @staticmethod
    def _send(req, head, status, body=b"", headers=None, content_type="application/octet-stream") -> None:
        req.send_response(status)
        req.send_header("Content-Type", content_type)
        req.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            req.send_header(name, value)
        req.end_headers()
        if not head and body:
            req.wfile.write(body)


# ---------------------------------------------------------------------------------------------- subprocess runner

NETWORK_GUARD = '''
"""Loaded by the fetch_models.py subprocess (sitecustomize): refuse anything that is not loopback."""
import socket, sys

_LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}
_LOOPBACK_ADDRS = {"127.0.0.1", "::1"}
_getaddrinfo = socket.getaddrinfo
_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def _blocked(what):
    sys.stderr.write("NETWORK-GUARD: blocked %s\\n" % what)
    sys.stderr.flush()


def getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if name is not None and name not in _LOOPBACK_NAMES:
        _blocked("lookup of %r" % (name,))
        raise socket.gaierror(socket.EAI_NONAME, "blocked by the test network guard")
    return _getaddrinfo(host, *args, **kwargs)


def _check(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOOPBACK_ADDRS:
        _blocked("connection to %r" % (address,))
        raise ConnectionRefusedError("blocked by the test network guard")


def connect(self, address):
    _check(self, address)
    return _connect(self, address)


def connect_ex(self, address):
    _check(self, address)
    return _connect_ex(self, address)


socket.getaddrinfo = getaddrinfo
socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
'''


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    requests: list[Seen]

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("guard")
    (folder / "sitecustomize.py").write_text(NETWORK_GUARD)
    return folder


def hub_env(hf_home: Path, hub_url: str, guard: Path, token: str | None) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("HF_")
        and name not in ("TRANSFORMERS_OFFLINE", "PYTHONPATH")
        and not name.lower().endswith("_proxy")
    }
    env.update(
        HF_ENDPOINT=hub_url,
        HF_HOME=str(hf_home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_ETAG_TIMEOUT="5",
        HF_HUB_DOWNLOAD_TIMEOUT="5",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        PYTHONPATH=str(guard),
        PYTHONUNBUFFERED="1",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    return env


@pytest.fixture(scope="module")
def hub():
    main = fake_pipeline("a")
    v1 = fake_pipeline("b")
    broken = {path: data for path, data in main.items() if path != SHARD_2}  # the index still names shard 2
    server = FakeHub(
        {
            REPO: FakeRepo({SHA_MAIN: main, SHA_V1: v1}, {"main": SHA_MAIN, "v1": SHA_V1}),
            "Qwen/Broken-Image": FakeRepo({SHA_BROKEN: broken}, {"main": SHA_BROKEN}),
            "Qwen/Private": FakeRepo({SHA_MAIN: main}, {"main": SHA_MAIN}, private=True),
            "CompVis/safety-checker": FakeRepo({SHA_PLAIN: PLAIN_MODEL}, {"main": SHA_PLAIN}),
            # What the catalogue names, under the real ids (the files are stand-ins of the right kind).
            LIGHTNING_REPO: FakeRepo(
                {SHA_LIGHTNING: LIGHTNING_FILES, SHA_V1: LIGHTNING_FILES}, {"main": SHA_LIGHTNING, "v1": SHA_V1}
            ),
            "InstantX/Qwen-Image-ControlNet-Union": FakeRepo({SHA_PLAIN: CONTROLNET}, {"main": SHA_PLAIN}),
            "Qwen/Qwen-Image-2.1": FakeRepo({SHA_MAIN: main}, {"main": SHA_MAIN}),
        }
    )
    yield server
    server.close()


@pytest.fixture(scope="module")
def run_fetch(hub, guard_dir):
    def run(*args: str, hf_home: Path, token: str | None = None) -> Run:
        mark = hub.mark()
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), *args],
            env=hub_env(hf_home, hub.url, guard_dir, token),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        time.sleep(0.05)  # let the server threads finish logging
        run_ = Run(proc.returncode, proc.stdout, proc.stderr, hub.since(mark))
        assert "NETWORK-GUARD" not in run_.stderr, run_.stderr
        return run_

    return run


def repo_dir(hub_cache: Path, repo: str = REPO) -> Path:
    return hub_cache / ("models--" + repo.replace("/", "--"))


def files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def downloaded(run_fetch, tmp_path_factory):
    """One real download of Qwen/Qwen-Image (main) into a fresh HF_HOME, with HF_TOKEN set."""
    hf_home = tmp_path_factory.mktemp("hf-home")
    run = run_fetch("--models", "t2i", hf_home=hf_home, token=TOKEN)
    return hf_home, run


# -------------------------------------------------------------------------------------------------------- tests


def test_network_guard_is_active(guard_dir, tmp_path):
    """The guard the fetch subprocesses run under really refuses non-loopback traffic."""
    code = (
        "import socket\ntry:\n    socket.create_connection(('192.0.2.1', 443), timeout=1)\n"
        "except OSError as e:\n    print('refused', e)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=hub_env(tmp_path, "http://127.0.0.1:9", guard_dir, None),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "NETWORK-GUARD: blocked" in proc.stderr and "refused" in proc.stdout


def test_download_lands_in_cache_layout_and_verifies(downloaded):
    hf_home, run = downloaded
    assert run.returncode == 0, run.output
    repo = repo_dir(hf_home / "hub")
    snapshot = repo / "snapshots" / SHA_MAIN
    assert (repo / "refs" / "main").read_text().strip() == SHA_MAIN
    assert files_in(snapshot) == WANTED  # nothing unwanted (README, .bin, bin index, fp16 variant), nothing missing
    assert (snapshot / SHARD_2).read_bytes() == fake_pipeline("a")[SHARD_2]

    fetched = {seen.path.split(f"/resolve/{SHA_MAIN}/", 1)[-1] for seen in run.requests if "/resolve/" in seen.path}
    assert fetched == WANTED and not fetched & UNWANTED
    assert (
        sum(seen.path.startswith("/cdn/") and seen.method == "GET" for seen in run.requests) == 4
    )  # the 4 weight files

    # Report: snapshot path, revision, per-component sizes, total; progress bars even without a terminal.
    assert str(snapshot) in run.stdout and SHA_MAIN in run.stdout
    for component in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert re.search(rf"^\s+{component}\s+[\d.]+ (B|KiB)\s", run.stdout, re.M), run.stdout
    assert re.search(r"total [\d.]+ KiB \(\d+ bytes\): verified OK", run.stdout), run.stdout
    assert f"==> {REPO} @ main" in run.stdout
    assert "Fetching 15 files" in run.stderr

    # The token from HF_TOKEN goes to the Hub, not to the CDN, and never into the output.
    hub_calls = [seen for seen in run.requests if seen.host.startswith("127.0.0.1")]
    cdn_calls = [seen for seen in run.requests if seen.host.startswith("localhost")]
    assert hub_calls and all(seen.authorization == f"Bearer {TOKEN}" for seen in hub_calls)
    assert cdn_calls and all(seen.authorization is None for seen in cdn_calls)
    assert TOKEN not in run.output


def test_second_run_downloads_nothing_and_a_lost_file_is_fetched_alone(downloaded, run_fetch, tmp_path):
    hf_home = tmp_path / "hf"
    shutil.copytree(downloaded[0], hf_home, symlinks=True)

    again = run_fetch("--models", "t2i", hf_home=hf_home)
    assert again.returncode == 0, again.output
    # Only the branch -> commit lookup; the tree listing is cached per commit and every file is already there.
    assert [(s.method, s.path) for s in again.requests] == [("GET", f"/api/models/{REPO}/revision/main")]
    assert "verified OK" in again.stdout

    # A file lost (an interrupted run) is fetched again, and only that one.
    snapshot = repo_dir(hf_home / "hub") / "snapshots" / SHA_MAIN
    blob = (snapshot / SHARD_2).resolve()
    (snapshot / SHARD_2).unlink()
    blob.unlink()
    resumed = run_fetch("--models", "t2i", hf_home=hf_home)
    assert resumed.returncode == 0, resumed.output
    weight_gets = [s.path for s in resumed.requests if s.method == "GET" and s.path.startswith("/cdn/")]
    assert weight_gets == [f"/cdn/{hashlib.sha256(fake_pipeline('a')[SHARD_2]).hexdigest()}"]
    assert [s.path for s in resumed.requests if "/resolve/" in s.path] == [f"/{REPO}/resolve/{SHA_MAIN}/{SHARD_2}"]
    assert (snapshot / SHARD_2).read_bytes() == fake_pipeline("a")[SHARD_2]


def test_missing_shard_fails_verification(run_fetch, tmp_path):
    run = run_fetch("--t2i-repo", "Qwen/Broken-Image", hf_home=tmp_path / "hf")
    assert run.returncode == 1, run.output
    assert "diffusion_pytorch_model-00002-of-00002.safetensors" in run.stderr
    assert "missing" in run.stderr and "Qwen/Broken-Image" in run.stderr
    assert "verified OK" not in run.stdout


def test_models_none_does_nothing(run_fetch, tmp_path):
    run = run_fetch("--models", "none", hf_home=tmp_path / "hf", token=TOKEN)
    assert run.returncode == 0, run.output
    assert run.requests == []
    assert not (tmp_path / "hf").exists()
    assert "nothing to fetch" in run.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--t2i-repo", "Qwen/Private"], "HF_TOKEN missing or lacks access to Qwen/Private"),
        (["--revision-t2i", "no-such-branch"], "repo or revision not found"),
        (["--t2i-repo", "Qwen/No-Such-Repo"], "repo or revision not found"),
    ],
    ids=["401", "unknown-revision", "unknown-repo"],
)
def test_hub_errors_exit_1_with_a_clear_message_and_no_token(run_fetch, tmp_path, args, expected):
    run = run_fetch(*args, hf_home=tmp_path / "hf", token=TOKEN)
    assert run.returncode == 1, run.output
    assert expected in run.stderr, run.stderr
    assert run.requests, "the stand-in hub was never asked"
    assert all(seen.authorization == f"Bearer {TOKEN}" for seen in run.requests)  # the token was used...
    assert TOKEN not in run.output  # ...and never shown
    assert not list((tmp_path / "hf").glob("hub/models--*/snapshots/*"))


def test_branch_revision_pins_refs_main_over_an_earlier_download(downloaded, run_fetch, tmp_path):
    hf_home = tmp_path / "hf"
    shutil.copytree(downloaded[0], hf_home, symlinks=True)  # refs/main names SHA_MAIN here
    (hf_home / "token").write_text("hf_stored_login_token")  # a stored login must be ignored: HF_TOKEN only

    run = run_fetch("--models", "t2i", "--revision-t2i", "v1", hf_home=hf_home)
    assert run.returncode == 0, run.output
    repo = repo_dir(hf_home / "hub")
    assert (repo / "refs" / "v1").read_text().strip() == SHA_V1
    assert (repo / "refs" / "main").read_text().strip() == SHA_V1
    assert files_in(repo / "snapshots" / SHA_V1) == WANTED
    assert all(seen.authorization is None for seen in run.requests)

    from qwen_worker.models import resolve_model

    resolved = resolve_model(REPO, volume_path=tmp_path / "vol", baked_cache=hf_home / "hub")
    assert resolved.path == repo / "snapshots" / SHA_V1 and resolved.revision == SHA_V1


def test_commit_revision_into_a_volume_cache_dir(run_fetch, tmp_path):
    volume = tmp_path / "vol"
    cache = volume / ".cache/huggingface/hub"
    run = run_fetch("--revision-t2i", SHA_V1, "--cache-dir", str(cache), hf_home=tmp_path / "hf")
    assert run.returncode == 0, run.output
    assert not any("/revision/" in seen.path for seen in run.requests)  # a commit needs no lookup
    repo = repo_dir(cache)
    assert (repo / "refs" / "main").read_text().strip() == SHA_V1  # huggingface_hub alone would write no ref
    assert not (tmp_path / "hf" / "hub").exists()

    from qwen_worker.models import resolve_model

    resolved = resolve_model(REPO, volume_path=volume, baked_cache=tmp_path / "baked")
    assert resolved.source == "network volume cache"
    assert resolved.path == repo / "snapshots" / SHA_V1 and resolved.revision == SHA_V1


def test_extra_repo_may_be_a_plain_model(run_fetch, tmp_path):
    run = run_fetch("--models", "none", "--extra-repo", f"CompVis/safety-checker@{SHA_PLAIN}", hf_home=tmp_path / "hf")
    assert run.returncode == 0, run.output
    repo = repo_dir(tmp_path / "hf" / "hub", "CompVis/safety-checker")
    assert files_in(repo / "snapshots" / SHA_PLAIN) == {"config.json", "preprocessor_config.json", "model.safetensors"}
    assert (repo / "refs" / "main").read_text().strip() == SHA_PLAIN
    assert "verified OK" in run.stdout


def test_worker_resolves_the_download_offline(downloaded, tmp_path):
    from qwen_worker.models import resolve_model

    hf_home, run = downloaded
    assert run.returncode == 0, run.output
    resolved = resolve_model(REPO, volume_path=tmp_path / "vol", baked_cache=hf_home / "hub")
    assert resolved.path == repo_dir(hf_home / "hub") / "snapshots" / SHA_MAIN
    assert resolved.revision == SHA_MAIN
    assert resolved.source == "image cache" and resolved.pipeline_class == "QwenImagePipeline"


# ------------------------------------------------------------------------------------- in-process (no hub at all)


@pytest.fixture(scope="module")
def fetch_models():
    import fetch_models as module  # builder/fetch_models.py

    return module


@pytest.mark.parametrize(
    "argv",
    [
        ["--models", "t2i,bogus"],
        ["--models", "none,t2i"],
        ["--extra-repo", "a/b/c"],
        ["--no-such-flag"],
        ["--models", "t2i", "--extra-repo", f"{REPO}@v2"],  # one cache cannot pin two revisions
    ],
)
def test_usage_errors_exit_2(fetch_models, argv, capsys):
    assert fetch_models.main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_plan_takes_the_dockerfile_arguments(fetch_models):
    """The Dockerfile passes every option, with 'none' for the repo of a model it does not bake."""
    parser = fetch_models.build_parser()
    common = ["--t2i-repo", REPO, "--revision-t2i", "main", "--edit-repo", "none", "--revision-edit", "main"]
    assert fetch_models.plan(parser.parse_args(["--models", "t2i", *common])) == [
        fetch_models.Target("t2i", REPO, "main")
    ]
    assert fetch_models.plan(parser.parse_args(["--models", "none", *common])) == []
    both = parser.parse_args(["--models", "t2i,edit,t2i", "--edit-repo", "Qwen/Qwen-Image-Edit-2509"])
    assert [(t.label, t.repo_id, t.revision) for t in fetch_models.plan(both)] == [
        ("t2i", REPO, None),
        ("edit", "Qwen/Qwen-Image-Edit-2509", None),
    ]


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return root


def test_verify_pipeline_folder(fetch_models, tmp_path):
    files = {path: data for path, data in fake_pipeline().items() if path in WANTED}
    folder = write_folder(tmp_path / "ok", files)
    index = json.loads(files["model_index.json"])
    index["safety_checker"] = [None, None]  # optional components left out are fine
    (folder / "model_index.json").write_text(json.dumps(index))
    result = fetch_models.verify_pipeline_folder(folder, report=False)
    assert set(result["components"]) == {"scheduler", "text_encoder", "tokenizer", "transformer", "vae"}
    assert result["components"]["transformer"]["bytes"] == sum(
        len(data) for path, data in files.items() if path.startswith("transformer/")
    )
    assert result["total_bytes"] == sum(len(data) for data in files.values()) - len(files["model_index.json"]) + len(
        (folder / "model_index.json").read_bytes()
    )

    cases = {
        "vae/diffusion_pytorch_model.safetensors": "vae/ has no *.safetensors weights",
        "scheduler/scheduler_config.json": "scheduler/ has no config file",
        SHARD_1: "diffusion_pytorch_model-00001-of-00002.safetensors (listed in transformer/",
    }
    for removed, message in cases.items():
        kept = {p: d for p, d in files.items() if p != removed}
        kept[removed.rsplit("/", 1)[0] + "/notes.txt"] = b"the folder itself is there"
        broken = write_folder(tmp_path / removed.replace("/", "_"), kept)
        with pytest.raises(fetch_models.VerificationError, match=re.escape(message)):
            fetch_models.verify_pipeline_folder(broken, report=False)
    no_tokenizer = write_folder(tmp_path / "no-tok", {p: d for p, d in files.items() if not p.startswith("tokenizer/")})
    with pytest.raises(fetch_models.VerificationError, match=r"tokenizer/ \(Qwen2Tokenizer\) is missing"):
        fetch_models.verify_pipeline_folder(no_tokenizer, report=False)


def test_stale_partial_downloads_are_removed(fetch_models, tmp_path):
    """huggingface_hub never reuses a killed run's blobs/<etag>.<random>.incomplete; an hour-old one is cleared."""
    blobs = tmp_path / "models--Qwen--Qwen-Image" / "blobs"
    blobs.mkdir(parents=True)
    stale, live = blobs / "aaa.1234abcd.incomplete", blobs / "bbb.5678abcd.incomplete"
    stale.write_bytes(b"x" * 10)
    live.write_bytes(b"y" * 10)
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    fetch_models._remove_stale_partials(tmp_path / "models--Qwen--Qwen-Image")
    assert not stale.exists() and live.exists()


# ------------------------------------------------------------------------ the catalogue: every model the worker serves


def test_lightning_names_fetch_their_exact_files_onto_a_volume_the_worker_reads(run_fetch, tmp_path):
    """The 8- and 4-step names fetch those two files and nothing else of the repo, into a volume's cache, where the
    worker's LIGHTNING_LORA spelling (org/name:file) and a job's loras[].path both find them offline."""
    import fetch_models

    volume = tmp_path / "vol"
    cache = volume / ".cache/huggingface/hub"
    names = "lightning-8step,lightning-4step"
    run = run_fetch("--models", names, "--cache-dir", str(cache), hf_home=tmp_path / "hf")
    assert run.returncode == 0, run.output
    wanted = {"Qwen-Image-Lightning-8steps-V1.1.safetensors", "Qwen-Image-Lightning-4steps-V1.0.safetensors"}
    # hf_hub_download asks for /resolve/<revision>/<file>: every file asked for, whatever the revision spelling.
    fetched = {seen.path.split("/resolve/", 1)[1].split("/", 1)[1] for seen in run.requests if "/resolve/" in seen.path}
    assert fetched == wanted
    snapshot = repo_dir(cache, LIGHTNING_REPO) / "snapshots" / SHA_LIGHTNING
    assert files_in(snapshot) == wanted
    assert (snapshot / "Qwen-Image-Lightning-4steps-V1.0.safetensors").read_bytes() == LIGHTNING_FILES[
        "Qwen-Image-Lightning-4steps-V1.0.safetensors"
    ]
    assert "verified OK" in run.stdout

    from qwen_worker.loras import LoraStore
    from qwen_worker.models import resolve_repo_file
    from qwen_worker.schema import LoraRequest

    for name in ("lightning-8step", "lightning-4step"):
        spec = fetch_models.setting(fetch_models.ENTRIES[name])
        found = resolve_repo_file(spec, volume_path=volume, baked_cache=tmp_path / "baked", what="LoRA")
        assert found == snapshot / fetch_models.ENTRIES[name].files[0]
    store = LoraStore(tmp_path / "lora-cache", 10**9, 10**9, volume, 5.0, baked_cache=tmp_path / "baked")
    spec = fetch_models.setting(fetch_models.ENTRIES["lightning-8step"])
    resolved = store.resolve(LoraRequest(spec, 1.0), "loras[0]")
    assert resolved == snapshot / "Qwen-Image-Lightning-8steps-V1.1.safetensors"


def test_a_file_in_a_folder_at_a_pinned_revision_and_a_file_that_is_not_safetensors(run_fetch, tmp_path):
    import fetch_models

    cache = tmp_path / "cache"
    name = "Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16.safetensors"
    assert fetch_models.ENTRIES["lightning-edit-2509-8step"].files == (name,)
    run = run_fetch("--models", "lightning-edit-2509-8step", "--revision", "lightning-edit-2509-8step=v1",
                    "--cache-dir", str(cache), hf_home=tmp_path / "hf")
    assert run.returncode == 0, run.output
    repo = repo_dir(cache, LIGHTNING_REPO)
    assert (repo / "refs" / "main").read_text().strip() == SHA_V1  # the worker reads refs/main: the pinned one
    assert files_in(repo / "snapshots" / SHA_V1) == {name}

    broken = run_fetch("--file", f"{LIGHTNING_REPO}:broken.safetensors", "--cache-dir", str(cache), hf_home=tmp_path)
    assert broken.returncode == 1 and "broken.safetensors is not a safetensors file" in broken.stderr, broken.output
    missing = run_fetch("--file", f"{LIGHTNING_REPO}:nope.safetensors", "--cache-dir", str(cache), hf_home=tmp_path)
    assert missing.returncode == 1 and "nope.safetensors" in missing.stderr, missing.output


def test_controlnet_union_by_name_is_a_root_level_model(run_fetch, tmp_path):
    run = run_fetch("--models", "controlnet-union", hf_home=tmp_path / "hf")
    assert run.returncode == 0, run.output
    snapshot = repo_dir(tmp_path / "hf" / "hub", "InstantX/Qwen-Image-ControlNet-Union") / "snapshots" / SHA_PLAIN
    assert files_in(snapshot) == {"config.json", "diffusion_pytorch_model.safetensors"}

    from qwen_worker.models import resolve_folder

    found = resolve_folder("InstantX/Qwen-Image-ControlNet-Union", volume_path=tmp_path / "vol",
                           baked_cache=tmp_path / "hf" / "hub", required_file="config.json", what="ControlNet")
    assert found.path == snapshot


def test_qwen_image_2_1_needs_the_research_licence_flag(run_fetch, tmp_path):
    refused = run_fetch("--models", "qwen-image-2.1", hf_home=tmp_path / "hf")
    assert refused.returncode == 2 and refused.requests == [], refused.output
    assert "Qwen Research License" in refused.stderr and "--accept-research-license" in refused.stderr
    # The licence follows the repo, whatever name asks for it (the Dockerfile passes --t2i-repo).
    renamed = run_fetch("--t2i-repo", "Qwen/Qwen-Image-2.1", hf_home=tmp_path / "hf")
    assert renamed.returncode == 2 and renamed.requests == [], renamed.output

    accepted = run_fetch("--models", "qwen-image-2.1", "--accept-research-license", hf_home=tmp_path / "hf")
    assert accepted.returncode == 0, accepted.output
    assert files_in(repo_dir(tmp_path / "hf" / "hub", "Qwen/Qwen-Image-2.1") / "snapshots" / SHA_MAIN) == WANTED


def test_the_catalogue_names_every_model_once_with_its_worker_variable(fetch_models):
    names = [entry.name for entry in fetch_models.CATALOGUE]
    assert len(names) == len(set(names))
    variables = {entry.variable for entry in fetch_models.CATALOGUE}
    assert variables == {
        "QWEN_IMAGE_MODEL", "QWEN_IMAGE_EDIT_MODEL", "QWEN_IMAGE_LAYERED_MODEL", "QWEN_IMAGE_CONTROLNET_MODEL",
        "LIGHTNING_LORA", "LIGHTNING_LORA_4STEP", "LIGHTNING_EDIT_LORA", "LIGHTNING_EDIT_LORA_4STEP",
    }
    from qwen_worker.models import parse_repo_file

    for entry in fetch_models.CATALOGUE:
        if entry.kind == "file":  # the worker reads the same spelling the catalogue writes
            assert parse_repo_file(fetch_models.setting(entry)) == (entry.repo, entry.files[0])
            assert entry.files[0].endswith(".safetensors")
    assert [e.name for e in fetch_models.CATALOGUE if e.research_license] == ["qwen-image-2.1"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--file", "lightx2v/Qwen-Image-Lightning"],  # no file
        ["--file", "lightx2v/Qwen-Image-Lightning:../x.safetensors"],
        ["--repo", "bogus=Org/Repo"],
        ["--revision", "t2i"],
        ["--models", "lightning-8step", "--file", f"{LIGHTNING_REPO}@v1:Qwen-Image-Lightning-4steps-V1.0.safetensors"],
    ],
)
def test_catalogue_usage_errors_exit_2(fetch_models, argv, capsys):
    assert fetch_models.main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_files_of_one_repo_are_fetched_together(fetch_models):
    parser = fetch_models.build_parser()
    names = "lightning-8step,lightning-4step,t2i"
    args = parser.parse_args(["--models", names, "--file", f"{LIGHTNING_REPO}:a.safetensors"])
    targets = fetch_models.plan(args)
    assert [(t.repo_id, t.kind, t.files) for t in targets] == [
        (LIGHTNING_REPO, "file", (
            "Qwen-Image-Lightning-8steps-V1.1.safetensors", "Qwen-Image-Lightning-4steps-V1.0.safetensors",
            "a.safetensors",
        )),
        (REPO, "pipeline", ()),
    ]


def test_every_model_in_the_readme_table_names_its_fetch_name_and_build_arg(fetch_models):
    """The README's Models table: each row's repos are in the catalogue, and the row names, for each, the
    ``--models`` name that fetches it and the build argument (= worker variable) that bakes it."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("### Models"):].split("\n\n")[2]
    header, *rows = [line for line in table.splitlines() if line.startswith("| ")]  # "|---" is not "| "
    assert "fetch_models.py --models" in header.split(" | ")[-1] and rows
    covered = set()
    for row in rows:
        weights = row.split(" | ")[-1]
        named = [entry for entry in fetch_models.CATALOGUE if f"`{entry.name}`" in weights]
        assert named, f"no fetch_models name in: {row}"
        for entry in named:
            assert entry.variable in weights, f"{entry.name}: build arg {entry.variable} missing in: {row}"
            covered.add(entry.name)
    assert covered == set(fetch_models.MODEL_CHOICES), set(fetch_models.MODEL_CHOICES) - covered
