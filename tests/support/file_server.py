"""A tiny HTTP server on 127.0.0.1 that serves test files, for image and LoRA downloads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    body: bytes
    status: int = 200
    content_type: str = "application/octet-stream"
    headers: dict[str, str] = field(default_factory=dict)
    send_length: bool = True  # False: no Content-Length, so only a streaming cap can stop an oversized body
    # Set: the answer waits until the event is set (bounded by HOLD_LIMIT_S), so a test decides when a job that
    # downloads this file can go on: a job held "running" for exactly as long as the test needs, on any machine.
    hold: threading.Event | None = None


HOLD_LIMIT_S = 120


class FileServer:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests.append(self.path)
                route = server.routes.get(self.path.split("?", 1)[0])
                if route is None:
                    self.send_error(404)
                    return
                if route.hold is not None:
                    route.hold.wait(HOLD_LIMIT_S)
                self.send_response(route.status)
                self.send_header("Content-Type", route.content_type)
                if route.send_length:
                    self.send_header("Content-Length", str(len(route.body)))
                for name, value in route.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(route.body)

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def add(self, path: str, body: bytes, content_type: str = "image/png", **kwargs: object) -> str:
        self.routes[path] = Route(body, content_type=content_type, **kwargs)  # type: ignore[arg-type]
        return self.url(path)

    def wait_for_request(self, path: str, timeout: float = 60) -> None:
        """Returns once ``path`` has been requested (a held route: its downloader is now waiting on it)."""
        deadline = time.monotonic() + timeout
        while not any(seen.split("?", 1)[0] == path for seen in self.requests):
            if time.monotonic() > deadline:
                raise AssertionError(f"{path} was not requested within {timeout} s; requests: {self.requests}")
            time.sleep(0.05)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@contextmanager
def file_server() -> Iterator[FileServer]:
    server = FileServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def closed_port() -> int:
    """A port on 127.0.0.1 with nothing listening (bound, then released)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
