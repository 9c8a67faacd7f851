"""Rewrite an ONNX model's PRelu nodes as Relu, Sub, Mul and Add: the same numbers, faster.

ONNX Runtime's CPU PRelu (1.32) is a slow broadcasting kernel outside its NCHWc conv layout:
measured on MTCNN's nets (benchmarks/mtcnn_stage_bench.py), the first PRelu alone took more
time than the convolutions around it, and R-Net ran 1.6-1.9x faster, P-Net and O-Net
1.4-1.6x, once every PRelu was written as

    prelu(x, slope) = relu(x) + slope * (x - relu(x))

This is exact, not an approximation: for ``x >= 0`` it is ``x + slope * 0 = x``, and for
``x < 0`` it is ``0 + slope * x``, the one product PRelu itself rounds. Only the sign of a zero
result can differ, which no later operation tells apart. No constant is added, so the rewrite
holds for any float type; ``slope`` broadcasts against ``x`` in Mul as it does in PRelu.

The model bytes are read as protobuf wire format (ONNX's ``ModelProto``), so this needs no
``onnx`` package on the box; only the top-level graph's nodes are rewritten. A quantised (QDQ)
graph, where ONNX Runtime fuses operators with the quantisation nodes around them, is returned
unchanged, as is anything this reader does not expect.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

# Field numbers in onnx.proto3: ModelProto.graph; GraphProto.node;
# NodeProto.input, .output, .name, .op_type, .domain.
_MODEL_GRAPH = 7
_GRAPH_NODE = 1
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
        if wire == _VARINT:
            _, pos = _read_varint(data, pos)
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
        yield _Field(number, wire, start, pos, payload)


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


def _split(index: int, x: bytes, slope: bytes, y: bytes) -> bytes:
    """Four nodes computing y = relu(x) + slope * (x - relu(x))."""
    base = f"{_PREFIX}/{index}"
    pos, neg, scaled = (f"{base}/{part}".encode() for part in ("pos", "neg", "scaled"))
    return b"".join(
        [
            _node("Relu", f"{base}/relu", [x], [pos]),
            _node("Sub", f"{base}/sub", [x, pos], [neg]),
            _node("Mul", f"{base}/mul", [neg, slope], [scaled]),
            _node("Add", f"{base}/add", [pos, scaled], [y]),
        ]
    )


def _rewrite_graph(graph: memoryview) -> tuple[bytes, int]:
    """The graph with its PRelu nodes split, and how many (0: nothing to do)."""
    parts: list[bytes | memoryview] = []
    split = 0
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
            parts.append(_split(split, inputs[0], inputs[1], outputs[0]))
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
