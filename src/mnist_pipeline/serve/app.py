"""The routes: the page, /predict, /models, the probes, /metrics, the report, all sharing one Service. What
a request may hold is bounded in budget.py, its body read by bodies.py; the model that follows the
volume comes from follow.py, loaded by runtimes.py. No torch here: with the onnx runtime, serve never
imports it."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List, Optional

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from mnist_pipeline import faults, preprocess
from mnist_pipeline.contract import describe
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.records import aliases, versions
from mnist_pipeline.serve import bodies, v2
from mnist_pipeline.serve.budget import Limits, Slots, Uploads
from mnist_pipeline.serve.follow import Follower, Kept
from mnist_pipeline.serve.runtimes import Live, Runtimes
from mnist_pipeline.serve.http import ClientError, Front
from mnist_pipeline.serve.metrics import Metrics
from mnist_pipeline.settings import ServeConfig
from mnist_pipeline.volume import Volume

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent.parent / "static"
DECODE_TURN_S = 0.005  # a request decodes images for this long (one image at least) before others' get a turn


@dataclass(frozen=True)
class Service:
    """What the routes share, one per process (app.state.service): the model that follows the volume, the
    versions kept on request, what requests may hold at once, and the counts /metrics gives."""

    config: ServeConfig
    volume: Volume
    follower: Follower
    kept: Kept
    metrics: Metrics
    slots: Slots
    uploads: Uploads
    private: List[str]  # the volume's path as messages may spell it: answers leave it out

    @classmethod
    def of(cls, config: ServeConfig, limits: Limits) -> "Service":
        volume = Volume(config.root)
        runtimes = Runtimes(config.runtime, config.device, config.threads)
        metrics = Metrics()

        def swapped(live: Live) -> None:
            metrics.epoch.set(live.epoch)
            metrics.version.set(live.version or 0)

        return cls(config=config, volume=volume, metrics=metrics,
                   follower=Follower(volume, config.threshold, runtimes, on_swap=swapped, model=config.model),
                   kept=Kept(volume, config.threshold, runtimes),
                   slots=Slots(limits.max_decodes, limits.max_waiting, metrics.decoding, metrics.waiting),
                   uploads=Uploads(bodies.UPLOADS_BYTES), private=_private_paths(volume.root))

    def public(self, message: str) -> str:
        """`message` with the volume's path taken out: `--root /x` goes, /x/model/... becomes model/..."""
        for path in self.private:
            message = message.replace(f" --root {path}", "").replace(path + "/", "").replace(path, "the volume")
        return message


def create_app(config: ServeConfig) -> FastAPI:
    limits = Limits.of(config)
    # no docs pages (they load Swagger from a CDN) and no OpenTelemetry overhead per request
    app = FastAPI(title="mnist serve", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False})
    app.state.service = service = Service.of(config, limits)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Front, counter=service.metrics.requests, read_timeout=limits.read_timeout)
    _answer_errors_in_json(app)
    app.include_router(routes)
    app.include_router(v2.routes)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # the first look at the volume before the first connection: a worker that starts beside others
    # (or replaces one) never answers "not loaded yet" while they serve
    follower = app.state.service.follower
    await run_in_threadpool(follower.start)
    yield
    follower.stop()


routes = APIRouter()


def _service(request: Request) -> Service:
    return request.app.state.service


@routes.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@routes.get("/healthz")
async def healthz() -> Dict[str, str]:  # async: answered on the event loop, never queued for a thread
    return {"status": "ok"}


@routes.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    service = _service(request)
    live, problem = service.follower.current(), service.public(service.follower.problem)  # (in that order)
    if live is None:
        return JSONResponse({"error": problem}, status_code=503)
    return JSONResponse({**_describe(live, service.config.threshold), "model": service.config.model,
                         **({"pending": problem} if problem else {})}, headers=_version_header(live))


@routes.get("/models")
def models(request: Request) -> JSONResponse:
    service = _service(request)
    listed = aliases.catalogue(service.volume)
    for row in listed:
        if "corrupt" in row:
            row["corrupt"] = service.public(row["corrupt"])
    live = service.follower.live
    return JSONResponse({"model": service.config.model, "serving": live.version if live else None,
                         "aliases": aliases.every(service.volume), "versions": listed})


@routes.get("/metrics")
def prometheus(request: Request) -> Response:
    return Response(_service(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@routes.post("/predict")
async def predict(request: Request) -> JSONResponse:
    service = _service(request)
    asked = request.query_params.get("version")
    if asked is not None and not (asked.isdigit() and 0 < int(asked) <= versions.MAX_VERSION):
        raise ClientError(400, f"version {asked[:40]!r} is not a version number: GET /models lists them")
    with service.uploads.account() as take:
        images = await bodies.images(request, take)
        live = await _model(service, asked)
        started = time.perf_counter()
        inputs: List[bytes] = []
        predictions = None
        while predictions is None:
            async with service.slots.slot(newcomer=not inputs):
                predictions = await run_in_threadpool(_decode_turn, images, inputs, live)
        service.metrics.latency.observe(time.perf_counter() - started)
    return JSONResponse({"checkpoint": live.describe(), "predictions": predictions}, headers=_version_header(live))


async def _model(service: Service, asked: Optional[str]) -> Live:
    """The model a request gets: the version it asks for, else the one serving now (kept for the whole request,
    whatever swaps in later)."""
    live = service.follower.live or await run_in_threadpool(service.follower.current)
    if asked is not None:
        try:
            live = await run_in_threadpool(service.kept.get, int(asked))
        except PipelineError as exc:
            raise ClientError(404 if isinstance(exc, versions.NoSuchVersion) else 409,
                              service.public(str(exc))) from None
    if live is None:
        raise ClientError(503, f"no model to serve yet: {service.public(service.follower.problem)}")
    return live


@routes.get("/report", include_in_schema=False)
def report_root() -> Response:
    return RedirectResponse("/report/", status_code=307)


@routes.get("/report/{name:path}", include_in_schema=False)
def report(name: str, request: Request) -> FileResponse:
    return FileResponse(_report_file(_service(request).volume.report_dir, name or "index.html"))


def _answer_errors_in_json(app: FastAPI) -> None:
    """Every failure a JSON {"error": ...}: the client's (4xx), a client gone (499, for the count), a bug (500)."""

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


def _describe(live: Live, threshold: float) -> Dict[str, Any]:
    return {"checkpoint": live.describe(), "accuracy": live.accuracy, "threshold": threshold, "runtime": live.runtime}


def _version_header(live: Live) -> Dict[str, str]:
    return {"X-Model-Version": str(live.version)} if live.version is not None else {}


def _private_paths(root: Path) -> List[str]:
    """The volume's path as messages may spell it, longest first: answers say model/..., not where the volume is."""
    spellings = {str(root), str(root.absolute())}
    with contextlib.suppress(OSError, RuntimeError):
        spellings.add(str(root.resolve()))
    return sorted((s for s in spellings if s not in (".", "")), key=len, reverse=True)


def _decode_turn(images: List[bytes], inputs: List[bytes], live: Live) -> Optional[List[Dict[str, Any]]]:
    """The next of `images` decoded into `inputs` until DECODE_TURN_S has passed (one at least), each one's bytes
    dropped once done with; once all are, their predictions, in the same turn (None until then). A request
    of many small images takes a few trips to the threadpool, not one per image (nor one more to predict);
    one of large images still lets other requests' images in between its own."""
    began = time.perf_counter()
    while len(inputs) < len(images):
        number = len(inputs)
        inputs.append(_decode(images[number], number + 1 if len(images) > 1 else 0))
        images[number] = b""
        if len(inputs) < len(images) and time.perf_counter() - began > DECODE_TURN_S:
            return None
    return _predict(live, inputs)


def _decode(data: bytes, number: int) -> bytes:
    """One image's bytes -> its 28x28 pixels (contract.py); `number`: its place in a request of several (0: alone)."""
    faults.hold_point("decode")
    try:
        return preprocess.from_bytes(data)
    except preprocess.ImageError as exc:
        raise ClientError(400, (f"file {number}: " if number else "") + str(exc)) from None


def _predict(live: Live, inputs: List[bytes]) -> List[Dict[str, Any]]:
    return [describe(p) for p in live.predict(inputs)]


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
