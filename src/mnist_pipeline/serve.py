"""serve: the HTTP API and the draw-a-digit page. Routes only.

The model and its preprocessing come from model.py and preprocess.py, the gated model that follows
the volume from follow.py. Nothing here writes to the volume. Every error is a 4xx (or a 503: busy,
retry) with a JSON {"error": ...}; the process keeps serving whatever a client sends.

What a client may cost is bounded, since the port is open to anyone:
- memory: an upload is at most MAX_BODY_BYTES, all uploads held at once at most UPLOADS_BYTES, an
  image's decoded pixels at most preprocess.MAX_DECODED_BYTES, and at most --max-decodes images are
  decoded at once (one at a time per request); --max-waiting requests may wait for a decode, more get
  a 503 with Retry-After;
- connections: at most --max-connections (the one idle the longest makes room for a new one), each
  closed when a request's head or body stops arriving for --read-timeout seconds, or when it sits
  idle after an answer for --keep-alive seconds (Guard below, and Front's receive);
- logs: a message that repeats is logged at most once a second (OncePerSecond).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import itertools
import json
import logging
import resource
import socket
import time
from pathlib import Path
from http import HTTPStatus
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from mnist_pipeline import faults, preprocess, runtime
from mnist_pipeline.settings import ServeConfig
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.follow import Follower, Live
from mnist_pipeline.model import describe
from mnist_pipeline.volume import Volume

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
MAX_IMAGE_BYTES = 2 * 1024 * 1024
MAX_FILES = 64
MAX_BODY_BYTES = 16 * 1024 * 1024  # several images in one multipart request
DRAIN_BYTES = 64 * 1024 * 1024  # an oversized body up to this is read to its end before the 413
UPLOADS_BYTES = 128 * 1024 * 1024  # all request bodies (and their parsed files) held at once
BODY_TIMEOUTS = 6  # a whole body may take this many --read-timeout: 2 MB at 35 KB/s with the default
# connections asyncio accepts in one go, before any of them is seen (and the one idle longest closed);
# also the kernel's queue of connections not yet accepted
BACKLOG = 64
# open files besides the connections: two accept bursts (the second can come before the first one's
# evictions have closed their sockets), the model, the report, the interpreter's own
FD_RESERVE = 64 + 2 * BACKLOG
RETRY_AFTER_S = 1
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's mallopt() parameters (malloc.h)
ROUTES = ("/", "/predict", "/healthz", "/readyz", "/metrics", "/report", "/static")
# The page and the report load everything from here. The report has an inline <style> (it is one
# file that also opens from disk), and its infer images are data: URLs; nothing runs inline anywhere.
CSP = ("default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
REPORT_CSP = CSP + "; style-src 'self' 'unsafe-inline'"
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff")]


class ClientError(Exception):
    """A request we refuse: its HTTP status, the `error` text and any headers (Retry-After)."""

    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.headers = status, headers


def busy(what: str) -> ClientError:
    return ClientError(503, f"the server is busy ({what}): retry in {RETRY_AFTER_S} s",
                       {"Retry-After": str(RETRY_AFTER_S)})


@dataclasses.dataclass(frozen=True)
class Limits:
    """ServeConfig's limits, as the server applies them."""

    max_connections: int
    max_decodes: int
    max_waiting: int
    read_timeout: float
    keep_alive: float

    @classmethod
    def of(cls, config: ServeConfig) -> "Limits":
        return cls(max_connections=config.max_connections,
                   max_decodes=config.max_decodes or runtime.available_cpus(),
                   max_waiting=config.max_waiting, read_timeout=config.read_timeout, keep_alive=config.keep_alive)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mnist_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("mnist_prediction_seconds", "time to preprocess and predict one request's images",
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5),
                                 registry=self.registry)
        self.epoch = Gauge("mnist_checkpoint_epoch", "epoch of the checkpoint being served (0: none yet)",
                           registry=self.registry)
        self.decoding = Gauge("mnist_decodes_running", "images being decoded now", registry=self.registry)
        self.waiting = Gauge("mnist_decodes_waiting", "images waiting for a decode slot", registry=self.registry)


class Front:
    """ASGI middleware in front of every route, for what every answer needs (cheaper than http middlewares).

    It counts each request by route and status (499: the client left before the answer, as nginx
    counts it); puts Content-Security-Policy and X-Content-Type-Options on every answer; answers a
    path with a NUL byte 404 itself; turns a plain-text error from Starlette's own responses (a bad
    Range: 416) into JSON; and ends a body that stops arriving with a 408.
    """

    def __init__(self, app, counter: Counter, read_timeout: float):
        self.app, self.counter, self.read_timeout = app, counter, read_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]
        csp = (REPORT_CSP if scope["path"].startswith("/report/") else CSP).encode()
        held: List[Any] = []  # an error answer's start and body, until it is complete

        async def send_safely(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"content-security-policy"]
                message = {**message, "headers": headers + SECURITY_HEADERS + [(b"content-security-policy", csp)]}
                if status[0] >= 400 and not _is_json(headers) and scope["method"] != "HEAD":
                    held.append(message)
                    return
            elif message["type"] == "http.response.body" and held:
                held.append(message)
                if message.get("more_body"):
                    return
                start, *bodies = held
                text = b"".join(m.get("body", b"") for m in bodies).decode("utf-8", "replace").strip()
                await _send_json(send, start, text or _phrase(status[0]))
                return
            await send(message)

        try:
            if "\x00" in scope["path"]:
                await _send_json(send_safely, {"status": 404}, "no such path: a path never holds a NUL byte")
                return
            await self.app(scope, self._timed(receive, scope), send_safely)
        finally:
            self.counter.labels(route_of(scope["path"]), str(status[0])).inc()

    def _timed(self, receive, scope):
        """receive(), but a body that stops arriving for read_timeout, or takes longer than BODY_TIMEOUTS
        of them in all, ends the request with a 408 (uvicorn itself would wait for ever)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BODY_TIMEOUTS * self.read_timeout
        done = [scope["method"] in ("GET", "HEAD")]  # a GET body is never read: receive() then waits for a disconnect

        async def receive_in_time():
            if done[0]:
                return await receive()
            wait = min(self.read_timeout, deadline - loop.time())
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0))
            except asyncio.TimeoutError:
                raise ClientError(408, f"the request body stopped arriving (or took more than "
                                       f"{BODY_TIMEOUTS * self.read_timeout:g} s): send it whole, "
                                       f"without pauses of {self.read_timeout:g} s", {"Connection": "close"}) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                done[0] = True
            return message

        return receive_in_time


def _is_json(headers) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"application/json") for k, v in headers)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


async def _send_json(send, start: Dict[str, Any], error: str) -> None:
    """An error answer as JSON {"error": ...}, keeping the original answer's other headers (Content-Range)."""
    body = json.dumps({"error": error}).encode()
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": start["status"], "headers": headers})
    await send({"type": "http.response.body", "body": body})


def route_of(path: str) -> str:
    """A bounded label for the metrics: the route a path belongs to."""
    for route in ROUTES[1:]:
        if path == route or path.startswith(route + "/"):
            return route
    return "/" if path == "/" else "other"


class Slots:
    """At most `running` images decoded at once; at most `waiting` requests wait their turn, more are refused.

    A request takes a slot for each of its images in turn, so a 64-file request holds one decoded
    image at a time and lets other requests' images in between its own.
    """

    def __init__(self, running: int, waiting: int, metrics: Metrics):
        self.semaphore, self.max_waiting, self.metrics = asyncio.Semaphore(running), waiting, metrics
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self, newcomer: bool) -> AsyncIterator[None]:
        """A decode slot; a `newcomer` (a request's first image) gets 503 when the queue is full."""
        if newcomer and self.semaphore.locked() and self.waiting >= self.max_waiting:
            raise busy(f"{self.waiting} requests already wait for one of the image decoders")
        self.waiting += 1
        self.metrics.waiting.set(self.waiting)
        try:
            await self.semaphore.acquire()
        finally:
            self.waiting -= 1
            self.metrics.waiting.set(self.waiting)
        self.metrics.decoding.inc()
        try:
            yield
        finally:
            self.metrics.decoding.dec()
            self.semaphore.release()


class Uploads:
    """The bytes of request bodies (and their parsed copies) held at once, at most `limit`: a 503 beyond."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    @contextlib.contextmanager
    def account(self) -> Iterator[Callable[[int], None]]:
        """take(n) for each piece a request holds; all of it is given back when the request ends."""
        taken = [0]

        def take(size: int) -> None:
            if self.held + size > self.limit:
                raise busy("too many uploads at once")
            self.held += size
            taken[0] += size

        try:
            yield take
        finally:
            self.held -= taken[0]


def create_app(config: ServeConfig) -> FastAPI:
    volume = Volume(config.root)
    limits = Limits.of(config)
    # one torch thread per request unless told otherwise: requests run side by side on the threadpool,
    # and one image is too little work to split (bench/serve_bench.py: 1 beats 2 on 2 cores)
    device = runtime.setup(config.device, config.threads or 1)
    metrics = Metrics()
    slots = Slots(limits.max_decodes, limits.max_waiting, metrics)
    uploads = Uploads(UPLOADS_BYTES)
    follower = Follower(volume, config.threshold, device, on_swap=lambda live: metrics.epoch.set(live.epoch))
    report_dir = volume.report_dir
    private = _private_paths(volume.root)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        follower.start()
        yield
        follower.stop()

    # no docs pages (they load Swagger from a CDN) and no OpenTelemetry overhead per request
    app = FastAPI(title="mnist serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False})
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    app.add_middleware(Front, counter=metrics.requests, read_timeout=limits.read_timeout)

    @app.exception_handler(ClientError)
    async def client_error(_request: Request, exc: ClientError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(_request: Request, _exc: ClientDisconnect) -> Response:
        # the client closed the connection mid-upload: nobody reads this, Front counts it as 499
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def bug(_request: Request, exc: Exception) -> JSONResponse:
        # a bug: uvicorn logs its traceback; the client gets JSON all the same
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": f"bad request: {exc.errors()[:1]}"}, status_code=400)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz")
    async def healthz() -> Dict[str, str]:  # async: answered on the event loop, never queued for a thread
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        live, problem = follower.live, _public(follower.problem, private)
        if live is None:
            return JSONResponse({"error": problem}, status_code=503)
        return JSONResponse({**_describe(live, config.threshold), **({"pending": problem} if problem else {})})

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict")
    async def predict(request: Request) -> Dict[str, Any]:
        with uploads.account() as take:
            images = await _images(request, take)
            live = follower.live  # this request keeps this model, even if a newer one is swapped in meanwhile
            if live is None:
                raise ClientError(503, f"no model to serve yet: {_public(follower.problem, private)}")
            started = time.perf_counter()
            inputs = []
            for number, data in enumerate(images, 1):
                async with slots.slot(newcomer=number == 1):
                    inputs.append(await run_in_threadpool(_decode, data, number if len(images) > 1 else 0))
                images[number - 1] = b""  # its bytes are done with
            predictions = await run_in_threadpool(_predict, live, inputs, device)
            metrics.latency.observe(time.perf_counter() - started)
        return {"checkpoint": {"sha256": live.sha256, "epoch": live.epoch}, "predictions": predictions}

    @app.get("/report", include_in_schema=False)
    def report_root() -> Response:
        return RedirectResponse("/report/", status_code=307)

    @app.get("/report/{name:path}", include_in_schema=False)
    def report(name: str) -> FileResponse:
        return FileResponse(_report_file(report_dir, name or "index.html"))

    return app


def _describe(live: Live, threshold: float) -> Dict[str, Any]:
    return {"checkpoint": {"sha256": live.sha256, "epoch": live.epoch}, "accuracy": live.accuracy,
            "threshold": threshold}


def _private_paths(root: Path) -> List[str]:
    """The volume's path as messages may spell it, longest first: answers say model/..., not where the volume is."""
    spellings = {str(root), str(root.absolute())}
    with contextlib.suppress(OSError, RuntimeError):
        spellings.add(str(root.resolve()))
    return sorted((s for s in spellings if s not in (".", "")), key=len, reverse=True)


def _public(message: str, private: List[str]) -> str:
    """`message` with the volume's path taken out: `--root /x` goes, /x/model/... becomes model/..."""
    for path in private:
        message = message.replace(f" --root {path}", "").replace(path + "/", "").replace(path, "the volume")
    return message


async def _images(request: Request, take) -> List[bytes]:
    """The request's images: repeated multipart `file` fields, or one raw body with an image Content-Type."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data" and not kind.startswith("image/"):
        raise ClientError(415, f"Content-Type {kind or '(none)'!r} is not accepted: send multipart/form-data "
                               f"with the image in the field `file`, or the image itself as image/png, image/jpeg, ...")
    body = await _body(request, MAX_BODY_BYTES if kind == "multipart/form-data" else MAX_IMAGE_BYTES, take)
    if not body:
        raise ClientError(400, "the request body is empty: send an image")
    if kind.startswith("image/"):
        return [body]
    take(len(body))  # the parsed files, beside the body until it is parsed
    pending = [body]
    del body  # held by `pending` alone, which the parser empties

    async def stream() -> AsyncIterator[bytes]:
        yield pending.pop()

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=MAX_FILES,
                                     max_part_size=MAX_IMAGE_BYTES).parse()
    except MultiPartException as exc:
        too_many = "Too many files" in exc.message
        raise ClientError(413 if too_many else 400, f"more than {MAX_FILES} files in one request: send fewer"
                          if too_many else f"malformed multipart body: {exc.message}") from None
    try:
        files = [value for key, value in form.multi_items() if key == "file"]
        if not files:
            raise ClientError(400, "no `file` field: send each image as a multipart field named `file`")
        if not all(isinstance(f, UploadFile) for f in files):
            raise ClientError(400, "the `file` field holds text, not a file: upload the image as a file")
        images = []
        for number, upload in enumerate(files, 1):
            data = await upload.read(MAX_IMAGE_BYTES + 1)
            if len(data) > MAX_IMAGE_BYTES:
                raise ClientError(413, f"file {number} ({upload.filename}) is over {MAX_IMAGE_BYTES // 2**20} MB: "
                                       f"send a smaller image")
            images.append(data)
        return images
    finally:
        await form.close()


async def _body(request: Request, limit: int, take) -> bytes:
    """The body, or 413 once it exceeds `limit`: never kept beyond it.

    The rest of an oversized body is read and dropped (up to DRAIN_BYTES), so that the client,
    still sending, gets to read the 413 instead of a broken connection.
    """
    declared = request.headers.get("content-length", "")
    too_large = ClientError(413, f"the request is over {limit // 2**20} MB: send a smaller image "
                                 f"(at most {MAX_IMAGE_BYTES // 2**20} MB each)")
    if declared.isdigit() and int(declared) > DRAIN_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > DRAIN_BYTES:
            break
        if size <= limit:
            take(len(chunk))
            chunks.append(chunk)
    if size > limit:
        raise too_large
    return b"".join(chunks)


def _decode(data: bytes, number: int) -> torch.Tensor:
    """One image's bytes -> its uint8 [28, 28]; `number`: its place in a request of several (0: the only one)."""
    faults.hold_point("decode")
    try:
        return preprocess.from_bytes(data)
    except preprocess.ImageError as exc:
        raise ClientError(400, (f"file {number}: " if number else "") + str(exc)) from None


def _predict(live: Live, inputs: List[torch.Tensor], device: torch.device) -> List[Dict[str, Any]]:
    return [describe(p) for p in live.predict(torch.stack(inputs), device)]


def _report_file(report_dir: Path, name: str) -> Path:
    """A file of the evaluation report, never one outside model/report/ (no `..`, no symlink out)."""
    missing = ClientError(404, f"no evaluation report file {name!r} in the volume's model/report/: "
                               f"run `mnist evaluate`")
    try:
        base = report_dir.resolve(strict=True)
        path = (base / name).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # (ValueError: a NUL byte)
        raise missing from None
    if not path.is_relative_to(base):
        raise ClientError(404, f"{name!r} is outside the report")
    if path.is_dir():
        path = path / "index.html"
    if not path.is_file():
        raise missing
    return path


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is one clear error line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        raise PipelineError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port / MNIST_PORT "
            f"or --host / MNIST_HOST"
        ) from None
    return sock


class Guard(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (h11), with what it lacks for a port open to anyone; `limits` is set
    by guarded(). uvicorn takes a protocol class (uvicorn.Config's `http`); this one only adds to the
    connection's start, end and answers, and leaves the parsing to h11.

    - A request's head must arrive within read_timeout of the connection's start or of the previous
      answer: uvicorn itself waits for ever for a head that stops half-way. (A body that stops is
      Front's: it is read by the app.)
    - At most max_connections at once: a new one closes the connection idle the longest (no request
      in progress), or, when every one is busy, is answered 503 and closed.
    - uvicorn's own error answers (malformed HTTP) are JSON, like every other.
    """

    limits: Limits
    _order = itertools.count()  # breaks ties between connections idle since the same moment

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expiry: Optional[asyncio.TimerHandle] = None
        self._arm()
        others = [c for c in self.connections if c is not self and not c.transport.is_closing()]
        if len(others) >= self.limits.max_connections:
            idle = [c for c in others if isinstance(c, Guard) and not c._busy()]
            if idle:
                min(idle, key=lambda c: c._idle_since).transport.close()  # (a tuple: time, then order)
                log.warning("%d connections, the most allowed (--max-connections): closed the one idle longest",
                            self.limits.max_connections)
            else:
                log.warning("%d connections, the most allowed (--max-connections), all busy: refused a new one",
                            self.limits.max_connections)
                self._answer(503, "the server has as many connections as it takes, all busy: "
                                  f"retry in {RETRY_AFTER_S} s", [(b"retry-after", str(RETRY_AFTER_S).encode())])

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        if self._expiry is not None:
            self._expiry.cancel()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._busy():  # (a pipelined request may already be under way)
            self._arm()

    def send_400_response(self, msg: str) -> None:
        self._answer(400, "malformed HTTP request (its request line, a header, Content-Length or chunking): "
                          "fix the client")

    def _busy(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self._idle_since = (self.loop.time(), next(self._order))
        self._expiry = self.loop.call_later(self.limits.read_timeout, self._expire)

    def _expire(self) -> None:
        if self._busy() or self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:  # part of a request came, then nothing
            self._answer(408, f"the request's head did not arrive within {self.limits.read_timeout:g} s: "
                              "send it whole, without pauses")
        else:
            self.transport.close()

    def _answer(self, status: int, error: str, headers: Optional[List[Tuple[bytes, bytes]]] = None) -> None:
        """A JSON error answer straight on the connection, which then closes (no request of it is under way)."""
        body = json.dumps({"error": error}).encode()
        lines = [f"HTTP/1.1 {status} {_phrase(status)}".encode(), b"content-type: application/json",
                 b"content-length: " + str(len(body)).encode(), b"connection: close",
                 b"content-security-policy: " + CSP.encode()]
        lines += [k + b": " + v for k, v in SECURITY_HEADERS + (headers or [])]
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.transport.close()


def guarded(limits: Limits) -> type:
    """Guard with these limits: uvicorn builds one protocol object per connection from the class."""
    return type("Guard", (Guard,), {"limits": limits})


class OncePerSecond(logging.Filter):
    """Lets a message through at most once a second, then notes how many like it were held back.

    Messages are alike when their first lines are (asyncio's add a socket's repr below it). A flood
    of bad requests, or of accept() failures, must not fill the disk with the log.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last: Dict[Tuple[str, str], float] = {}
        self.held: Dict[Tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg).split("\n", 1)[0][:200])
        now = time.monotonic()
        if now - self.last.get(key, -1.0) < 1:
            self.held[key] = self.held.get(key, 0) + 1
            return False
        if len(self.last) > 1000:  # many different messages: forget the ones not seen for a while
            self.last = {k: t for k, t in self.last.items() if now - t < 1}
        self.last[key] = now
        held = self.held.pop(key, 0)
        if held and isinstance(record.msg, str):
            record.msg += f" ({held} more like it not logged)"
        return True


def allow_open_files(limits: Limits) -> Limits:
    """Raise this process's open-file limit to what max_connections takes, as far as the hard limit
    lets it; where it does not, fewer connections (said once)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = limits.max_connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < wanted:
        fewer = max(1, soft - FD_RESERVE)
        log.warning("the open-file limit is %d: at most %d connections, not %d (--max-connections); "
                    "raise `ulimit -n` for more", soft, fewer, limits.max_connections)
        return dataclasses.replace(limits, max_connections=fewer)
    return limits


def give_back_freed_memory() -> None:
    """glibc's malloc: memory of a decoded image goes back to the system once freed.

    By default glibc raises its mmap threshold to the largest block freed so far (up to 32 MB), after
    which image-sized blocks come from heaps that rarely shrink, one heap per thread: RSS stays near its
    peak after a storm of large images. A fixed threshold keeps large blocks mapped (unmapped on free),
    and two arenas keep the threadpool's threads from holding one heap each. Elsewhere: nothing to do.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 1 << 20)
    mallopt(M_ARENA_MAX, 2)


def run(config: ServeConfig) -> None:
    import uvicorn

    give_back_freed_memory()

    sock = listen(config.host, config.port)
    host, port = sock.getsockname()[:2]
    limits = allow_open_files(Limits.of(config))
    app = create_app(config)
    log.info("listening on http://%s:%d (volume %s, threshold %s)", host, port, config.root, config.threshold)
    server = uvicorn.Server(uvicorn.Config(
        app, http=guarded(limits), loop="asyncio", backlog=BACKLOG,
        timeout_keep_alive=limits.keep_alive,  # type: ignore[arg-type]
        log_level="warning", access_log=False, lifespan="on"))
    flood = OncePerSecond()
    for name in ("uvicorn.error", "asyncio", __name__):
        logging.getLogger(name).addFilter(flood)
    server.run(sockets=[sock])
