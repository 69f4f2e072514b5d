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
is parsed here, not by FastAPI (the binary extension is not JSON); the pydantic models below are its schema
in OpenAPI. Every refusal is a 4xx {"error": ...} saying what to change.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import time
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from mnist_pipeline import __version__
from mnist_pipeline.contract import IMAGE_BYTES, IMAGE_SIZE, NUM_CLASSES
from mnist_pipeline.serve.bodies import MAX_FILES, MAX_IMAGE_BYTES
from mnist_pipeline.serve.http import ClientError
from mnist_pipeline.serve.service import decode_and_predict, model_for, version_header

MODEL = "mnist"
MAX_BATCH = MAX_FILES  # images in one request, as /predict's files
MAX_FILE_BYTES = MAX_IMAGE_BYTES  # one image_files element, as one /predict file
# values a JSON request may hold (its commas, counted before it is parsed): a batch of pixels and then some.
# A body of 16 MB of tiny values would take several times that in memory once parsed.
MAX_JSON_VALUES = MAX_BATCH * IMAGE_BYTES + 1000
HEADER = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data"]
PLATFORMS = {"onnx": "onnxruntime_onnx", "torch": "pytorch"}
INPUTS = {"images": ("UINT8", [-1, IMAGE_SIZE, IMAGE_SIZE]), "image_files": ("BYTES", [-1])}
OUTPUTS = {"probabilities": ("FP32", [-1, NUM_CLASSES]), "digit": ("INT64", [-1])}


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
    asked = await run_in_threadpool(_parse, await request.body(), request.headers.get(HEADER))
    live = await _model(request, name, version)
    started = time.perf_counter()
    if asked.files is not None:
        probabilities = await decode_and_predict(service, live, asked.files, "input 'image_files' element")
    else:
        async with service.slots.slot(newcomer=True):
            probabilities = await run_in_threadpool(live.predict, asked.images)
    service.metrics.latency.observe(time.perf_counter() - started)
    return _answer(asked, probabilities, live)


# --- the request -----------------------------------------------------------------------------------------------

class Asked:
    """What an infer request asks: its images (28x28 pixels, or encoded files), the outputs and how to send them."""

    def __init__(self, request_id: Optional[str], images: List[bytes], files: Optional[List[bytes]],
                 outputs: List[Tuple[str, bool]]):
        self.id, self.images, self.files, self.outputs = request_id, images, files, outputs


def _parse(body: bytes, header_length: Optional[str]) -> Asked:
    """An infer body (JSON, or the binary extension's JSON header and binary data) -> what it asks; a 400 saying
    what is wrong otherwise."""
    if header_length is None:
        text, binary = body, b""
    else:
        if not (header_length.isascii() and header_length.isdigit() and len(header_length) <= 9
                and int(header_length) <= len(body)):
            raise ClientError(400, f"{HEADER} {header_length[:20]!r} is not a length within the body's "
                                   f"{len(body)} bytes")
        text, binary = body[:int(header_length)], body[int(header_length):]
    if text.count(b",") > MAX_JSON_VALUES:
        raise ClientError(400, f"the JSON request holds more than {MAX_JSON_VALUES} values: send at most "
                               f"{MAX_BATCH} images, or their pixels as binary data ({HEADER})")
    try:
        request = json.loads(text)
    except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
        after = f" followed by binary data ({HEADER})" if header_length is not None else ""
        raise ClientError(400, f"the body is not a JSON inference request{after}") from None
    if not isinstance(request, dict):
        raise ClientError(400, "the inference request is not a JSON object")
    request_id = request.get("id")
    if request_id is not None and not (isinstance(request_id, str) and _utf8(request_id)):
        raise ClientError(400, "`id` is not a string of Unicode text")
    parameters = _object(request.get("parameters"), "the request's `parameters`")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise ClientError(400, "`inputs` must list one tensor: `images` (UINT8 [N, 28, 28]) or `image_files` "
                               "(BYTES [N])")
    tensor = _object(inputs[0], "the input")
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str) or name not in INPUTS:
        raise ClientError(400, f"unknown input {str(name)[:40]!r}: send `images` or `image_files`")
    if datatype != INPUTS[name][0]:
        raise ClientError(400, f"input {name!r} has datatype {str(datatype)[:20]!r}: it is {INPUTS[name][0]}")
    count = _batch(name, shape)
    data = _data(name, tensor, binary)
    if name == "images":
        images, files = _pixels(data, count), None
    else:
        images, files = [], _files(data, count)
    return Asked(request_id, images, files, _outputs(request.get("outputs"), parameters))


def _utf8(text: str) -> bool:
    """Whether `text` can be answered (JSON's \\ud800 escapes parse to a lone surrogate, which has no UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _object(value: Any, what: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ClientError(400, f"{what} is not a JSON object")
    return value


def _batch(name: str, shape: Any) -> int:
    """N, from the input's shape; a 400 for a shape it may not have."""
    wanted = "[N, 28, 28] or [N, 1, 28, 28]" if name == "images" else "[N]"
    if not (isinstance(shape, list) and shape and all(type(n) is int for n in shape)):
        raise ClientError(400, f"input {name!r} has no shape (a list of integers): it is {wanted}")
    fine = (shape[1:] in ([IMAGE_SIZE, IMAGE_SIZE], [1, IMAGE_SIZE, IMAGE_SIZE]) if name == "images"
            else len(shape) == 1)
    if not fine:
        raise ClientError(400, f"input {name!r} has shape {str(shape)[:80]}: it is {wanted}")
    if not 0 < shape[0] <= MAX_BATCH:
        raise ClientError(400, f"input {name!r} holds {shape[0]} images: send 1 to {MAX_BATCH} in one request")
    return shape[0]


def _data(name: str, tensor: Dict[str, Any], binary: bytes) -> Union[bytes, List[Any]]:
    """The input's binary data (all the bytes after the header: one input) or its JSON `data`."""
    size = _object(tensor.get("parameters"), f"input {name!r}'s `parameters`").get("binary_data_size")
    if size is None:
        if binary:
            raise ClientError(400, f"{len(binary)} bytes of binary data after the JSON header, but input {name!r} "
                                   f"has no binary_data_size")
        data = tensor.get("data")
        if not isinstance(data, list):
            raise ClientError(400, f"input {name!r} has neither `data` (a list) nor binary data")
        return data
    if type(size) is not int or size != len(binary):
        raise ClientError(400, f"input {name!r} has binary_data_size {str(size)[:20]}, but {len(binary)} bytes "
                               f"follow the JSON header")
    return binary


def _pixels(data: Union[bytes, List[Any]], count: int) -> List[bytes]:
    """UINT8 images, flat bytes or JSON numbers (flat or nested) -> one IMAGE_BYTES bytes each."""
    wanted = count * IMAGE_BYTES
    if not isinstance(data, bytes):
        data = _uint8(data, wanted)
    if len(data) != wanted:
        raise ClientError(400, f"input 'images' holds {len(data)} values: its shape says {count} x {IMAGE_SIZE} x "
                               f"{IMAGE_SIZE} = {wanted}")
    return [data[i:i + IMAGE_BYTES] for i in range(0, wanted, IMAGE_BYTES)]


def _uint8(data: List[Any], wanted: int) -> bytes:
    """JSON `data` of a UINT8 tensor -> its bytes, row-major; nested lists are flattened (without recursion)."""
    flat: List[Any] = []
    pending = [iter(data)]
    while pending:
        for value in pending[-1]:
            if isinstance(value, list):
                pending.append(iter(value))
                break
            flat.append(value)
            if len(flat) > wanted:
                raise ClientError(400, f"input 'images' holds more than its shape's {wanted} values")
        else:
            pending.pop()
    if not all(type(v) is int for v in flat):
        raise ClientError(400, "input 'images' holds a value that is not an integer: UINT8 values are 0 to 255")
    try:
        return bytes(flat)
    except ValueError:
        raise ClientError(400, "input 'images' holds a value outside 0 to 255 (UINT8)") from None


def _files(data: Union[bytes, List[Any]], count: int) -> List[bytes]:
    """BYTES elements: the binary extension's (each a 4-byte little-endian length, then its bytes) or JSON
    base64 strings -> each file's bytes."""
    files: List[bytes] = []
    if isinstance(data, bytes):
        offset = 0
        while offset < len(data):
            if offset + 4 > len(data):
                raise ClientError(400, "input 'image_files' ends within an element's 4-byte length")
            (size,) = struct.unpack_from("<I", data, offset)
            if offset + 4 + size > len(data):
                raise ClientError(400, f"input 'image_files' element {len(files) + 1} says {size} bytes, more than "
                                       f"the {len(data) - offset - 4} left")
            files.append(_file(data[offset + 4:offset + 4 + size], len(files) + 1))
            offset += 4 + size
            if len(files) > count:  # (many empty elements would take long to count)
                break
    else:
        for number, text in enumerate(data, 1):
            if not isinstance(text, str):
                raise ClientError(400, f"input 'image_files' element {number} is not a string (base64 of a file)")
            try:
                decoded = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise ClientError(400, f"input 'image_files' element {number} is not base64: in JSON `data` each "
                                       f"file is its base64 (or send binary data)") from None
            files.append(_file(decoded, number))
            if len(files) > count:
                break
    if len(files) != count:
        raise ClientError(400, f"input 'image_files' holds {len(files)} elements: its shape says {count}")
    return files


def _file(data: bytes, number: int) -> bytes:
    if len(data) > MAX_FILE_BYTES:
        raise ClientError(413, f"input 'image_files' element {number} is over {MAX_FILE_BYTES // 2**20} MB: "
                               f"send a smaller image")
    return data


def _outputs(outputs: Any, parameters: Dict[str, Any]) -> List[Tuple[str, bool]]:
    """The outputs to answer with, each with whether it goes as binary data: those `outputs` names, else both;
    binary as each output's `binary_data` says, else as the request's `binary_data_output` (default: JSON)."""
    default = parameters.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise ClientError(400, "`binary_data_output` is not true or false")
    if outputs is None:
        return [(name, default) for name in OUTPUTS]
    if not isinstance(outputs, list) or not outputs:
        raise ClientError(400, "`outputs` is not a list naming `probabilities` and/or `digit`")
    chosen: List[Tuple[str, bool]] = []
    for output in outputs:
        output = _object(output, "an output")
        name = output.get("name")
        if not isinstance(name, str) or name not in OUTPUTS:
            raise ClientError(400, f"unknown output {str(name)[:40]!r}: ask for `probabilities` and/or `digit`")
        binary = _object(output.get("parameters"), f"output {name!r}'s `parameters`").get("binary_data", default)
        if not isinstance(binary, bool):
            raise ClientError(400, f"output {name!r}'s `binary_data` is not true or false")
        if name in (seen for seen, _ in chosen):
            raise ClientError(400, f"output {name!r} is named twice")
        chosen.append((name, binary))
    return chosen


# --- the answer ------------------------------------------------------------------------------------------------

def _answer(asked: Asked, probabilities: Any, live: Any) -> Response:
    """The outputs asked for, JSON `data` or binary data after the JSON header (in the order listed)."""
    import numpy

    probabilities = numpy.ascontiguousarray(probabilities, dtype=numpy.float32)
    count = probabilities.shape[0]
    tensors = {"probabilities": ("FP32", [count, NUM_CLASSES], probabilities),
               "digit": ("INT64", [count], probabilities.argmax(axis=1).astype(numpy.int64))}
    outputs, chunks = [], []
    for name, binary in asked.outputs:
        datatype, shape, values = tensors[name]
        if binary:
            chunks.append(values.tobytes())
            outputs.append({"name": name, "datatype": datatype, "shape": shape,
                            "parameters": {"binary_data_size": len(chunks[-1])}})
        else:
            outputs.append({"name": name, "datatype": datatype, "shape": shape, "data": values.ravel().tolist()})
    answer: Dict[str, Any] = {"model_name": MODEL}
    if live.version is not None:
        answer["model_version"] = str(live.version)
    if asked.id is not None:
        answer["id"] = asked.id
    answer["outputs"] = outputs
    headers = version_header(live)
    if not chunks:
        return JSONResponse(answer, headers=headers)
    header = json.dumps(answer, separators=(",", ":")).encode()
    return Response(header + b"".join(chunks), media_type="application/octet-stream",
                    headers={**headers, HEADER: str(len(header))})
