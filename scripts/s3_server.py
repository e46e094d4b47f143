#!/usr/bin/env python3
"""A private, SigV4-checking S3-compatible server on 127.0.0.1 for tests and benchmarks.

It runs OpenStack Swift (Debian packages; install with ``scripts/install_s3_server.sh``) with the ``s3api``
and ``tempauth`` middlewares: one memcached, one proxy, one account, one container and one object server,
each on its own free 127.0.0.1 port. Everything (configs, rings, data, logs, pid files) lives under a work
directory, so several instances with different work directories can run side by side.

Standard library only; the Swift servers run under the system Python that the Swift packages use.

CLI::

    python scripts/s3_server.py start  --dir DIR [--port N] [--timeout S]   # prints one JSON line
    python scripts/s3_server.py status --dir DIR                            # JSON; rc 0 running, 3 stopped, 1 degraded
    python scripts/s3_server.py stop   --dir DIR

API::

    info = start(Path("/tmp/s3"), port=None, timeout=30)   # -> S3ServerInfo
    ...  boto3.client("s3", endpoint_url=info.endpoint_url, aws_access_key_id=info.access_key,
    ...               aws_secret_access_key=info.secret_key, region_name=info.region, ...)
    stop(Path("/tmp/s3"))                                  # safe to call twice

The S3 access key is ``test:tester`` (tempauth ``account:user``) and the secret is that user's tempauth
password, random per start unless ``secret_key=`` is given. Data in DIR/data survives a stop/start.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import hmac
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["S3ServerError", "S3ServerInfo", "running", "start", "status", "stop"]

REGION = "us-east-1"
ACCOUNT = "test"
USER = "tester"
ACCESS_KEY = f"{ACCOUNT}:{USER}"

SWIFT_SERVERS = ("account-server", "container-server", "object-server", "proxy-server")
SERVICES = ("memcached",) + SWIFT_SERVERS
_RING_FOR = {"account-server": "account", "container-server": "container", "object-server": "object"}
_STATE_VERSION = 1
_STOP_TERM_WAIT = 10.0
_STOP_KILL_WAIT = 5.0


class S3ServerError(RuntimeError):
    """The server could not be started (the message carries the tail of the logs)."""


@dataclasses.dataclass(frozen=True)
class S3ServerInfo:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    workdir: Path


# --------------------------------------------------------------------------------------------------------------
# Paths and small helpers
# --------------------------------------------------------------------------------------------------------------


class _Layout:
    def __init__(self, workdir: Path) -> None:
        self.root = Path(workdir).resolve()
        self.etc = self.root / "etc"
        self.data = self.root / "data"
        self.device = self.data / "d1"
        self.logs = self.root / "logs"
        self.run = self.root / "run"
        self.cache = self.root / "cache"
        self.bin = self.root / "bin"
        self.state = self.run / "state.json"
        self.lock = self.run / "lock"
        self.launcher = self.bin / "swift_launch.py"

    def conf(self, server: str) -> Path:
        return self.etc / f"{server}.conf"

    def log(self, service: str) -> Path:
        return self.logs / f"{service}.log"

    def pidfile(self, service: str) -> Path:
        return self.run / f"{service}.pid"

    def mkdirs(self) -> None:
        for d in (self.etc, self.device, self.logs, self.run, self.cache, self.bin):
            d.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def _locked(layout: _Layout) -> Iterator[None]:
    layout.run.mkdir(parents=True, exist_ok=True)
    with open(layout.lock, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _swift_python() -> str:
    """The interpreter the Swift packages run under (the shebang of swift-proxy-server)."""
    exe = shutil.which("swift-proxy-server") or "/usr/bin/swift-proxy-server"
    try:
        with open(exe, "rb") as fh:
            first = fh.readline().decode("utf-8", "replace").strip()
        if first.startswith("#!"):
            parts = first[2:].split()
            if parts and parts[0].endswith("/env") and len(parts) > 1:
                found = shutil.which(parts[1])
                if found:
                    return found
            elif parts and os.path.isabs(parts[0]) and os.access(parts[0], os.X_OK):
                return parts[0]
    except OSError:
        pass
    return "/usr/bin/python3"


def _check_installed() -> tuple[str, str]:
    memcached = shutil.which("memcached") or "/usr/bin/memcached"
    if not os.access(memcached, os.X_OK):
        memcached = None
    missing = [b for b in ("swift-proxy-server",) if not shutil.which(b) and not os.path.exists(f"/usr/bin/{b}")]
    if memcached is None:
        missing.append("memcached")
    py = _swift_python()
    if not os.access(py, os.X_OK):
        missing.append(py)
    if missing:
        raise S3ServerError(
            f"Swift/memcached not installed: missing {', '.join(missing)}; run scripts/install_s3_server.sh as root"
        )
    return py, memcached  # type: ignore[return-value]


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV",
                        "PYTHONSAFEPATH", "PYTHONNOUSERSITE")}
    env["PYTHONNOUSERSITE"] = "1"
    env.setdefault("LANG", "C.UTF-8")
    return env


def _free_ports(count: int, exclude: set[int]) -> list[int]:
    """`count` distinct ports that are free on 127.0.0.1 right now (held open together while choosing)."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port in exclude or port in ports or port == 11211:
                continue
            ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _check_xattr(path: Path) -> None:
    probe = path / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.swift.probe", b"1")
        if os.getxattr(probe, "user.swift.probe") != b"1":
            raise OSError(errno.EIO, "xattr read back differs")
    except OSError as e:
        raise S3ServerError(
            f"{path} does not support user extended attributes ({e}); Swift's object server needs them. "
            "Use a work directory on a real disk (ext4/xfs/btrfs), not an old tmpfs or overlay without xattrs."
        ) from e
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


# --------------------------------------------------------------------------------------------------------------
# /proc inspection (identity of recorded PIDs, listening sockets)
# --------------------------------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgrp, starttime) of a process, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    rest = raw[raw.rfind(")") + 2:].split()
    # fields after "(comm)": state(3) ppid(4) pgrp(5) ... starttime(22)
    return rest[0], int(rest[2]), int(rest[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _is_ours(rec: dict) -> bool:
    """Is the recorded process still the one we started (same PID *and* start time, not a zombie)?"""
    st = _proc_stat(rec["pid"])
    return st is not None and st[0] != "Z" and st[2] == rec["starttime"]


def _group_members(rec: dict) -> list[int]:
    """Live processes of the recorded process group that we started (leader, forked workers, orphans)."""
    members = []
    marker = rec.get("marker", "")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        st = _proc_stat(pid)
        if st is None or st[0] == "Z" or st[1] != rec["pid"]:
            continue
        if pid == rec["pid"]:
            if st[2] == rec["starttime"]:
                members.append(pid)
        elif st[2] >= rec["starttime"] and marker and marker in _cmdline(pid):
            members.append(pid)
    return members


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _hex_addr(hexaddr: str) -> tuple[str, int]:
    ip_hex, port_hex = hexaddr.split(":")
    raw = bytes.fromhex(ip_hex)
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, struct.pack("=I", struct.unpack(">I", raw)[0]))
    else:
        words = struct.unpack(">4I", raw)
        ip = socket.inet_ntop(socket.AF_INET6, struct.pack("=4I", *words))
    return ip, int(port_hex, 16)


def _bound_sockets() -> dict[int, tuple[str, str, int]]:
    """inode -> (proto, ip, port) for TCP listeners and all bound UDP sockets in this network namespace."""
    out: dict[int, tuple[str, str, int]] = {}
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) < 10:
                continue
            if proto.startswith("tcp") and cols[3] != "0A":  # LISTEN
                continue
            ip, port = _hex_addr(cols[1])
            out[int(cols[9])] = (proto, ip, port)
    return out


def _listening(pids: list[int]) -> list[tuple[str, str, int]]:
    table = _bound_sockets()
    found = []
    for pid in pids:
        for inode in _socket_inodes(pid):
            if inode in table:
                found.append(table[inode])
    return found


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------

_LAUNCHER = r'''"""Generated by scripts/s3_server.py: run a Swift server (or build rings) against a private swift_dir.

Swift reads /etc/swift/swift.conf unconditionally and logs to syslog; this wrapper points it at
<workdir>/etc/swift.conf and turns the syslog handler into an append-only log file.
"""
import logging
import os
import sys
import time

mode, swift_dir = sys.argv[1], sys.argv[2]

from swift.common import utils  # noqa: E402

utils.SWIFT_CONF_FILE = os.path.join(swift_dir, "swift.conf")
utils.HASH_PATH_PREFIX = b""
utils.HASH_PATH_SUFFIX = b""
utils.validate_configuration()
from swift.common import constraints, storage_policy  # noqa: E402

storage_policy.reload_storage_policies()
constraints.reload_constraints()


def build_rings(part_power, ports):
    from swift.common.ring import RingBuilder
    for name, port in ports.items():
        builder = RingBuilder(part_power, 1, 1)
        builder.add_dev({"region": 1, "zone": 1, "ip": "127.0.0.1", "port": port,
                         "replication_ip": "127.0.0.1", "replication_port": port,
                         "device": "d1", "weight": 100.0, "meta": ""})
        builder.rebalance()
        builder.get_ring().save(os.path.join(swift_dir, name + ".ring.gz"))
        builder.save(os.path.join(swift_dir, name + ".builder"))


if mode == "rings":
    # also proves that the middlewares this server needs are importable
    import swift.common.middleware.s3api.s3api  # noqa: F401
    import swift.common.middleware.tempauth  # noqa: F401
    import xattr  # noqa: F401
    part_power = int(sys.argv[3])
    ports = dict((kv.split("=")[0], int(kv.split("=")[1])) for kv in sys.argv[4:])
    build_rings(part_power, ports)
    sys.exit(0)

server, conf_file, log_file = sys.argv[3], sys.argv[4], sys.argv[5]


class _FileHandler(logging.FileHandler):
    """Stands in for swift's ThreadSafeSysLogHandler; keeps its own fd, so capture_stdio() cannot close it."""

    def __init__(self, *args, **kwargs):
        logging.FileHandler.__init__(self, log_file)

    def format(self, record):
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        return "%s.%03d %s" % (ts, int(record.msecs), logging.FileHandler.format(self, record))


utils.ThreadSafeSysLogHandler = _FileHandler

from swift.common.wsgi import run_wsgi  # noqa: E402

kwargs = {}
if server == "object-server":
    from swift.obj import server as object_server
    kwargs["global_conf_callback"] = object_server.global_conf_callback
sys.exit(run_wsgi(conf_file, server, **kwargs))
'''


def _swift_conf() -> str:
    return (
        "[swift-hash]\n"
        "swift_hash_path_suffix = s3-server-local-suffix\n"
        "swift_hash_path_prefix = s3-server-local-prefix\n\n"
        "[storage-policy:0]\nname = Policy-0\ndefault = yes\n\n"
        "[swift-constraints]\n"
    )


def _common_default(layout: _Layout, name: str, port: int, workers: int) -> str:
    user = _current_user()
    return (
        "[DEFAULT]\n"
        f"bind_ip = 127.0.0.1\n"
        f"bind_port = {port}\n"
        "bind_timeout = 3\n"
        f"workers = {workers}\n"
        f"user = {user}\n"
        f"swift_dir = {layout.etc}\n"
        f"devices = {layout.data}\n"
        "mount_check = false\n"
        "disable_fallocate = true\n"
        "fallocate_reserve = 0\n"
        f"recon_cache_path = {layout.cache}\n"
        f"log_name = {name}\n"
        "log_level = INFO\n"
        "log_facility = LOG_LOCAL0\n"
        "eventlet_debug = false\n\n"
    )


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _storage_conf(layout: _Layout, server: str, port: int) -> str:
    egg = _RING_FOR[server]
    return (
        _common_default(layout, server, port, workers=0)
        + "[pipeline:main]\n"
        f"pipeline = healthcheck {server}\n\n"
        f"[app:{server}]\nuse = egg:swift#{egg}\n\n"
        "[filter:healthcheck]\nuse = egg:swift#healthcheck\n"
    )


def _proxy_conf(layout: _Layout, port: int, memcached_port: int, secret: str, workers: int) -> str:
    filters = {
        "catch_errors": "catch_errors",
        "gatekeeper": "gatekeeper",
        "healthcheck": "healthcheck",
        "proxy-logging": "proxy_logging",
        "listing_formats": "listing_formats",
        "copy": "copy",
        "slo": "slo",
        "dlo": "dlo",
    }
    text = _common_default(layout, "proxy-server", port, workers=workers)
    text += (
        "[pipeline:main]\n"
        "pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats s3api tempauth "
        "copy slo dlo proxy-logging proxy-server\n\n"
        "[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n"
        "node_timeout = 10\nconn_timeout = 2\n\n"
        "[filter:cache]\nuse = egg:swift#memcache\n"
        f"memcache_servers = 127.0.0.1:{memcached_port}\n\n"
        "[filter:tempauth]\nuse = egg:swift#tempauth\n"
        f"user_{ACCOUNT}_{USER} = {secret} .admin\n\n"
        "[filter:s3api]\nuse = egg:swift#s3api\n"
        f"location = {REGION}\n"
        "storage_domain = localhost\n\n"
    )
    for name, egg in filters.items():
        text += f"[filter:{name}]\nuse = egg:swift#{egg}\n\n"
    return text


# --------------------------------------------------------------------------------------------------------------
# SigV4 readiness probe (stdlib)
# --------------------------------------------------------------------------------------------------------------


def _signed_list_buckets(port: int, access_key: str, secret_key: str, region: str, timeout: float) -> tuple[int, bytes]:
    now = datetime.datetime.now(datetime.UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = now.strftime("%Y%m%d")
    host = f"127.0.0.1:{port}"
    payload = hashlib.sha256(b"").hexdigest()
    signed_headers = "host;x-amz-content-sha256;x-amz-date"
    canonical_headers = f"host:{host}\nx-amz-content-sha256:{payload}\nx-amz-date:{amz_date}\n"
    canonical = f"GET\n/\n\n{canonical_headers}\n{signed_headers}\n{payload}"
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_key).encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers = {
        "Host": host,
        "x-amz-date": amz_date,
        "x-amz-content-sha256": payload,
        "Authorization": f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed_headers}, "
        f"Signature={signature}",
    }
    return _http("GET", port, "/", headers, timeout)


def _http(method: str, port: int, path: str, headers: dict[str, str] | None, timeout: float) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------------------------
# State, start, stop, status
# --------------------------------------------------------------------------------------------------------------

_POPENS: dict[tuple[str, int], subprocess.Popen] = {}


def _read_state(layout: _Layout) -> dict | None:
    try:
        state = json.loads(layout.state.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
        return None
    return state


def _save_state(layout: _Layout, state: dict) -> None:
    _write_atomic(layout.state, json.dumps(state, indent=2, sort_keys=True) + "\n")
    for name, rec in state.get("services", {}).items():
        _write_atomic(layout.pidfile(name), f"{rec['pid']}\n")


def _spawn(layout: _Layout, state: dict, name: str, argv: list[str], marker: str) -> None:
    with open(layout.log(name), "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {name}: {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=str(layout.root),
            env=_child_env(), start_new_session=True, close_fds=True,
        )
    _POPENS[(str(layout.root), proc.pid)] = proc
    st = None
    for _ in range(100):  # /proc entry appears immediately after fork; be tolerant anyway
        st = _proc_stat(proc.pid)
        if st is not None:
            break
        time.sleep(0.01)
    state["services"][name] = {
        "pid": proc.pid,
        "starttime": st[2] if st else -1,
        "marker": marker,
        "port": state["ports"][name],
    }
    _save_state(layout, state)


def _reap(layout: _Layout) -> None:
    for key in [k for k in _POPENS if k[0] == str(layout.root)]:
        proc = _POPENS[key]
        if proc.poll() is not None:
            del _POPENS[key]


def _log_size(layout: _Layout, name: str) -> int:
    try:
        return layout.log(name).stat().st_size
    except OSError:
        return 0


def _logs_tail(layout: _Layout, lines: int = 25, since: dict[str, int] | None = None) -> str:
    """The last `lines` lines of each service log, counting only what was written after `since` offsets."""
    chunks = []
    for name in SERVICES:
        path = layout.log(name)
        try:
            with open(path, "rb") as fh:
                fh.seek((since or {}).get(name, 0))
                text = fh.read().decode("utf-8", "replace").splitlines()
        except OSError:
            continue
        if text:
            chunks.append(f"==> {path} <==\n" + "\n".join(text[-lines:]))
    return "\n".join(chunks) if chunks else "(no logs)"


class _PortConflict(Exception):
    pass


def _stop_locked(layout: _Layout) -> None:
    state = _read_state(layout)
    records: dict[str, dict] = dict(state.get("services", {})) if state else {}
    groups = {name: _group_members(rec) for name, rec in records.items() if rec.get("starttime", -1) >= 0}
    alive = {name: pids for name, pids in groups.items() if pids}

    def signal_all(sig: int) -> None:
        for name, pids in alive.items():
            leader = records[name]["pid"]
            if leader in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(leader, sig)  # every server runs in its own session: pgid == leader pid
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)

    def wait_gone(deadline: float) -> bool:
        while True:
            for key in [k for k in _POPENS if k[0] == str(layout.root)]:
                _POPENS[key].poll()  # reap our own children so they do not linger as zombies
            for name in list(alive):
                pids = [p for p in alive[name] if (_proc_stat(p) or ("Z",))[0] != "Z"]
                if pids:
                    alive[name] = pids
                else:
                    del alive[name]
            if not alive or time.monotonic() >= deadline:
                return not alive
            time.sleep(0.05)

    if alive:
        signal_all(signal.SIGTERM)
        if not wait_gone(time.monotonic() + _STOP_TERM_WAIT):
            signal_all(signal.SIGKILL)
            wait_gone(time.monotonic() + _STOP_KILL_WAIT)
    _reap(layout)
    for key in [k for k in _POPENS if k[0] == str(layout.root)]:
        with contextlib.suppress(subprocess.TimeoutExpired):
            _POPENS[key].wait(timeout=0.1)
            del _POPENS[key]
    for name in SERVICES:
        with contextlib.suppress(FileNotFoundError):
            layout.pidfile(name).unlink()
    with contextlib.suppress(FileNotFoundError):
        layout.state.unlink()
    if alive:
        raise S3ServerError(f"could not stop {sorted(alive)} in {layout.root}: pids {alive}")


def stop(workdir: Path) -> None:
    """Stop the instance in `workdir` (SIGTERM to each recorded process group, then SIGKILL). Idempotent."""
    layout = _Layout(workdir)
    if not layout.root.exists():
        return
    with _locked(layout):
        _stop_locked(layout)


def _start_attempt(layout: _Layout, py: str, memcached: str, port: int | None, secret: str, deadline: float,
                   proxy_workers: int) -> S3ServerInfo:
    reserved = {port} if port else set()
    auto = _free_ports(5 if port is None else 4, reserved)
    proxy_port = port if port is not None else auto.pop()
    ports = {
        "memcached": auto[0],
        "account-server": auto[1],
        "container-server": auto[2],
        "object-server": auto[3],
        "proxy-server": proxy_port,
    }
    state = {"version": _STATE_VERSION, "workdir": str(layout.root), "ports": ports, "services": {},
             "endpoint_url": f"http://127.0.0.1:{proxy_port}", "access_key": ACCESS_KEY, "secret_key": secret,
             "region": REGION}

    # configs and rings
    _write_atomic(layout.etc / "swift.conf", _swift_conf())
    for server in ("account-server", "container-server", "object-server"):
        _write_atomic(layout.conf(server), _storage_conf(layout, server, ports[server]))
    _write_atomic(layout.conf("proxy-server"),
                  _proxy_conf(layout, proxy_port, ports["memcached"], secret, proxy_workers))
    (layout.etc / "memcache.conf").write_text(f"[memcache]\nmemcache_servers = 127.0.0.1:{ports['memcached']}\n")
    _write_atomic(layout.launcher, _LAUNCHER)
    for old in list(layout.etc.glob("*.ring.gz")) + list(layout.etc.glob("*.builder")):
        old.unlink()
    log_offsets = {name: _log_size(layout, name) for name in SERVICES}
    ring_args = [f"{_RING_FOR[s]}={ports[s]}" for s in ("account-server", "container-server", "object-server")]
    # The rings are built while memcached and the storage servers boot (only the proxy needs them at start-up).
    rings = subprocess.Popen([py, str(layout.launcher), "rings", str(layout.etc), "6", *ring_args],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env=_child_env(), cwd=str(layout.root))
    try:
        mc_argv = [memcached, "-l", "127.0.0.1", "-p", str(ports["memcached"]), "-U", "0", "-m", "64",
                   "-c", "1024", "-t", "2"]
        if os.getuid() == 0:
            mc_argv += ["-u", "root"]
        _spawn(layout, state, "memcached", mc_argv, marker=f"-p {ports['memcached']}")
        for server in SWIFT_SERVERS:
            if server == "proxy-server":
                try:
                    out, _ = rings.communicate(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise S3ServerError("timed out building the Swift rings") from None
                if rings.returncode != 0:
                    raise S3ServerError("building the Swift rings failed (is python3-swift installed? see "
                                        "scripts/install_s3_server.sh):\n" + out.decode(errors="replace")[-3000:])
            conf = str(layout.conf(server))
            _spawn(layout, state, server,
                   [py, str(layout.launcher), "server", str(layout.etc), server, conf, str(layout.log(server))],
                   marker=conf)
    finally:
        if rings.poll() is None:
            rings.kill()
        with contextlib.suppress(Exception):
            rings.communicate(timeout=5)

    # readiness: every process listens on its port, then proxy /healthcheck, then a signed ListBuckets
    pending = set(SERVICES)
    while pending:
        for name in sorted(pending):
            rec = state["services"][name]
            if not _is_ours(rec):
                proc = _POPENS.get((str(layout.root), rec["pid"]))
                rc = proc.poll() if proc else None
                tail = _logs_tail(layout, since=log_offsets)
                if "Address already in use" in tail or "Could not bind" in tail:
                    raise _PortConflict(f"{name} could not bind port {rec['port']}; logs:\n{tail}")
                raise S3ServerError(f"{name} exited during start-up (rc={rc}); logs:\n{tail}")
            if ("tcp", "127.0.0.1", rec["port"]) in _listening(_group_members(rec)):
                pending.discard(name)
        if pending:
            if time.monotonic() >= deadline:
                raise S3ServerError(f"timed out waiting for {sorted(pending)} to listen; logs:\n"
                                    f"{_logs_tail(layout, since=log_offsets)}")
            time.sleep(0.05)

    last = ""
    while True:
        try:
            code, body = _http("GET", proxy_port, "/healthcheck", None, timeout=5)
            if code == 200:
                code, body = _signed_list_buckets(proxy_port, ACCESS_KEY, secret, REGION, timeout=10)
                if code == 200 and b"ListAllMyBucketsResult" in body:
                    break
                last = f"signed ListBuckets -> {code} {body[:300]!r}"
            else:
                last = f"/healthcheck -> {code} {body[:200]!r}"
        except OSError as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            raise S3ServerError(f"timed out waiting for the S3 endpoint ({last}); logs:\n"
                                f"{_logs_tail(layout, since=log_offsets)}")
        time.sleep(0.1)

    # nothing of ours may listen anywhere but 127.0.0.1
    all_pids = [p for rec in state["services"].values() for p in _group_members(rec)]
    stray = [s for s in _listening(all_pids) if s[1] != "127.0.0.1"]
    if stray:
        raise S3ServerError(f"refusing to run: sockets bound outside 127.0.0.1: {stray}")

    state["started_at"] = time.time()
    _save_state(layout, state)
    return S3ServerInfo(endpoint_url=state["endpoint_url"], access_key=ACCESS_KEY, secret_key=secret,
                        region=REGION, workdir=layout.root)


def start(workdir: Path, port: int | None = None, timeout: float = 30, *, secret_key: str | None = None,
          proxy_workers: int = 1) -> S3ServerInfo:
    """Start memcached + Swift (proxy with s3api/tempauth, account, container, object) under `workdir`.

    `port` is the proxy (S3 endpoint) port; by default a free one is chosen. An instance already running in
    `workdir` is stopped first (data in `workdir/data` is kept). Raises S3ServerError on failure or after
    `timeout` seconds, with the tail of the logs; whatever was started is stopped again.
    """
    layout = _Layout(workdir)
    deadline = time.monotonic() + timeout
    py, memcached = _check_installed()
    layout.mkdirs()
    _check_xattr(layout.device)
    if port is not None and not (0 < port < 65536):
        raise ValueError(f"bad port {port}")
    secret = secret_key or secrets.token_hex(16)
    if any(c.isspace() for c in secret):
        raise ValueError("secret_key must not contain whitespace")
    with _locked(layout):
        _stop_locked(layout)
        if port is not None and not _port_is_free(port):
            raise S3ServerError(f"port 127.0.0.1:{port} is already in use")
        attempts = 3 if port is None else 1
        for attempt in range(1, attempts + 1):
            try:
                return _start_attempt(layout, py, memcached, port, secret, deadline, proxy_workers)
            except _PortConflict as e:
                _stop_locked(layout)
                if attempt == attempts:
                    raise S3ServerError(str(e)) from None
            except BaseException:
                with contextlib.suppress(Exception):
                    _stop_locked(layout)
                raise
    raise AssertionError("unreachable")


def status(workdir: Path) -> dict:
    """{'running': bool, 'healthy': bool, 'endpoint_url': ..., 'services': {name: {'pid', 'alive', 'port'}}}."""
    layout = _Layout(workdir)
    state = _read_state(layout)
    if state is None:
        return {"running": False, "healthy": False, "workdir": str(layout.root), "services": {}}
    services = {}
    for name, rec in state.get("services", {}).items():
        services[name] = {"pid": rec["pid"], "port": rec.get("port"), "alive": _is_ours(rec),
                          "pid_file": str(layout.pidfile(name))}
    all_alive = bool(services) and all(s["alive"] for s in services.values())
    healthy = False
    if all_alive:
        try:
            healthy = _http("GET", state["ports"]["proxy-server"], "/healthcheck", None, timeout=3)[0] == 200
        except OSError:
            healthy = False
    return {"running": all_alive, "healthy": healthy, "workdir": str(layout.root),
            "endpoint_url": state.get("endpoint_url"), "access_key": state.get("access_key"),
            "secret_key": state.get("secret_key"), "region": state.get("region"), "services": services,
            "any_alive": any(s["alive"] for s in services.values())}


@contextlib.contextmanager
def running(workdir: Path, port: int | None = None, timeout: float = 30, **kwargs) -> Iterator[S3ServerInfo]:
    """Context manager: start(), yield the info, always stop()."""
    info = start(workdir, port=port, timeout=timeout, **kwargs)
    try:
        yield info
    finally:
        stop(workdir)


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_start = sub.add_parser("start", help="start an instance; prints one JSON line")
    p_start.add_argument("--dir", required=True, type=Path)
    p_start.add_argument("--port", type=int, default=None, help="S3 endpoint (proxy) port; default: a free one")
    p_start.add_argument("--timeout", type=float, default=30.0)
    p_start.add_argument("--secret-key", default=None)
    for name in ("stop", "status"):
        p = sub.add_parser(name)
        p.add_argument("--dir", required=True, type=Path)
    args = parser.parse_args(argv)

    if args.cmd == "start":
        t0 = time.monotonic()
        try:
            info = start(args.dir, port=args.port, timeout=args.timeout, secret_key=args.secret_key)
        except S3ServerError as e:
            print(f"s3_server: start failed: {e}", file=sys.stderr)
            return 1
        layout = _Layout(info.workdir)
        print(json.dumps({
            "endpoint_url": info.endpoint_url, "access_key": info.access_key, "secret_key": info.secret_key,
            "region": info.region, "workdir": str(info.workdir),
            "pid_files": {name: str(layout.pidfile(name)) for name in SERVICES},
            "state_file": str(layout.state), "log_dir": str(layout.logs),
            "start_seconds": round(time.monotonic() - t0, 3),
        }), flush=True)
        return 0
    if args.cmd == "stop":
        try:
            stop(args.dir)
        except S3ServerError as e:
            print(f"s3_server: stop failed: {e}", file=sys.stderr)
            return 1
        return 0
    st = status(args.dir)
    print(json.dumps(st), flush=True)
    if st["running"] and st["healthy"]:
        return 0
    return 1 if st.get("any_alive") else 3


if __name__ == "__main__":
    sys.exit(_main())
