"""Runpod's job-output endpoint, stood in for on 127.0.0.1, so tests can read the progress a worker posts."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class ProgressReceiver:
    """Stands in for Runpod's job-output endpoint on 127.0.0.1, recording what the SDK's progress_update posts."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict]] = []  # (job id, posted body)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                job_id = parse_qs(urlsplit(self.path).query).get("id", [""])[0]
                receiver.posts.append((job_id, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url_template(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/job-done?id=$ID"

    def stop(self) -> None:
        self.httpd.shutdown()
