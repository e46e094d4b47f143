"""The HTTP server of a Runpod load-balancing endpoint (``SERVE=http``): OpenAI's Images API and Runpod's
``/runsync``, on one GPU.

Runpod's contract for such workers: the app listens on ``PORT``; ``GET /ping`` on ``PORT_HEALTH`` answers 204 while
initializing and 200 when healthy, anything else takes the worker out of routing; a request is cut after 5.5 minutes
(524) and bodies are limited to 30 MB; there is no queue and no retry. So:

- The models load in a background thread while ``/ping`` answers 204; then 200. A start-up failure (or a fatal GPU
  fault later) turns ``/ping`` into 503, and every request is answered 503 with the cause, as the queue worker
  answers every job FAILED with it.
- One job runs at a time (``JobGate``): ``SERVE_MAX_WAITING`` more may wait; past that, 429 with ``Retry-After``.
  A bad request is answered (400) before it waits; a client that disconnects while waiting gives its place up.
- SIGTERM (or SIGINT): stop accepting, answer the waiting requests 503, finish the running job, exit.
- A body over ``SERVE_MAX_BODY_BYTES`` is refused with 413 from its Content-Length before it is read, or as soon as
  the bytes read pass the limit; multipart is parsed with bounded files, fields and part sizes.

The OpenAI mapping is ``openai_api.py``; this module only speaks HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from . import openai_api
from .config import ServeSettings
from .errors import GenerationError, WorkerError
from .openai_api import EDITS, GENERATIONS, ImageInput, OpenAIError, bad_request

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger(__name__)

# Multipart bounds: files beyond an edit's inputs (at most three images and a mask) and fields beyond the API's are
# refused by the parser itself, before their bytes are kept; a text field is small.
MAX_FILES = 8
MAX_FIELDS = 64
MAX_FIELD_BYTES = 64 * 1024
# Seconds a client is told to wait before its first job has been timed.
DEFAULT_JOB_SECONDS = 10.0

_T = TypeVar("_T")
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Health:
    """Loading (204), ready (200) or failed (503, with the cause). Written by the loading thread and by a job that
    leaves the GPU unusable; read by every request."""

    def __init__(self) -> None:
        self.worker: Worker | None = None
        self.failure: str | None = None

    def load(self) -> None:
        # Imported here, in the loading thread: torch and diffusers take seconds to import, /ping answers meanwhile.
        from .app import StartupFailure, create_worker

        loaded = create_worker()
        if isinstance(loaded, StartupFailure):
            self.failure = loaded.message
        else:
            self.worker = loaded
            log.info("ready: serving HTTP requests")

    def fail(self, reason: str) -> None:
        self.failure = reason
        log.error("the worker is unhealthy from now on: %s", reason)

    def ready_worker(self) -> Worker:
        """The worker, or a 503 saying why there is none (yet)."""
        if self.failure is not None:
            raise OpenAIError(503, self.failure, code="worker_unavailable")
        if self.worker is None:
            raise OpenAIError(
                503, "The worker is still loading its models; try again shortly.", code="worker_loading",
                headers={"Retry-After": "5"},
            )
        return self.worker


class ShuttingDown(Exception):
    """The server received SIGTERM while the request waited for its turn."""


class ClientGone(Exception):
    """The client disconnected while its request waited for its turn."""


class JobGate:
    """One job at a time on the GPU, at most ``max_waiting`` more waiting (first come, first served)."""

    def __init__(self, max_waiting: int) -> None:
        self.capacity = 1 + max_waiting
        self.admitted = 0  # running + waiting
        self.closing = False
        self.average_seconds = DEFAULT_JOB_SECONDS
        self._lock = asyncio.Lock()
        self._waiting: set[asyncio.Future[Any]] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu")

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the jobs ahead of a newcomer at the recent average duration."""
        return max(1, math.ceil(self.average_seconds * self.admitted))

    @asynccontextmanager
    async def place(self) -> AsyncIterator[None]:
        """A place among the running and waiting requests, or 429 (503 once shutting down)."""
        if self.closing:
            raise OpenAIError(503, "The worker is shutting down; send the request again.", code="shutting_down")
        if self.admitted >= self.capacity:
            raise OpenAIError(
                429, f"The worker is busy: one job is running and {self.capacity - 1} are waiting. Retry later.",
                code="rate_limit_exceeded", type_="rate_limit_error", headers={"Retry-After": str(self.retry_after())},
            )
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    async def run(self, request: Request, work: Callable[[], _T]) -> _T:
        """Wait for the GPU (giving the place up if the client leaves), then run ``work`` on the GPU thread."""
        acquire = asyncio.ensure_future(self._lock.acquire())
        gone = asyncio.ensure_future(_disconnected(request))
        self._waiting.add(acquire)
        try:
            await asyncio.wait({acquire, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._waiting.discard(acquire)
            gone.cancel()
        if not acquire.done() or acquire.cancelled():
            acquire.cancel()
            try:
                await acquire
            except asyncio.CancelledError:
                raise ShuttingDown() if self.closing else ClientGone() from None
            self._lock.release()  # it was granted as it was given up
            raise ShuttingDown() if self.closing else ClientGone()
        try:
            if self.closing:
                raise ShuttingDown()
            started = time.monotonic()
            result = await asyncio.get_running_loop().run_in_executor(self._executor, work)
            self.average_seconds = 0.7 * self.average_seconds + 0.3 * (time.monotonic() - started)
            return result
        finally:
            self._lock.release()

    def close(self) -> None:
        """Stop: the waiting requests are answered 503; the running job finishes."""
        self.closing = True
        for waiter in list(self._waiting):
            waiter.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (its body has been read, so the next message can only be that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 from the Content-Length before a byte of the body is read; a body without one (chunked)
    raises ``BodyTooLarge`` to whoever reads it as soon as it passes the limit."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            error = OpenAIError(413, self._message(), code="request_too_large")
            await JSONResponse(error.body(), 413, headers={"Connection": "close"})(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"The request body is larger than {self.max_bytes} bytes (SERVE_MAX_BODY_BYTES)."


def create_app(health: Health, gate: JobGate, max_body_bytes: int) -> FastAPI:
    app = FastAPI(title="Qwen-Image worker", docs_url=None, redoc_url=None, openapi_url=None)
    too_large = OpenAIError(413, f"The request body is larger than {max_body_bytes} bytes (SERVE_MAX_BODY_BYTES).",
                            code="request_too_large")

    async def read_body(request: Request) -> bytes:
        try:
            return await request.body()
        except BodyTooLarge:
            raise too_large from None

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, err: OpenAIError) -> Response:
        return JSONResponse(err.body(), err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> Response:
        return JSONResponse(OpenAIError(err.status_code, str(err.detail)).body(), err.status_code)

    @app.get("/ping")
    async def ping() -> Response:
        if health.failure is not None:
            return JSONResponse(OpenAIError(503, health.failure).body(), 503)
        if health.worker is None:
            return Response(status_code=204)
        return JSONResponse({"status": "healthy"})

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse(openai_api.models_response(health.ready_worker()))

    @app.post(GENERATIONS)
    async def generations(request: Request) -> Response:
        worker = health.ready_worker()
        body = openai_api.parse_json_body(await read_body(request))
        prepared = openai_api.prepare(worker, GENERATIONS, body)
        return await run_openai(request, worker, prepared)

    @app.post(EDITS)
    async def edits(request: Request) -> Response:
        worker = health.ready_worker()
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            fields, images, mask = await read_multipart(request)
        else:
            body = openai_api.parse_json_body(await read_body(request))
            images, mask = openai_api.json_edit_images(body)
            fields = {name: value for name, value in body.items() if name not in ("image", "images", "mask")}
        prepared = openai_api.prepare(worker, EDITS, fields, images, mask)
        return await run_openai(request, worker, prepared)

    async def read_multipart(request: Request) -> tuple[dict[str, Any], list[ImageInput], ImageInput | None]:
        try:
            form = await request.form(max_files=MAX_FILES, max_fields=MAX_FIELDS, max_part_size=MAX_FIELD_BYTES)
        except BodyTooLarge:
            raise too_large from None
        except HTTPException as err:  # the parser's limits and malformed bodies, as Starlette reports them
            raise bad_request(None, f"The multipart body was refused: {err.detail}", code="invalid_multipart") from None
        except Exception as err:  # noqa: BLE001 - python-multipart's own errors on hostile bytes
            raise bad_request(None, f"The multipart body could not be parsed ({type(err).__name__}).",
                              code="invalid_multipart") from None
        try:
            texts: dict[str, str] = {}
            files: list[tuple[str, bytes]] = []
            mask: ImageInput | None = None
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key not in ("image", "image[]", "mask"):
                        raise bad_request(key, f"Invalid parameter: {key} is not a file field (image, image[], mask)")
                    data = await value.read()
                    if key == "mask":
                        if mask is not None:
                            raise bad_request("mask", "Invalid parameter: mask given twice")
                        mask = ImageInput(_data_uri(data), "mask")
                    else:
                        files.append((key, data))
                elif key in ("image", "image[]", "mask"):
                    raise bad_request(key, f"Invalid parameter: {key} must be a file")
                elif key in texts:
                    raise bad_request(key, f"Invalid parameter: {key} given twice")
                else:
                    texts[key] = value
        finally:
            await form.close()  # spooled uploads are anonymous temporary files: nothing stays on disk
        single = len(files) == 1 and files[0][0] == "image"
        images = [
            ImageInput(_data_uri(data), "image" if single else f"image[{index}]")
            for index, (_, data) in enumerate(files)
        ]
        return openai_api.coerce_form_fields(texts), images, mask

    async def run_openai(request: Request, worker: Worker, prepared: openai_api.PreparedRequest) -> Response:
        job_id = f"oai-{uuid.uuid4().hex[:16]}"
        async with gate.place():
            try:
                body, headers = await gate.run(request, lambda: openai_api.execute(worker, prepared, job_id))
            except ClientGone:
                return Response(status_code=499)  # nobody reads it
            except ShuttingDown:
                raise OpenAIError(503, "The worker is shutting down; send the request again.",
                                  code="shutting_down") from None
            except GenerationError as err:
                if err.fatal:
                    health.fail(f"The GPU failed and the worker must be replaced: {err}")
                raise openai_api.generation_error(err) from None
        return JSONResponse(body, headers=headers)

    @app.post("/runsync")
    async def runsync(request: Request) -> Response:
        job_id = f"sync-{uuid.uuid4().hex[:16]}"
        try:
            payload = openai_api.parse_json_body(await read_body(request))
        except OpenAIError as err:
            return JSONResponse({"id": job_id, "status": "FAILED", "error": err.message}, err.status)
        job = {"id": job_id, "input": payload.get("input")}
        try:
            worker = health.ready_worker()
        except OpenAIError as err:
            return JSONResponse({"id": job_id, "status": "FAILED", "error": err.message}, 503, headers=err.headers)
        raw = job["input"]
        if not (isinstance(raw, Mapping) and "openai_route" in raw):
            try:  # a bad request is answered before it waits, with the error the job would have failed with
                worker.check(raw)
            except WorkerError as err:
                return JSONResponse({"id": job_id, "status": "FAILED", "error": str(err)})
            except Exception:  # noqa: BLE001 - left to the job, which logs and answers it
                pass
        try:
            async with gate.place():
                output = await gate.run(request, lambda: openai_api.handle_job(worker, job))
        except OpenAIError as err:
            return JSONResponse({"id": job_id, "status": "FAILED", "error": err.message}, err.status,
                                headers=err.headers)
        except ClientGone:
            return Response(status_code=499)
        except ShuttingDown:
            return JSONResponse({"id": job_id, "status": "FAILED", "error": "The worker is shutting down."}, 503)
        if "error" in output:
            if output.get("refresh_worker"):
                health.fail(f"The GPU failed and the worker must be replaced: {output['error']}")
            return JSONResponse({"id": job_id, "status": "FAILED", "error": output["error"]})
        return JSONResponse({"id": job_id, "status": "COMPLETED", "output": output})

    return app


def _data_uri(data: bytes) -> str:
    """An uploaded file as the worker's inputs take it; its format is sniffed from the bytes, never the name."""
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode("ascii")


class _Server(uvicorn.Server):
    """uvicorn's server, which also tells the gate when a signal asks it to stop."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(settings: ServeSettings) -> None:
    """Listen on PORT (and PORT_HEALTH), load the models in the background, serve until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sockets = [_listen(settings.host, settings.port)]
    if settings.health_port != settings.port:
        sockets.append(_listen(settings.host, settings.health_port))
    health = Health()
    threading.Thread(target=health.load, name="load-models", daemon=True).start()

    async def main() -> None:
        gate = JobGate(settings.max_waiting)
        app = BodyLimit(create_app(health, gate, settings.max_body_bytes), settings.max_body_bytes)
        loop = asyncio.get_running_loop()
        # No access log: it would only repeat /ping every few seconds; requests are logged by job id.
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")

        def stop_waiting() -> None:  # called from the signal handler: hand the work to the loop
            loop.call_soon_threadsafe(gate.close)

        server = _Server(config, stop_waiting)
        log.info(
            "serving on %s port %d (health on %d); models loading in the background",
            settings.host, settings.port, settings.health_port,
        )
        await server.serve(sockets=sockets)

    # uvicorn re-raises the signal it stopped for once it is done; exit cleanly then instead of dying by it.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    asyncio.run(main())


def _exit_cleanly(sig: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
