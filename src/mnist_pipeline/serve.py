"""serve: the HTTP API and the draw-a-digit page. Routes only.

The model and its preprocessing come from model.py and preprocess.py, the gated model that follows
the volume from follow.py. Nothing here writes to the volume. Every error is a 4xx with a JSON
{"error": ...}; the process keeps serving whatever a client sends.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List

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

from mnist_pipeline import preprocess, runtime
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
ROUTES = ("/", "/predict", "/healthz", "/readyz", "/metrics", "/report", "/static")


class ClientError(Exception):
    """A request we refuse: its HTTP status and the `error` text."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


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


class CountRequests:
    """ASGI middleware: count each HTTP request by route and status (cheaper than an http middleware)."""

    def __init__(self, app, counter: Counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.counter.labels(route_of(scope["path"]), str(status[0])).inc()


def route_of(path: str) -> str:
    """A bounded label for the metrics: the route a path belongs to."""
    for route in ROUTES[1:]:
        if path == route or path.startswith(route + "/"):
            return route
    return "/" if path == "/" else "other"


def create_app(config: ServeConfig) -> FastAPI:
    volume = Volume(config.root)
    # one torch thread per request unless told otherwise: requests run side by side on the threadpool,
    # and one image is too little work to split (bench/serve_bench.py: 1 beats 2 on 2 cores)
    device = runtime.setup(config.device, config.threads or 1)
    metrics = Metrics()
    follower = Follower(volume, config.threshold, device, on_swap=lambda live: metrics.epoch.set(live.epoch))
    report_dir = volume.report_dir

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        follower.start()
        yield
        follower.stop()

    # no docs pages (they load Swagger from a CDN) and no OpenTelemetry overhead per request
    app = FastAPI(title="mnist serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False})
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    app.add_middleware(CountRequests, counter=metrics.requests)

    @app.exception_handler(ClientError)
    async def client_error(_request: Request, exc: ClientError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

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
    def healthz() -> Dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        live, problem = follower.live, follower.problem
        if live is None:
            return JSONResponse({"error": problem}, status_code=503)
        return JSONResponse({**_describe(live, config.threshold), **({"pending": problem} if problem else {})})

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict")
    async def predict(request: Request) -> Dict[str, Any]:
        images = await _images(request)
        live = follower.live  # this request keeps this model, even if a newer one is swapped in meanwhile
        if live is None:
            raise ClientError(503, f"no model to serve yet: {follower.problem}")
        started = time.perf_counter()
        predictions = await run_in_threadpool(_predict, live, images, device)
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


async def _images(request: Request) -> List[bytes]:
    """The request's images: repeated multipart `file` fields, or one raw body with an image Content-Type."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data" and not kind.startswith("image/"):
        raise ClientError(415, f"Content-Type {kind or '(none)'!r} is not accepted: send multipart/form-data "
                               f"with the image in the field `file`, or the image itself as image/png, image/jpeg, ...")
    body = await _body(request, MAX_BODY_BYTES if kind == "multipart/form-data" else MAX_IMAGE_BYTES)
    if not body:
        raise ClientError(400, "the request body is empty: send an image")
    if kind.startswith("image/"):
        return [body]

    async def stream() -> AsyncIterator[bytes]:
        yield body

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


async def _body(request: Request, limit: int) -> bytes:
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
            chunks.append(chunk)
    if size > limit:
        raise too_large
    return b"".join(chunks)


def _predict(live: Live, images: List[bytes], device: torch.device) -> List[Dict[str, Any]]:
    inputs = []
    for number, data in enumerate(images, 1):
        try:
            inputs.append(preprocess.from_bytes(data))
        except preprocess.ImageError as exc:
            where = f"file {number}: " if len(images) > 1 else ""
            raise ClientError(400, where + str(exc)) from None
    return [describe(p) for p in live.predict(torch.stack(inputs), device)]


def _report_file(report_dir: Path, name: str) -> Path:
    """A file of the evaluation report, never one outside model/report/ (no `..`, no symlink out)."""
    missing = ClientError(404, f"no evaluation report at {report_dir}/{name}: run `mnist evaluate`")
    try:
        base = report_dir.resolve(strict=True)
        path = (base / name).resolve(strict=True)
    except (OSError, RuntimeError):
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
        sock.listen(2048)
    except OSError as exc:
        raise PipelineError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port / MNIST_PORT "
            f"or --host / MNIST_HOST"
        ) from None
    return sock


def run(config: ServeConfig) -> None:
    import uvicorn

    sock = listen(config.host, config.port)
    host, port = sock.getsockname()[:2]
    app = create_app(config)
    log.info("listening on http://%s:%d (volume %s, threshold %s)", host, port, config.root, config.threshold)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    server.run(sockets=[sock])
