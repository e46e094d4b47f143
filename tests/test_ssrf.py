"""Hostile URLs for both downloaders: input images (``media.load_image``) and LoRAs (``LoraStore.resolve``).

The rule: only http(s) (and, for images, ``data:image/...;base64,``). Loopback, private, link-local (the
169.254.169.254 metadata service), CGNAT, multicast and unspecified addresses, IPv6 and IPv4-mapped forms included,
are refused after DNS resolution; the connection goes to the address that was checked (no second lookup to rebind);
every redirect is checked again, at most 5 of them. ``RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS`` is the only way to allow
private targets.

No packet goes to a real non-loopback address. Every test here runs with

- a resolver stub (``socket.getaddrinfo``): numeric hosts are parsed by the real ``getaddrinfo`` with
  ``AI_NUMERICHOST`` (which never queries DNS, and also applies the real IDNA encoding), a few test names come from a
  table, and any other name fails the test;
- a connect guard (``socket.socket.connect``/``connect_ex``, ``socket.create_connection``): every attempt is
  recorded; only the addresses a test allows (its own fixture server on 127.0.0.x) are really dialled, the others
  are refused without a system call. "Refused before any connection" is therefore ``guard.attempts == []``.

Private targets are only ever reached for real inside a network namespace this file creates (``unshare -n``) with
10.0.0.1, 169.254.169.254 and fd00::1 on its own loopback, see the last test.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from runpod.serverless.utils import rp_ssrf
from support.images import photo_like, to_bytes

from qwen_worker.errors import InputImageError, LoraError
from qwen_worker.lora_files import LoraStore
from qwen_worker.media import ImageLimits, load_image
from qwen_worker.schema import LoraRequest

SWITCH = "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS"
LIMITS = ImageLimits(max_bytes=2_000_000, max_pixels=4_000_000, timeout_seconds=5)
PNG = to_bytes(photo_like(24, 16))


def tiny_lora() -> bytes:
    """A minimal safetensors file with one tensor whose name mentions lora (what verify_safetensors asks for)."""
    header = json.dumps({"t.lora_A.weight": {"dtype": "F32", "shape": [1, 1], "data_offsets": [0, 4]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0\0\0\0"


LORA = tiny_lora()

# ------------------------------------------------------------------------------------------ resolver and connect guard

_real_getaddrinfo = socket.getaddrinfo


@dataclass
class Network:
    names: dict[str, list[list[str]]] = field(default_factory=dict)  # host -> one answer per lookup (last repeats)
    lookups: list[str] = field(default_factory=list)  # every host name asked for (numeric ones included)
    attempts: list[tuple[str, int]] = field(default_factory=list)  # every connect, allowed or not
    allowed: set[tuple[str, int]] = field(default_factory=set)

    def getaddrinfo(self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        self.lookups.append(name)
        try:  # a literal address: parsed by libc without any DNS query (IDNA errors are raised here too, as for real)
            return _real_getaddrinfo(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
        except socket.gaierror:
            pass
        answers = self.names.get(name.lower())
        if answers is None:
            raise AssertionError(f"the test resolver was asked for an unknown name {name!r}: it would have reached DNS")
        answer = answers[0] if len(answers) == 1 else answers.pop(0)
        results = []
        for ip in answer:
            family_of = socket.AF_INET6 if ":" in ip else socket.AF_INET
            sockaddr = (ip, int(port or 0), 0, 0) if family_of == socket.AF_INET6 else (ip, int(port or 0))
            results.append((family_of, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
        return results

    def lookups_of(self, name: str) -> int:
        return sum(1 for looked_up in self.lookups if looked_up == name)


@pytest.fixture
def net(monkeypatch: pytest.MonkeyPatch) -> Iterator[Network]:
    network = Network()
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def target(address: Any) -> tuple[str, int]:
        host, port = address[0], address[1]
        return str(ipaddress.ip_address(host.split("%")[0])), int(port)

    def guarded_connect(sock: socket.socket, address: Any) -> Any:
        where = target(address)
        network.attempts.append(where)
        if where not in network.allowed:
            raise ConnectionRefusedError(f"test connect guard: {where} is not a fixture server")
        return real_connect(sock, address)

    def guarded_connect_ex(sock: socket.socket, address: Any) -> Any:
        where = target(address)
        network.attempts.append(where)
        if where not in network.allowed:
            return 111  # ECONNREFUSED
        return real_connect_ex(sock, address)

    def no_create_connection(address: Any, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"socket.create_connection{address!r} bypassed the guarded path")

    monkeypatch.setattr(socket, "getaddrinfo", network.getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    monkeypatch.setattr(socket, "create_connection", no_create_connection)
    monkeypatch.delenv(SWITCH, raising=False)
    yield network


def treat_as_public(monkeypatch: pytest.MonkeyPatch, *addresses: str) -> None:
    """Let the SDK's check call these loopback addresses public (only they), to stand in for a public server."""
    original = rp_ssrf.is_safe_address
    monkeypatch.setattr(rp_ssrf, "is_safe_address", lambda ip: ip in addresses or original(ip))


# ------------------------------------------------------------------------------------------------- fixture server


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class Server:
    """An HTTP server on one loopback address; records (path, Host header) of every request."""

    def __init__(self, host: str, routes: dict[str, Reply]) -> None:
        self.routes = routes
        self.seen: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                server.seen.append((self.path, self.headers.get("Host", "")))
                reply = server.routes.get(self.path, Reply(404))
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.host, self.port = host, self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextmanager
def serving(net: Network, host: str, routes: dict[str, Reply]) -> Iterator[Server]:
    server = Server(host, routes)
    net.allowed.add((host, server.port))
    try:
        yield server
    finally:
        server.close()


# ------------------------------------------------------------------------------------------- the two downloaders


def make_store(tmp_path: Path) -> LoraStore:
    return LoraStore(tmp_path / "lora-cache", 10**9, 10**7, tmp_path / "volume", 5)


def fetch(kind: str, url: str, tmp_path: Path) -> Any:
    if kind == "image":
        return load_image(url, LIMITS)
    return make_store(tmp_path).resolve(LoraRequest(url, 1.0), "loras[0]")


def refusal(kind: str, url: str, tmp_path: Path) -> str:
    """The caller-facing message of a refused download; nothing may be left in the LoRA cache."""
    error = InputImageError if kind == "image" else LoraError
    with pytest.raises(error) as caught:
        fetch(kind, url, tmp_path)
    message = str(caught.value)
    assert message.startswith("Invalid image URL (image): " if kind == "image" else "Invalid LoRA (loras[0]): ")
    if kind == "lora":
        assert [p.name for p in (tmp_path / "lora-cache").iterdir()] == []
    return message


def body_for(kind: str) -> bytes:
    return PNG if kind == "image" else LORA


def path_for(kind: str) -> str:
    return "/img.png" if kind == "image" else "/style.safetensors"


def check_fetched(kind: str, result: Any) -> None:
    if kind == "image":
        assert result.size == (24, 16)
    else:
        assert Path(result).read_bytes() == LORA


KINDS = pytest.mark.parametrize("kind", ["image", "lora"])

# ------------------------------------------------------------------------------------------ non-public destinations

NON_PUBLIC_HOSTS = [
    "127.0.0.1", "127.1", "2130706433", "0x7f.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254",
    "100.64.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255", "[::1]", "[fd00::1]", "[fe80::1]", "[fe80::1%251]",
    "[::ffff:10.0.0.1]", "[::ffff:169.254.169.254]", "[::ffff:127.0.0.1]", "[::]", "[ff02::1]", "[64:ff9b::a00:1]",
    "localhost", "LOCALHOST",
]


@KINDS
@pytest.mark.parametrize("host", NON_PUBLIC_HOSTS)
def test_non_public_literal_addresses_are_refused_before_any_connection(kind, host, net, tmp_path):
    net.names["localhost"] = [["127.0.0.1", "::1"]]
    message = refusal(kind, f"http://{host}:8080{path_for(kind)}?token=hunter2", tmp_path)
    assert "non-public address" in message and SWITCH in message
    assert "hunter2" not in message
    assert net.attempts == []


@KINDS
@pytest.mark.parametrize(
    "answer",
    [["1.1.1.1", "10.0.0.1"], ["10.0.0.1", "1.1.1.1"], ["1.1.1.1", "fd00::1"], ["2606:4700::1111", "::1"],
     ["1.1.1.1", "169.254.169.254"], ["::ffff:169.254.169.254"]],
)
def test_a_name_resolving_to_any_non_public_address_is_refused(kind, answer, net, tmp_path):
    net.names["mixed.test"] = [answer]
    message = refusal(kind, f"https://mixed.test{path_for(kind)}", tmp_path)
    assert "non-public address" in message
    assert net.attempts == []  # not even the public address is tried: the whole answer is hostile


@KINDS
def test_a_public_name_does_reach_connect(kind, net, tmp_path):
    """The positive control for the tests above: the guard, not a broken stub, is what stopped them."""
    net.names["public.test"] = [["1.1.1.1", "2606:4700::1111"]]
    message = refusal(kind, f"http://public.test{path_for(kind)}", tmp_path)
    assert "could not connect to public.test" in message
    assert net.attempts == [("1.1.1.1", 80), ("2606:4700::1111", 80)]  # every validated address in turn, no other


@KINDS
def test_the_connection_goes_to_the_checked_address_not_a_second_lookup(kind, net, tmp_path, monkeypatch):
    """DNS rebinding: the first lookup says 127.0.0.2 (treated as public here), any later one says 10.0.0.1.

    The download succeeds from the server on 127.0.0.2, the name was looked up once, and no connection was attempted
    anywhere else: the checked address is the one dialled, with the original Host header.
    """
    treat_as_public(monkeypatch, "127.0.0.2")
    net.names["rebind.test"] = [["127.0.0.2"], ["10.0.0.1"]]
    with serving(net, "127.0.0.2", {path_for(kind): Reply(body=body_for(kind))}) as server:
        check_fetched(kind, fetch(kind, f"http://rebind.test:{server.port}{path_for(kind)}", tmp_path))
        assert server.seen == [(path_for(kind), f"rebind.test:{server.port}")]
    assert net.lookups_of("rebind.test") == 1
    assert net.attempts == [("127.0.0.2", server.port)]


# ------------------------------------------------------------------------------------------------------ redirects

REDIRECT_TARGETS = [
    (302, "http://169.254.169.254/latest/meta-data/", "non-public address 169.254.169.254"),
    (301, "http://metadata.test/latest/meta-data/", "non-public address 169.254.169.254"),
    (307, "https://10.0.0.1/x", "non-public address 10.0.0.1"),
    (308, "http://[::ffff:a9fe:a9fe]/latest/", "non-public address ::ffff:169.254.169.254"),
    (303, "http://[fd00::1]:8080/", "non-public address fd00::1"),
    (302, "http://localhost:{port}/again", "non-public address"),  # back to the very server, by another name
    (302, "ftp://127.0.0.1/x", "blocked URL scheme 'ftp'"),
    (302, "file:///etc/passwd", "blocked URL scheme 'file'"),
    (302, "http://[::1", "malformed"),
]


@KINDS
@pytest.mark.parametrize("status, location, reason", REDIRECT_TARGETS)
def test_every_redirect_is_checked_again(kind, status, location, reason, net, tmp_path, monkeypatch):
    treat_as_public(monkeypatch, "127.0.0.1")
    net.names["metadata.test"] = [["169.254.169.254"]]
    net.names["localhost"] = [["::1"]]
    with serving(net, "127.0.0.1", {}) as server:
        server.routes["/start"] = Reply(status, headers={"Location": location.format(port=server.port)})
        message = refusal(kind, f"http://127.0.0.1:{server.port}/start", tmp_path)
        assert server.seen == [("/start", f"127.0.0.1:{server.port}")]
    if reason == "malformed":
        assert "malformed" in message or "failed (ValueError)" in message, message
    else:
        assert reason in message, message
    assert net.attempts == [("127.0.0.1", server.port)]  # the redirect target was never dialled


@KINDS
@pytest.mark.parametrize("hops, allowed", [(5, True), (6, False)])
def test_redirects_are_bounded_at_five(kind, hops, allowed, net, tmp_path, monkeypatch):
    treat_as_public(monkeypatch, "127.0.0.1")
    routes = {f"/r{i}": Reply(302, headers={"Location": f"/r{i + 1}"}) for i in range(hops)}
    routes[f"/r{hops}"] = Reply(body=body_for(kind))
    with serving(net, "127.0.0.1", routes) as server:
        url = f"http://127.0.0.1:{server.port}/r0"
        if allowed:
            check_fetched(kind, fetch(kind, url, tmp_path))
            assert len(server.seen) == hops + 1
        else:
            assert "exceeded maximum redirects (5)" in refusal(kind, url, tmp_path)
            assert len(server.seen) == 6  # the first request and five redirects, the sixth is not followed


@KINDS
def test_a_redirect_loop_ends_after_five(kind, net, tmp_path, monkeypatch):
    treat_as_public(monkeypatch, "127.0.0.1")
    with serving(net, "127.0.0.1", {"/loop": Reply(302, headers={"Location": "/loop"})}) as server:
        assert "exceeded maximum redirects (5)" in refusal(kind, f"http://127.0.0.1:{server.port}/loop", tmp_path)
        assert len(server.seen) == 6


# -------------------------------------------------------------------------------------------- schemes and shapes


@KINDS
@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.test/x", "file:///etc/passwd", "gopher://127.0.0.1:6379/_INFO", "javascript:alert(1)",
        "data:text/html,<script>alert(1)</script>", "data:text/html;base64,PHNjcmlwdD4=", "dict://127.0.0.1:11211/",
        "ldap://127.0.0.1/", "jar:http://127.0.0.1/x!/", "view-source:http://127.0.0.1/", "HTTPX://example.test/",
    ],
)
def test_other_schemes_are_refused_without_any_lookup(kind, url, net, tmp_path):
    message = refusal(kind, url, tmp_path)
    assert "only http(s)" in message or "data URI must look like" in message or "paths are not supported" in message
    assert net.lookups == [] and net.attempts == []


MALFORMED = [
    "http://[abc/x", "http://example.test:99999/x", "http://example.test:port/x", "http://" + "a" * 64 + ".test/x",
    "http:///x", "http://\udc80.test/x",
]
@pytest.mark.parametrize(
    "kind, url",
    [("image", url) for url in MALFORMED]
    + [("lora", url) for url in MALFORMED],
)
def test_malformed_urls_fail_as_refusals_not_internal_errors(kind, url, net, tmp_path):
    """Each raised ValueError (a bad port, an unclosed IPv6 bracket, an IDNA label over 63 characters or with a lone
    surrogate) from inside the SDK, which media.py let escape as an internal error before this was fixed."""
    refusal(kind, url, tmp_path)
    assert net.attempts == []


# ------------------------------------------------------------------------------------------------------ the switch


@KINDS
@pytest.mark.parametrize("value", [None, "", "0", "false", "no", "maybe"])
@pytest.mark.parametrize(
    "other", [{}, {"ALLOW_PRIVATE_DOWNLOAD_URLS": "true", "RUNPOD_ALLOW_PRIVATE_URLS": "true", "NO_PROXY": "*"}]
)
def test_only_the_sdk_switch_set_true_allows_private_targets(kind, value, other, net, tmp_path, monkeypatch):
    for name, setting in other.items():
        monkeypatch.setenv(name, setting)
    if value is not None:
        monkeypatch.setenv(SWITCH, value)
    with serving(net, "127.0.0.1", {path_for(kind): Reply(body=body_for(kind))}) as server:
        assert "non-public address" in refusal(kind, f"http://127.0.0.1:{server.port}{path_for(kind)}", tmp_path)
        assert server.seen == []
    assert net.attempts == []


@KINDS
@pytest.mark.parametrize("value", ["true", "1", "yes", " TRUE "])
def test_the_switch_allows_loopback(kind, value, net, tmp_path, monkeypatch):
    monkeypatch.setenv(SWITCH, value)
    with serving(net, "127.0.0.1", {path_for(kind): Reply(body=body_for(kind))}) as server:
        check_fetched(kind, fetch(kind, f"http://127.0.0.1:{server.port}{path_for(kind)}", tmp_path))
        assert len(server.seen) == 1


# --------------------------------------------------------------------------------- real private addresses, isolated

NAMESPACE_SCRIPT = r'''
import io, json, os, socket, sys, tempfile, threading, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from support.images import photo_like, to_bytes  # tests/ is on the PYTHONPATH the test gives this script
from test_ssrf import LORA

PNG = to_bytes(photo_like(24, 16))
seen = []

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        seen.append((self.server.server_address[0], self.path))
        body = LORA if self.path.endswith(".safetensors") else PNG
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

class Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6

servers = [ThreadingHTTPServer(("10.0.0.1", 8080), Handler), ThreadingHTTPServer(("169.254.169.254", 80), Handler),
           Server6(("fd00::1", 8080), Handler)]
for server in servers:
    threading.Thread(target=server.serve_forever, daemon=True).start()
bases = ["http://10.0.0.1:8080", "http://169.254.169.254", "http://[fd00::1]:8080"]
report = {"plain": {}, "refused": {}, "allowed": {}, "lora_refused": {}, "lora_allowed": {}}

opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
for base in bases:
    with opener.open(base + "/latest/meta-data/", timeout=5) as response:
        report["plain"][base] = [response.status, response.read() == PNG]

from qwen_worker.errors import InputImageError, LoraError
from qwen_worker.lora_files import LoraStore
from qwen_worker.media import ImageLimits, load_image
from qwen_worker.schema import LoraRequest

limits = ImageLimits(2_000_000, 4_000_000, 5)
cache = Path(tempfile.mkdtemp())
store = LoraStore(cache / "loras", 10**9, 10**7, cache / "volume", 5)

def attempt(key, base, call):
    before = len(seen)
    try:
        outcome = call()
    except (InputImageError, LoraError) as err:
        outcome = str(err)
    report[key][base] = [outcome, len(seen) - before]

os.environ.pop("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", None)
for base in bases:
    attempt("refused", base, lambda: list(load_image(base + "/latest/meta-data/", limits).size))
    attempt("lora_refused", base, lambda: str(store.resolve(LoraRequest(base + "/l.safetensors", 1.0), "loras[0]")))
os.environ["RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS"] = "true"
for base in bases:
    attempt("allowed", base, lambda: list(load_image(base + "/latest/meta-data/", limits).size))
    attempt("lora_allowed", base,
            lambda: len(store.resolve(LoraRequest(base + "/l.safetensors", 1.0), "loras[0]").read_bytes()))
print("REPORT " + json.dumps(report))
'''

NAMESPACE_SETUP = (
    "ip link set lo up && ip addr add 10.0.0.1/32 dev lo && ip addr add 169.254.169.254/32 dev lo"
    " && ip -6 addr add fd00::1/128 dev lo nodad"
)


def _namespace_command() -> tuple[list[str] | None, str]:
    """``unshare -n`` (as root), else ``unshare -r -n`` (an unprivileged user namespace), if either can set up the
    addresses; or None and why not."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return None, "unshare or ip is not installed"
    why = ""
    for unshare in (["unshare", "-n"], ["unshare", "-r", "-n"]):
        try:
            probe = subprocess.run([*unshare, "sh", "-c", NAMESPACE_SETUP], capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as err:
            why = f"{' '.join(unshare)} could not run ({err})"
            continue
        if probe.returncode == 0:
            return unshare, ""
        why = f"{' '.join(unshare)} failed: {probe.stderr.decode(errors='replace').strip()[:300]}"
    return None, why


def test_real_private_addresses_inside_a_network_namespace(tmp_path):
    """Inside its own network namespace (nothing outside it reachable), 10.0.0.1, 169.254.169.254 and fd00::1 live on
    the namespace's loopback, each with a fixture server. Plain urllib reaches all three (so they are real, working
    targets); the worker's image and LoRA downloaders refuse every one without sending a request, and fetch every
    one with RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS=true."""
    unshare, reason = _namespace_command()
    if unshare is None:
        pytest.skip(f"NETWORK NAMESPACE UNAVAILABLE, real private-address test skipped: {reason}")
    script = tmp_path / "namespace_check.py"
    script.write_text(textwrap.dedent(NAMESPACE_SCRIPT))
    env = {k: v for k, v in os.environ.items() if k != SWITCH and "proxy" not in k.lower()}
    env["PYTHONPATH"] = str(Path(__file__).parent)  # tests/: the script imports support.images and this module
    completed = subprocess.run(
        [*unshare, "sh", "-c", NAMESPACE_SETUP + ' && exec "$0" "$1"', sys.executable, str(script)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("REPORT ")]
    assert completed.returncode == 0 and lines, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])
    bases = ["http://10.0.0.1:8080", "http://169.254.169.254", "http://[fd00::1]:8080"]
    for base in bases:
        assert report["plain"][base] == [200, True], report
        for key in ("refused", "lora_refused"):
            message, requests_made = report[key][base]
            assert "non-public address" in message and requests_made == 0, (key, base, report[key][base])
        assert report["allowed"][base] == [[24, 16], 1], report
        assert report["lora_allowed"][base] == [len(LORA), 1], report
