"""The few protobuf messages of an ONNX model, encoded by hand: ModelProto and what it holds.

The onnx package would only serialise these, and it does not fit the graded images (docs/export.md).
Each function returns one message's bytes; the field numbers are those of onnx.proto. Repeated
integers are written unpacked, one key each: every protobuf parser accepts that form for any repeated
scalar, packed or not.
"""

from __future__ import annotations

import struct
from typing import Dict, Iterable, Sequence, Union

# TensorProto.DataType
FLOAT, UINT8, INT64 = 1, 2, 7
# AttributeProto.AttributeType
_ATTRIBUTE_FLOAT, _ATTRIBUTE_INT, _ATTRIBUTE_INTS = 1, 2, 7
# wire types
_VARINT, _LENGTH, _FIXED32 = 0, 2, 5

Attribute = Union[int, float, Sequence[int]]


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # a negative int64 is its two's complement: ten bytes
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _int(field: int, value: int) -> bytes:
    return _key(field, _VARINT) + _varint(int(value))


def _bytes(field: int, value: Union[bytes, str]) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    return _key(field, _LENGTH) + _varint(len(data)) + data


def _float(field: int, value: float) -> bytes:
    return _key(field, _FIXED32) + struct.pack("<f", value)


def _messages(field: int, messages: Iterable[bytes]) -> bytes:
    return b"".join(_bytes(field, message) for message in messages)


def tensor(name: str, data_type: int, dims: Sequence[int], raw: bytes) -> bytes:
    """TensorProto: `raw` holds the elements in row-major order, little-endian."""
    return b"".join(_int(1, d) for d in dims) + _int(2, data_type) + _bytes(8, name) + _bytes(9, raw)


def floats(name: str, dims: Sequence[int], values: Sequence[float]) -> bytes:
    return tensor(name, FLOAT, dims, struct.pack(f"<{len(values)}f", *values))


def int64s(name: str, dims: Sequence[int], values: Sequence[int]) -> bytes:
    return tensor(name, INT64, dims, struct.pack(f"<{len(values)}q", *values))


def attribute(name: str, value: Attribute) -> bytes:
    """AttributeProto of one int, one float or a list of ints (all these graphs use)."""
    if isinstance(value, float):
        return _bytes(1, name) + _int(20, _ATTRIBUTE_FLOAT) + _float(2, value)
    if isinstance(value, int):  # (a bool too: 0 or 1)
        return _bytes(1, name) + _int(20, _ATTRIBUTE_INT) + _int(3, value)
    return _bytes(1, name) + _int(20, _ATTRIBUTE_INTS) + b"".join(_int(8, v) for v in value)


def node(op_type: str, inputs: Sequence[str], outputs: Sequence[str], name: str,
         attributes: Dict[str, Attribute]) -> bytes:
    """NodeProto of the default (ai.onnx) domain."""
    return (b"".join(_bytes(1, i) for i in inputs) + b"".join(_bytes(2, o) for o in outputs) + _bytes(3, name)
            + _bytes(4, op_type) + _messages(5, (attribute(k, v) for k, v in attributes.items())))


def value_info(name: str, elem_type: int, shape: Sequence[Union[int, str]]) -> bytes:
    """ValueInfoProto of a tensor; a str in `shape` is a named (dynamic) dimension."""
    dims = [_int(1, d) if isinstance(d, int) else _bytes(2, d) for d in shape]
    tensor_type = _int(1, elem_type) + _bytes(2, _messages(1, dims))
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))


def graph(name: str, nodes: Sequence[bytes], initializers: Sequence[bytes], inputs: Sequence[bytes],
          outputs: Sequence[bytes]) -> bytes:
    """GraphProto: `nodes` in topological order."""
    return (_messages(1, nodes) + _bytes(2, name) + _messages(5, initializers) + _messages(11, inputs)
            + _messages(12, outputs))


def model(graph_proto: bytes, ir_version: int, opset: int, producer: str, producer_version: str,
          metadata: Dict[str, str]) -> bytes:
    """ModelProto importing the default domain's operator set `opset`."""
    entries = (_bytes(1, key) + _bytes(2, value) for key, value in metadata.items())
    return (_int(1, ir_version) + _bytes(2, producer) + _bytes(3, producer_version) + _bytes(7, graph_proto)
            + _bytes(8, _int(2, opset)) + _messages(14, entries))
