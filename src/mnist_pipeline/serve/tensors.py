"""The Open Inference Protocol's bodies (serve/v2.py's routes): an infer request parsed from JSON or from the
binary tensor extension (a JSON header of Inference-Header-Content-Length bytes, the tensors' bytes after it)
into what it asks, and the answer encoded either way. Parsed by hand, not by FastAPI: the binary extension is
not JSON, and every refusal is a 400 that says which tensor, field or length is wrong."""

from __future__ import annotations

import base64
import binascii
import json
import struct
from typing import Any, Dict, List, Optional, Tuple, Union

from fastapi.responses import JSONResponse, Response

from mnist_pipeline.contract import IMAGE_BYTES, IMAGE_SIZE, NUM_CLASSES
from mnist_pipeline.serve.http import MAX_FILES, MAX_IMAGE_BYTES, ClientError
from mnist_pipeline.serve.service import version_header

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



# --- the request -----------------------------------------------------------------------------------------------

class Asked:
    """What an infer request asks: its images (28x28 pixels, or encoded files), the outputs and how to send them."""

    def __init__(self, request_id: Optional[str], images: List[bytes], files: Optional[List[bytes]],
                 outputs: List[Tuple[str, bool]]):
        self.id, self.images, self.files, self.outputs = request_id, images, files, outputs


def parse(body: bytes, header_length: Optional[str]) -> Asked:
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

def answer(asked: Asked, probabilities: Any, live: Any) -> Response:
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
