"""The routes: the page, /predict, the probes, /metrics, the report. What a request may hold is bounded
in budget.py; the model that follows the volume comes from follow.py, loaded by runtimes.py. No torch
here: with the onnx runtime, serve never imports it."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from mnist_pipeline import faults, preprocess
from mnist_pipeline.contract import describe
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.records import aliases, versions
from mnist_pipeline.serve.budget import Limits, Slots, Uploads
from mnist_pipeline.serve.follow import Follower, Kept
from mnist_pipeline.serve.runtimes import Live, Runtimes
from mnist_pipeline.serve.http import ClientError, Front
from mnist_pipeline.serve.metrics import Metrics
from mnist_pipeline.settings import ServeConfig
from mnist_pipeline.volume import Volume

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent.parent / "static"
MAX_IMAGE_BYTES = 2 * 1024 * 1024
MAX_FILES = 64
MAX_BODY_BYTES = 16 * 1024 * 1024  # several images in one multipart request
DRAIN_BYTES = 64 * 1024 * 1024  # an oversized body up to this is read to its end before the 413
UPLOADS_BYTES = 128 * 1024 * 1024  # all request bodies (and their parsed files) held at once
DECODE_TURN_S = 0.005  # a request decodes images for this long (one image at least) before others' get a turn


def create_app(config: ServeConfig) -> FastAPI:
    volume = Volume(config.root)
    limits = Limits.of(config)
    runtimes = Runtimes(config.runtime, config.device, config.threads)
    metrics = Metrics()
    slots = Slots(limits.max_decodes, limits.max_waiting, metrics.decoding, metrics.waiting)
    uploads = Uploads(UPLOADS_BYTES)
    def swapped(live: Live) -> None:
        metrics.epoch.set(live.epoch)
        metrics.version.set(live.version or 0)

    follower = Follower(volume, config.threshold, runtimes, on_swap=swapped, model=config.model)
    kept = Kept(volume, config.threshold, runtimes)
    report_dir = volume.report_dir
    private = _private_paths(volume.root)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # the first look at the volume before the first connection: a worker that starts beside others
        # (or replaces one) never answers "not loaded yet" while they serve
        await run_in_threadpool(follower.start)
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
        live, problem = follower.current(), _public(follower.problem, private)  # (in that order)
        if live is None:
            return JSONResponse({"error": problem}, status_code=503)
        return JSONResponse({**_describe(live, config.threshold), "model": config.model,
                             **({"pending": problem} if problem else {})}, headers=_version_header(live))

    @app.get("/models")
    def models() -> JSONResponse:
        listed = aliases.catalogue(volume)
        for row in listed:
            if "corrupt" in row:
                row["corrupt"] = _public(row["corrupt"], private)
        live = follower.live
        return JSONResponse({"model": config.model, "serving": live.version if live else None,
                             "aliases": aliases.every(volume), "versions": listed})

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        asked = request.query_params.get("version")
        if asked is not None and not (asked.isdigit() and 0 < int(asked) <= versions.MAX_VERSION):
            raise ClientError(400, f"version {asked[:40]!r} is not a version number: GET /models lists them")
        with uploads.account() as take:
            images = await _images(request, take)
            live = follower.live or await run_in_threadpool(follower.current)  # kept, whatever swaps in later
            if asked is not None:
                try:
                    live = await run_in_threadpool(kept.get, int(asked))
                except PipelineError as exc:
                    raise ClientError(404 if isinstance(exc, versions.NoSuchVersion) else 409,
                                      _public(str(exc), private)) from None
            if live is None:
                raise ClientError(503, f"no model to serve yet: {_public(follower.problem, private)}")
            started = time.perf_counter()
            inputs: List[bytes] = []
            predictions = None
            while predictions is None:
                async with slots.slot(newcomer=not inputs):
                    predictions = await run_in_threadpool(_decode_turn, images, inputs, live)
            metrics.latency.observe(time.perf_counter() - started)
        return JSONResponse({"checkpoint": live.describe(), "predictions": predictions},
                            headers=_version_header(live))

    @app.get("/report", include_in_schema=False)
    def report_root() -> Response:
        return RedirectResponse("/report/", status_code=307)

    @app.get("/report/{name:path}", include_in_schema=False)
    def report(name: str) -> FileResponse:
        return FileResponse(_report_file(report_dir, name or "index.html"))

    return app


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
