"""The routes: the page, /predict, /models, the probes, /metrics, the report and the API's docs, all sharing one
Service (app.state.service). Each route's answers are typed (api.py): FastAPI publishes them at
/openapi.json, and /docs shows them with Swagger UI, served from the package. No torch here: with the onnx
runtime, serve never imports it."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator, Dict, Optional

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from mnist_pipeline.contract import describe
from mnist_pipeline.records import aliases
from mnist_pipeline.serve import api, feedback, v2
from mnist_pipeline.serve.http import ClientError, Front, images
from mnist_pipeline.serve.service import Service, decode_and_predict, model_for, version_header
from mnist_pipeline.settings import ServeConfig
from mnist_pipeline.volume import Volume

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent.parent / "static"


def create_app(config: ServeConfig) -> FastAPI:
    _give_back_freed_memory()
    # python-multipart warns of each malformed body it parses: the client's 400 says it, a flood of them
    # must not fill the log
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    # no OpenTelemetry overhead per request; the docs page is ours (Swagger UI's, without inline script)
    app = FastAPI(title="mnist serve", version=api.API_VERSION, lifespan=_lifespan, docs_url=None,
                  redoc_url=None, description="Read handwritten digits: the page, the prediction API, the model's "
                  "versions and probes. Every error is a JSON {\"error\": ...}.",
                  telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False})
    app.state.service = service = Service.of(config)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Front, counter=service.metrics.requests, read_timeout=config.read_timeout,
                       uploads=service.uploads, access_log=config.access_log)
    _answer_errors_in_json(app)
    app.include_router(routes)
    app.include_router(feedback.routes)
    app.openapi = lambda: app.openapi_schema or _without_422(FastAPI.openapi(app))
    app.include_router(v2.routes)
    return app


def _without_422(schema: Dict[str, Any]) -> Dict[str, Any]:
    """The schema without FastAPI's 422 answers: a request that fails validation gets a 400 Error here."""
    for path in schema["paths"].values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)
    return schema


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # the first look at the volume before the first connection: a worker that starts beside others
    # (or replaces one) never answers "not loaded yet" while they serve
    follower = app.state.service.follower
    await run_in_threadpool(follower.start)
    yield
    follower.stop()


routes = APIRouter(tags=["serve's own API"], responses={400: api.ERROR, 503: api.ERROR})


@routes.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@routes.get("/docs", include_in_schema=False)
def docs() -> FileResponse:
    return FileResponse(STATIC / "docs.html")


@routes.get("/healthz", response_model=api.Health)
async def healthz() -> Dict[str, str]:  # async: answered on the event loop, never queued for a thread
    """Alive: 200 while the process runs."""
    return {"status": "ok"}


@routes.get("/readyz", response_model=api.Ready, responses={503: api.ERROR})
def readyz(request: Request) -> JSONResponse:
    """Ready once a model passes the gate: the model answering, or 503 saying why none does."""
    service: Service = request.app.state.service
    live, problem = service.follower.current(), service.public(service.follower.problem)  # (in that order)
    if live is None:
        return JSONResponse({"error": problem or "no model to serve yet"}, status_code=503)
    return JSONResponse({"checkpoint": live.describe(), "accuracy": live.accuracy,
                         "threshold": service.config.threshold, "runtime": live.runtime,
                         "model": service.config.model, "feedback": service.config.feedback,
                         **({"pending": problem} if problem else {})},
                        headers=version_header(live))


@routes.get("/models", response_model=api.Models)
def models(request: Request) -> JSONResponse:
    """The kept versions and their aliases (`mnist models --json`), and the version serving now."""
    service: Service = request.app.state.service
    listed = aliases.catalogue(service.volume)
    for row in listed:
        if "corrupt" in row:
            row["corrupt"] = service.public(row["corrupt"])
    live = service.follower.live
    return JSONResponse({"model": service.config.model, "serving": live.version if live else None,
                         "aliases": aliases.every(service.volume), "versions": listed})


@routes.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def prometheus(request: Request) -> Response:
    """Prometheus metrics, summed over the workers."""
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@routes.post("/predict", response_model=api.Predictions, openapi_extra=api.PREDICT_BODY,
             responses={404: api.ERROR, 409: api.ERROR, 413: api.ERROR, 415: api.ERROR})
async def predict(request: Request, version: Optional[str] = Query(
        None, pattern=api.VERSION, description="a kept version's number (GET /models); default: the one serving")
        ) -> JSONResponse:
    """The digit in each uploaded image (at most 64), in upload order, and the checkpoint that answered."""
    service: Service = request.app.state.service
    uploads = await images(request)
    live = await model_for(service, None if version is None else int(version))
    started = time.perf_counter()
    predictions = [describe(p) for p in await decode_and_predict(service, live, uploads)]
    service.metrics.latency.observe(time.perf_counter() - started)
    return JSONResponse({"checkpoint": live.describe(), "predictions": predictions}, headers=version_header(live))


@routes.get("/report", include_in_schema=False)
def report_root() -> Response:
    return RedirectResponse("/report/", status_code=307)


@routes.get("/report/{name:path}", include_in_schema=False)
def report(name: str, request: Request) -> FileResponse:
    return FileResponse(_report_file(request.app.state.service.volume, name or "index.html"))


def _answer_errors_in_json(app: FastAPI) -> None:
    """Every refusal a JSON {"error": ...} (a bug's 500 is http.Front's)."""

    @app.exception_handler(ClientError)
    async def client_error(_request: Request, exc: ClientError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def body_broke_off(_request: Request, _exc: ClientDisconnect) -> JSONResponse:
        # granian ends a body this way both when the client leaves and when its chunking is malformed
        return JSONResponse({"error": "the request body broke off (malformed chunked encoding, or the client "
                                      "left): send it whole"}, status_code=400, headers={"Connection": "close"})

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return JSONResponse({"error": f"bad request: {where}: {first.get('msg', 'invalid')}"[:300]}, status_code=400)


def _report_file(volume: Volume, name: str) -> Path:
    """A file of the evaluation report: only from model/report/ as a real folder inside the volume (neither it nor
    model/ a symlink), never a file that resolves outside it (no `..`, no symlink out)."""
    missing = ClientError(404, f"no evaluation report file {name!r} in the volume's model/report/: "
                               f"run `mnist evaluate`")
    try:
        base = volume.report_dir.resolve(strict=True)
        if base != volume.root.resolve(strict=True) / volume.report_dir.relative_to(volume.root):
            raise ClientError(404, "model/report/ is not a folder inside the volume (a symlink?): "
                                   "run `mnist report` to write it again")
        path = (base / name).resolve(strict=True)
        if path.is_dir():  # its index.html, resolved in turn (it may be a link too)
            path = (path / "index.html").resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # (ValueError: a NUL byte)
        raise missing from None
    if not path.is_relative_to(base):
        raise ClientError(404, f"{name!r} is outside the report")
    if not path.is_file():
        raise missing
    return path


def _give_back_freed_memory() -> None:
    """glibc's malloc: memory of a decoded image goes back to the system once freed. By default glibc raises its
    mmap threshold to the largest block freed so far, after which image-sized blocks come from heaps that rarely
    shrink, one per thread: RSS stays near its peak after a storm of large images. A fixed threshold keeps large
    blocks mapped (unmapped on free), and two arenas keep the threadpool's threads from holding one heap each."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (malloc.h)
    mallopt(-8, 2)  # M_ARENA_MAX
