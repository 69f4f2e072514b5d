"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API) beside serve's own API, in the same process:
the clients and load tools of those servers talk to this model as they talk to theirs.

One model, `mnist`, whose versions are the volume's version numbers; no version means what /predict answers
with (production, or the pinned --model). Aliases stay in serve's own API. Inputs, one per request:

  images       UINT8 [N, 28, 28] or [N, 1, 28, 28]: MNIST-like already (white ink on black, centred), no
               preprocessing
  image_files  BYTES [N]: each an encoded image file, given /predict's preprocessing (preprocess.py); in JSON
               each element is the file in base64 (JSON text cannot hold a PNG's bytes)

Outputs: `probabilities` FP32 [N, 10] and `digit` INT64 [N]. Both as JSON `data` and as the binary tensor
extension (Inference-Header-Content-Length: the JSON header's length, the tensors' bytes after it). The body
is parsed in tensors.py, not by FastAPI (the binary extension is not JSON); the pydantic models below are its
schema in OpenAPI. Every refusal is a 4xx {"error": ...} saying what to change.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Literal, Optional, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from mnist_pipeline import __version__
from mnist_pipeline.serve.http import ClientError
from mnist_pipeline.serve.service import decode_and_predict, model_for, version_header
from mnist_pipeline.serve import tensors
from mnist_pipeline.serve.tensors import EXTENSIONS, HEADER, INPUTS, MODEL, OUTPUTS, PLATFORMS

# --- the schema (OpenAPI) --------------------------------------------------------------------------------------

class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: List[int] = Field(description="-1: any size (the batch)")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: List[str]


class ModelMetadata(BaseModel):
    name: str
    versions: List[str] = Field(description="the version answering (GET /models lists every version)")
    platform: str
    inputs: List[TensorMetadata] = Field(description="send one of them per request")
    outputs: List[TensorMetadata]


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    version: Optional[str] = None
    ready: bool


class V2Error(BaseModel):
    error: str


class InputParameters(BaseModel):
    binary_data_size: Optional[int] = Field(None, ge=0, description="binary extension: its bytes after the JSON")


class RequestInput(BaseModel):
    name: Literal["images", "image_files"]
    datatype: Literal["UINT8", "BYTES"]
    shape: List[int] = Field(description="images: [N, 28, 28] or [N, 1, 28, 28]; image_files: [N]; N <= 64")
    parameters: Optional[InputParameters] = None
    data: Optional[List[Any]] = Field(None, description="images: integers 0-255, flat or nested; "
                                                        "image_files: each file in base64")


class OutputParameters(BaseModel):
    binary_data: Optional[bool] = None


class RequestOutput(BaseModel):
    name: Literal["probabilities", "digit"]
    parameters: Optional[OutputParameters] = None


class RequestParameters(BaseModel):
    binary_data_output: Optional[bool] = None


class InferRequest(BaseModel):
    id: Optional[str] = None
    parameters: Optional[RequestParameters] = None
    inputs: List[RequestInput] = Field(min_length=1, max_length=1)
    outputs: Optional[List[RequestOutput]] = None


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: List[int]
    parameters: Optional[Dict[str, int]] = None
    data: Optional[List[Union[float, int]]] = None


class InferResponse(BaseModel):
    model_name: str
    model_version: Optional[str] = None
    id: Optional[str] = None
    outputs: List[ResponseOutput]


def _inline(schema: Dict[str, Any]) -> Dict[str, Any]:
    """A pydantic schema with its $defs put in place of their $refs: a request body's schema that OpenAPI reads
    alone (the models have no cycles)."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)


ERRORS: Dict[Union[int, str], Dict[str, Any]] = {400: {"model": V2Error}, 404: {"model": V2Error}}
METADATA_ERRORS: Dict[Union[int, str], Dict[str, Any]] = {**ERRORS, 503: {"model": V2Error}}  # (none loaded yet)
INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _inline(InferRequest.model_json_schema())},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                            "description": f"binary extension: the JSON header ({HEADER} "
                                                           f"bytes), then the inputs' binary data"}}}}}
INFER_ANSWERS: Dict[Union[int, str], Dict[str, Any]] = {
    **ERRORS, 408: {"model": V2Error}, 413: {"model": V2Error}, 415: {"model": V2Error}, 503: {"model": V2Error},
    200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


# --- the routes ------------------------------------------------------------------------------------------------

routes = APIRouter(prefix="/v2", tags=["Open Inference Protocol (v2)"])


@routes.get("/health/live", response_model=ServerLive)
async def live() -> Dict[str, bool]:
    return {"live": True}


@routes.get("/health/ready", response_model=ServerReady, responses={400: {"model": V2Error}})
def ready(request: Request) -> JSONResponse:
    # 4xx for not ready, as the protocol has it
    service = request.app.state.service
    if service.follower.current() is None:
        return JSONResponse({"error": f"not ready: {service.public(service.follower.problem)}"}, status_code=400)
    return JSONResponse({"ready": True})


@routes.get("", response_model=ServerMetadata)
async def server_metadata() -> Dict[str, Any]:
    return {"name": "mnist serve", "version": __version__, "extensions": EXTENSIONS}


@routes.get("/models/{name}", response_model=ModelMetadata, responses=METADATA_ERRORS)
async def model_metadata(name: str, request: Request) -> JSONResponse:
    return await _metadata(request, name, None)


@routes.get("/models/{name}/versions/{version}", response_model=ModelMetadata, responses=METADATA_ERRORS)
async def version_metadata(name: str, version: str, request: Request) -> JSONResponse:
    return await _metadata(request, name, version)


@routes.get("/models/{name}/ready", response_model=ModelReady, responses=ERRORS)
async def model_ready(name: str, request: Request) -> JSONResponse:
    return await _ready(request, name, None)


@routes.get("/models/{name}/versions/{version}/ready", response_model=ModelReady, responses=ERRORS)
async def version_ready(name: str, version: str, request: Request) -> JSONResponse:
    return await _ready(request, name, version)


@routes.post("/models/{name}/infer", response_model=InferResponse, responses=INFER_ANSWERS,
             openapi_extra=INFER_BODY)
async def infer(name: str, request: Request) -> Response:
    return await _infer(request, name, None)


@routes.post("/models/{name}/versions/{version}/infer", response_model=InferResponse, responses=INFER_ANSWERS,
             openapi_extra=INFER_BODY)
async def version_infer(name: str, version: str, request: Request) -> Response:
    return await _infer(request, name, version)


async def _metadata(request: Request, name: str, version: Optional[str]) -> JSONResponse:
    live = await _model(request, name, version)
    tensors = [{"name": key, "datatype": kind, "shape": shape} for key, (kind, shape) in INPUTS.items()]
    answers = [{"name": key, "datatype": kind, "shape": shape} for key, (kind, shape) in OUTPUTS.items()]
    return JSONResponse({"name": MODEL, "versions": [str(live.version)] if live.version is not None else [],
                         "platform": PLATFORMS.get(live.runtime, live.runtime), "inputs": tensors,
                         "outputs": answers}, headers=version_header(live))


async def _ready(request: Request, name: str, version: Optional[str]) -> JSONResponse:
    try:
        live = await _model(request, name, version)
    except ClientError as exc:
        if exc.status == 503:  # not loaded yet: the protocol's "not ready" is a 4xx
            raise ClientError(400, str(exc)) from None
        raise
    return JSONResponse({"name": MODEL, **({"version": str(live.version)} if live.version is not None else {}),
                         "ready": True}, headers=version_header(live))


async def _model(request: Request, name: str, version: Optional[str]) -> Any:
    """The model a request names: version `version`, else the one serving now (kept for the whole request)."""
    if name != MODEL:
        raise ClientError(404, f"unknown model {name[:40]!r}: this server has one model, {MODEL!r}")
    # (ASCII digits, its length first: int() refuses a string of thousands of digits)
    if version is not None and not (version.isascii() and version.isdigit() and len(version) <= 9):
        raise ClientError(400, f"version {version[:40]!r} is not a version number: GET /models lists them")
    # a kept version that cannot serve (below the threshold, corrupt): 400, as the protocol has a bad request
    return await model_for(request.app.state.service, None if version is None else int(version), refused=400)


async def _infer(request: Request, name: str, version: Optional[str]) -> Response:
    service = request.app.state.service
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise ClientError(415, f"Content-Encoding {encoding[:20]!r} is not accepted: send the body uncompressed")
    # (its size bounded by http.Front; parsed off the event loop: up to 16 MB of JSON)
    asked = await run_in_threadpool(tensors.parse, await request.body(), request.headers.get(HEADER))
    live = await _model(request, name, version)
    started = time.perf_counter()
    if asked.files is not None:
        probabilities = await decode_and_predict(service, live, asked.files, "input 'image_files' element")
    else:
        async with service.slots.slot(newcomer=True):
            probabilities = await run_in_threadpool(live.predict, asked.images)
    service.metrics.latency.observe(time.perf_counter() - started)
    return tensors.answer(asked, probabilities, live)
