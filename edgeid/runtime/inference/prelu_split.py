"""Rewrite an ONNX model's PRelu nodes as elementwise ops ONNX Runtime runs faster; same numbers.

ONNX Runtime's CPU PRelu (1.32) is a slow broadcasting kernel outside its NCHWc conv layout:
in an operator profile of MTCNN's nets on LFW photos it took about as long as all their
convolutions. Each PRelu becomes

    max(x, slope * x)                        where every slope is <= 1,
    min(x, slope * x)                        where every slope is >= 1 (read from the model),
    relu(x) + slope * (x - relu(x))          otherwise (or when the slope is no float32 constant).

These are exact for finite ``x``, not approximations: each gives ``x`` where ``x >= 0`` and
the one product ``slope * x`` that PRelu itself rounds where ``x < 0`` (in the third,
``x + slope * 0`` and ``0 + slope * x``). Only the sign of a zero result can differ, which no
later operation tells apart; an infinite ``x``, which no layer produces from finite pixels,
could come out NaN. ``slope`` broadcasts against ``x`` in Mul as it does in PRelu.

The model bytes are read as protobuf wire format (ONNX's ``ModelProto``), so this needs no
``onnx`` package on the box; only the top-level graph's nodes are rewritten. A quantised (QDQ)
graph, where ONNX Runtime fuses operators with the quantisation nodes around them, is returned
unchanged, as is anything this reader does not expect.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]

# Field numbers in onnx.proto3: ModelProto.graph; GraphProto.node, .initializer;
# NodeProto.input, .output, .name, .op_type, .domain; TensorProto.data_type, .float_data, .name,
# .raw_data, .data_location; TensorProto.DataType.FLOAT.
_MODEL_GRAPH = 7
_GRAPH_NODE = 1
_GRAPH_INITIALIZER = 5
_TENSOR_DATA_TYPE = 2
_TENSOR_FLOAT_DATA = 4
_TENSOR_NAME = 8
_TENSOR_RAW_DATA = 9
_TENSOR_DATA_LOCATION = 14
_FLOAT = 1
_NODE_INPUT = 1
_NODE_OUTPUT = 2
_NODE_NAME = 3
_NODE_OP_TYPE = 4
_NODE_DOMAIN = 7
# Protobuf wire types.
_VARINT = 0
_FIXED64 = 1
_LENGTH_DELIMITED = 2
_FIXED32 = 5
# Ops that mark a quantised graph, whose node patterns ONNX Runtime fuses as a whole.
_QUANTISATION_OPS = frozenset({b"QuantizeLinear", b"DequantizeLinear", b"DynamicQuantizeLinear"})
# Prefix of the tensor and node names the rewrite adds (the model must not use it already).
_PREFIX = "edgeid_prelu_split"


class _WireError(ValueError):
    """Bytes that are not the protobuf this module expects."""


@dataclass(frozen=True)
class _Field:
    number: int
    wire: int
    start: int  # where the field's tag begins
    end: int  # one past its last byte
    payload: memoryview  # the value of a length-delimited field (else empty); no copy
    value: int = 0  # the value of a varint field


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _WireError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: memoryview) -> Iterator[_Field]:
    pos = 0
    while pos < len(data):
        start = pos
        tag, pos = _read_varint(data, pos)
        number, wire = tag >> 3, tag & 7
        payload = data[0:0]
        value = 0
        if wire == _VARINT:
            value, pos = _read_varint(data, pos)
        elif wire == _FIXED64:
            pos += 8
        elif wire == _FIXED32:
            pos += 4
        elif wire == _LENGTH_DELIMITED:
            size, pos = _read_varint(data, pos)
            payload = data[pos : pos + size]
            pos += size
        else:  # groups (3, 4) are not used by ONNX
            raise _WireError(f"unexpected wire type {wire}")
        if pos > len(data) or number == 0:
            raise _WireError("truncated field")
        yield _Field(number, wire, start, pos, payload, value)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(len(payload)) + payload


def _node(op_type: str, name: str, inputs: list[bytes], outputs: list[bytes]) -> bytes:
    body = b"".join(_bytes_field(_NODE_INPUT, i) for i in inputs)
    body += b"".join(_bytes_field(_NODE_OUTPUT, o) for o in outputs)
    body += _bytes_field(_NODE_NAME, name.encode())
    body += _bytes_field(_NODE_OP_TYPE, op_type.encode())
    return _bytes_field(_GRAPH_NODE, body)


def _float32_values(tensor: memoryview) -> npt.NDArray[np.float32] | None:
    """The values of a float32 TensorProto stored in the model, else None."""
    data_type = None
    chunks: list[bytes] = []
    for field in _fields(tensor):
        if field.number == _TENSOR_DATA_TYPE and field.wire == _VARINT:
            data_type = field.value
        elif field.number == _TENSOR_DATA_LOCATION:
            return None  # external data: not in these bytes
        elif field.number in (_TENSOR_RAW_DATA, _TENSOR_FLOAT_DATA):
            if field.wire == _LENGTH_DELIMITED:  # raw bytes, or packed floats: both <f4
                chunks.append(bytes(field.payload))
            elif field.wire == _FIXED32:
                chunks.append(bytes(tensor[field.end - 4 : field.end]))
    joined = b"".join(chunks)
    if data_type != _FLOAT or not joined or len(joined) % 4:
        return None
    return np.frombuffer(joined, dtype="<f4").astype(np.float32)


def _split(index: int, x: bytes, slope: bytes, y: bytes, values: FloatArray | None) -> bytes:
    """Nodes computing PRelu: two where every slope is on one side of 1, else four.

    With every slope <= 1, ``slope * x <= x`` exactly when ``x >= 0``, so PRelu is
    ``max(x, slope * x)``; with every slope >= 1 it is ``min(x, slope * x)``. Either way the
    result is ``x`` or the product PRelu rounds. Mixed slopes take
    ``relu(x) + slope * (x - relu(x))``.
    """
    base = f"{_PREFIX}/{index}"
    pos, neg, scaled = (f"{base}/{part}".encode() for part in ("pos", "neg", "scaled"))
    if values is not None and (np.all(values <= 1) or np.all(values >= 1)):
        pick = "Max" if np.all(values <= 1) else "Min"
        return _node("Mul", f"{base}/mul", [x, slope], [scaled]) + _node(
            pick, f"{base}/{pick.lower()}", [x, scaled], [y]
        )
    return b"".join(
        [
            _node("Relu", f"{base}/relu", [x], [pos]),
            _node("Sub", f"{base}/sub", [x, pos], [neg]),
            _node("Mul", f"{base}/mul", [neg, slope], [scaled]),
            _node("Add", f"{base}/add", [pos, scaled], [y]),
        ]
    )


def _initializers(graph: memoryview) -> dict[bytes, memoryview]:
    """The graph's initializers (TensorProto bytes) by name."""
    found: dict[bytes, memoryview] = {}
    for field in _fields(graph):
        if field.number == _GRAPH_INITIALIZER and field.wire == _LENGTH_DELIMITED:
            for item in _fields(field.payload):
                if item.number == _TENSOR_NAME and item.wire == _LENGTH_DELIMITED:
                    found[bytes(item.payload)] = field.payload
    return found


def _rewrite_graph(graph: memoryview) -> tuple[bytes, int]:
    """The graph with its PRelu nodes split, and how many (0: nothing to do)."""
    parts: list[bytes | memoryview] = []
    split = 0
    initializers = _initializers(graph)
    for field in _fields(graph):
        raw = graph[field.start : field.end]
        if field.number != _GRAPH_NODE or field.wire != _LENGTH_DELIMITED:
            parts.append(raw)
            continue
        inputs: list[bytes] = []
        outputs: list[bytes] = []
        op_type = domain = b""
        for item in _fields(field.payload):
            if item.wire != _LENGTH_DELIMITED:
                continue
            if item.number == _NODE_INPUT:
                inputs.append(bytes(item.payload))
            elif item.number == _NODE_OUTPUT:
                outputs.append(bytes(item.payload))
            elif item.number == _NODE_OP_TYPE:
                op_type = bytes(item.payload)
            elif item.number == _NODE_DOMAIN:
                domain = bytes(item.payload)
        if op_type in _QUANTISATION_OPS:
            return b"", 0
        standard = domain in (b"", b"ai.onnx")
        if op_type == b"PRelu" and standard and len(inputs) == 2 and len(outputs) == 1:
            if not all(inputs + outputs):  # an omitted (empty) name: leave the node alone
                parts.append(raw)
                continue
            tensor = initializers.get(inputs[1])
            values = _float32_values(tensor) if tensor is not None else None
            parts.append(_split(split, inputs[0], inputs[1], outputs[0], values))
            split += 1
        else:
            parts.append(raw)
    return (b"".join(parts), split) if split else (b"", 0)


def split_prelu(model: bytes) -> bytes:
    """``model`` (ONNX bytes) with every top-level PRelu rewritten; unchanged if it has none,
    is quantised, already uses this module's names, or is not the protobuf expected."""
    if b"PRelu" not in model or _PREFIX.encode() in model:
        return model
    try:
        graphs = [f for f in _fields(memoryview(model)) if f.number == _MODEL_GRAPH]
        if len(graphs) != 1 or graphs[0].wire != _LENGTH_DELIMITED:
            return model
        graph = graphs[0]
        new_graph, split = _rewrite_graph(graph.payload)
    except _WireError:
        return model  # ONNX Runtime will say what is wrong with it
    if not split:
        return model
    return model[: graph.start] + _bytes_field(_MODEL_GRAPH, new_graph) + model[graph.end :]


def prelu_count(model: bytes) -> int:
    """PRelu nodes in the model's top-level graph (for tests and benchmarks)."""
    graphs = [f for f in _fields(memoryview(model)) if f.number == _MODEL_GRAPH]
    count = 0
    for graph in graphs:
        for node in _fields(graph.payload):
            if node.number == _GRAPH_NODE and node.wire == _LENGTH_DELIMITED:
                count += any(
                    f.number == _NODE_OP_TYPE and bytes(f.payload) == b"PRelu"
                    for f in _fields(node.payload)
                )
    return count
