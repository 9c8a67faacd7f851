"""Write dlib DNNs (parsed by :mod:`edgeid.models.dlib_dnn`) as ONNX graphs.

Public API: :func:`convert_dlib_mmod` (the MMOD CNN face detector's network) and
:func:`convert_dlib_resnet` (the 128-d face descriptor ResNet). Both write a reproducible file:
no timestamps, a fixed producer, stable node names, opset 17, so converting twice gives identical
bytes and the manifest's sha256 stays meaningful.

The graphs compute what dlib computes, layer for layer, without folding: the input layer's
``(pixel - avg) / 256`` is done inside the graph, affine layers stay a Mul and an Add after their
convolution (batch-norm layers stored in the file are folded into that affine form exactly as dlib
folds them when it loads the file), and ``add_prev`` zero-pads the smaller operand at the end of
each axis as dlib's ``tt::add`` does.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeid.models.conversion import ConvertedModel, TensorSpec
from edgeid.models.dlib_dnn import (
    AddPrevLayer,
    AffineLayer,
    Architecture,
    ConLayer,
    DlibNetwork,
    FcLayer,
    IdentityLayer,
    MetricLoss,
    MMODLoss,
    PoolLayer,
    ReluLayer,
    SkipLayer,
    TagLayer,
    mmod_architecture,
    parse_network,
    resnet_architecture,
)
from edgeid.runtime.errors import ModelError

logger = logging.getLogger(__name__)

# Fixed so the bytes do not depend on the onnx package's defaults or on the build date.
OPSET = 17
# IR version 8 is the one that introduced opset 17; any runtime that runs opset 17 reads it.
IR_VERSION = 8
PRODUCER_NAME = "edgeid-models"
PRODUCER_VERSION = "1"

MMOD_FILENAME = "dlib_mmod.onnx"
RESNET_FILENAME = "dlib_resnet_v1.onnx"

# dlib's input layers divide (pixel - avg) by this (dnn/input.h); a power of two, so the graph's
# multiplication by its reciprocal is exact.
_INPUT_DIVISOR = 256.0

# Constants of dlib's detection code that are not stored in the .dat file; the runtime needs
# them to reproduce dlib's tiled pyramid and thresholding (image_pyramid.h, loss.h).
_DLIB_PYRAMID_MIN_LEVEL_HEIGHT = 5
_DLIB_DEFAULT_ADJUST_THRESHOLD = 0.0

Shape = tuple[int | None, int | None, int | None]  # (channels, height, width); None = dynamic


@dataclass
class _GraphBuilder:
    """Accumulates nodes and initializers with deterministic, index-based names."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)

    def constant(self, name: str, value: npt.NDArray[Any]) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output


def _float32(array: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    return np.asarray(array, dtype=np.float32)


def _conv_out(size: int | None, kernel: int, stride: int, pad: int) -> int | None:
    # dlib and ONNX (ceil_mode=0) agree: 1 + (n + 2p - k) / s, rounded down.
    if size is None:
        return None
    out = 1 + (size + 2 * pad - kernel) // stride
    if out < 1:
        raise ModelError(f"input of size {size} is too small for a {kernel}-wide window")
    return out


def _emit_layers(
    builder: _GraphBuilder, network: DlibNetwork, current: str, shape: Shape
) -> tuple[str, Shape]:
    """Append one ONNX node group per dlib layer; returns the last tensor name and its shape."""
    tags: dict[int, tuple[str, Shape]] = {}
    for index, layer in enumerate(network.layers):
        prefix = f"l{index:03d}"
        channels, height, width = shape
        if isinstance(layer, ConLayer):
            if channels is not None and layer.weights.shape[1] != channels:
                raise ModelError(
                    f"layer {index + 1}: convolution expects {layer.weights.shape[1]} input "
                    f"channels, the previous layer gives {channels}"
                )
            inputs = [current, builder.constant(f"{prefix}_con_w", _float32(layer.weights))]
            if layer.bias is not None:
                inputs.append(builder.constant(f"{prefix}_con_b", _float32(layer.bias)))
            (kh, kw), (sy, sx), (py, px) = layer.kernel, layer.stride, layer.padding
            current = builder.node(
                "Conv",
                inputs,
                f"{prefix}_con",
                kernel_shape=[kh, kw],
                strides=[sy, sx],
                pads=[py, px, py, px],
            )
            if layer.fused_relu:
                current = builder.node("Relu", [current], f"{prefix}_con_relu")
            shape = (
                layer.num_filters,
                _conv_out(height, kh, sy, py),
                _conv_out(width, kw, sx, px),
            )
        elif isinstance(layer, AffineLayer):
            if layer.mode == "conv":
                bshape: tuple[int, ...] = (1, layer.gamma.size, 1, 1)
            else:
                bshape = (1, *layer.gamma.shape)
            gamma = builder.constant(
                f"{prefix}_affine_gamma", _float32(layer.gamma).reshape(bshape)
            )
            beta = builder.constant(f"{prefix}_affine_beta", _float32(layer.beta).reshape(bshape))
            scaled = builder.node("Mul", [current, gamma], f"{prefix}_affine_mul")
            current = builder.node("Add", [scaled, beta], f"{prefix}_affine")
        elif isinstance(layer, ReluLayer):
            current = builder.node("Relu", [current], f"{prefix}_relu")
        elif isinstance(layer, IdentityLayer):
            continue
        elif isinstance(layer, PoolLayer):
            current, shape = _emit_pool(builder, layer, prefix, current, shape)
        elif isinstance(layer, FcLayer):
            flat = builder.node("Flatten", [current], f"{prefix}_fc_flatten", axis=1)
            weights = builder.constant(f"{prefix}_fc_w", _float32(layer.weights))
            current = builder.node("MatMul", [flat, weights], f"{prefix}_fc")
            if layer.bias is not None:
                bias = builder.constant(f"{prefix}_fc_b", _float32(layer.bias))
                current = builder.node("Add", [current, bias], f"{prefix}_fc_bias")
            shape = (int(layer.weights.shape[1]), None, None)
        elif isinstance(layer, TagLayer):
            tags[layer.tag] = (current, shape)
        elif isinstance(layer, SkipLayer):
            if layer.tag not in tags:
                raise ModelError(f"layer {index + 1}: skip to tag{layer.tag}, which is not set")
            current, shape = tags[layer.tag]
        elif isinstance(layer, AddPrevLayer):
            if layer.tag not in tags:
                raise ModelError(f"layer {index + 1}: add_prev of tag{layer.tag}, which is not set")
            other, other_shape = tags[layer.tag]
            current, shape = _emit_add_prev(builder, prefix, current, shape, other, other_shape)
        else:  # pragma: no cover - the Layer union is exhaustive
            raise ModelError(f"layer {index + 1}: no ONNX mapping for {type(layer).__name__}")
    return current, shape


def _emit_pool(
    builder: _GraphBuilder, layer: PoolLayer, prefix: str, current: str, shape: Shape
) -> tuple[str, Shape]:
    channels, height, width = shape
    op = "Max" if layer.kind == "max" else "Average"
    if layer.kernel == (0, 0):  # avg_pool_everything / max_pool_everything
        current = builder.node(f"Global{op}Pool", [current], f"{prefix}_{layer.kind}_pool_all")
        return current, (channels, 1, 1)
    (kh, kw), (sy, sx), (py, px) = layer.kernel, layer.stride, layer.padding
    attrs: dict[str, Any] = {
        "kernel_shape": [kh, kw],
        "strides": [sy, sx],
        "pads": [py, px, py, px],
    }
    if op == "Average":
        attrs["count_include_pad"] = 0  # dlib averages only the cells inside the image
    current = builder.node(f"{op}Pool", [current], f"{prefix}_{layer.kind}_pool", **attrs)
    return current, (channels, _conv_out(height, kh, sy, py), _conv_out(width, kw, sx, px))


def _emit_add_prev(
    builder: _GraphBuilder, prefix: str, a: str, a_shape: Shape, b: str, b_shape: Shape
) -> tuple[str, Shape]:
    if a_shape == b_shape:
        return builder.node("Add", [a, b], f"{prefix}_add_prev"), a_shape
    a_dims = [d for d in a_shape if d is not None]
    b_dims = [d for d in b_shape if d is not None]
    if len(a_dims) != len(a_shape) or len(b_dims) != len(b_shape):
        raise ModelError(
            f"add_prev of tensors shaped {a_shape} and {b_shape} needs static shapes to pad"
        )
    target = [max(x, y) for x, y in zip(a_dims, b_dims, strict=True)]
    padded = []
    for side, (name, dims) in enumerate(((a, a_dims), (b, b_dims))):
        if dims == target:
            padded.append(name)
            continue
        # dlib's tt::add treats cells outside the smaller tensor as zero: pad at the end.
        ends = [0] + [t - d for t, d in zip(target, dims, strict=True)]
        pads = builder.constant(f"{prefix}_add_prev_pads{side}", np.array([0] * 4 + ends, np.int64))
        padded.append(builder.node("Pad", [name, pads], f"{prefix}_add_prev_pad{side}"))
    out_shape: Shape = (target[0], target[1], target[2])
    return builder.node("Add", padded, f"{prefix}_add_prev"), out_shape


def _emit_normalisation(builder: _GraphBuilder, network: DlibNetwork, current: str) -> str:
    avg = np.array(network.input.avg_rgb, dtype=np.float32).reshape(1, 3, 1, 1)
    mean = builder.constant("input_avg_rgb", avg)
    scale = builder.constant("input_scale", np.array(1.0 / _INPUT_DIVISOR, dtype=np.float32))
    centred = builder.node("Sub", [current, mean], "input_centred")
    return builder.node("Mul", [centred, scale], "input_normalised")


def _make_model(
    builder: _GraphBuilder,
    name: str,
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    source_sha256: str,
    doc: str,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        builder.nodes, name, inputs, outputs, initializer=builder.initializers, doc_string=doc
    )
    model = helper.make_model(
        graph,
        producer_name=PRODUCER_NAME,
        producer_version=PRODUCER_VERSION,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
    )
    helper.set_model_props(model, {"source_sha256": source_sha256})
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:  # pragma: no cover - a converter bug
        raise ModelError(f"generated ONNX graph for {name} is invalid: {exc}") from exc
    return model


def _write(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.SerializeToString(deterministic=True))
    tmp.replace(path)


def _read_source(source: Path) -> tuple[bytes, str]:
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read dlib model {source}: {exc}") from exc
    return data, hashlib.sha256(data).hexdigest()


def _convert_network(
    source: Path,
    dest: Path,
    architecture: Architecture,
    build: Callable[[DlibNetwork, str], onnx.ModelProto],
) -> tuple[DlibNetwork, str]:
    """Parse a dlib DNN ``.dat`` and write the ONNX graph ``build`` makes of it to ``dest``;
    returns the network and the source's sha256, for the manifest."""
    started = time.perf_counter()
    data, sha256 = _read_source(source)
    network = parse_network(data, architecture, source.name)
    _write(build(network, sha256), dest)
    logger.info("converted %s in %.2f s", source.name, time.perf_counter() - started)
    return network, sha256


# --------------------------------------------------------------------------------------------
# MMOD face detector.


def mmod_geometry(network: DlibNetwork) -> list[dict[str, Any]]:
    """Kernel, stride and padding of each con/pool layer, from the input to the output."""
    geometry: list[dict[str, Any]] = []
    for index, layer in enumerate(network.layers):
        if isinstance(layer, ConLayer | PoolLayer):
            entry: dict[str, Any] = {
                "layer": index + 1,
                "type": "con" if isinstance(layer, ConLayer) else f"{layer.kind}_pool",
                "kernel": list(layer.kernel),  # [rows, cols]
                "stride": list(layer.stride),  # [y, x]
                "padding": list(layer.padding),  # [y, x]
            }
            if isinstance(layer, ConLayer):
                entry["num_filters"] = layer.num_filters
            geometry.append(entry)
    return geometry


def output_to_input_affine(geometry: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Compose dlib's per-layer map_output_to_input (``p*stride - padding + kernel/2``, integer
    division) from the output back to the input into one ``p_in = p_out * scale + offset``."""
    scale = [1, 1]  # [x, y]
    offset = [0, 0]
    for entry in reversed(geometry):
        for axis, dim in ((0, 1), (1, 0)):  # x uses the column entries, y the row entries
            # dlib applies the layer nearest the output first: (p*S + O)*s + shift.
            stride = entry["stride"][dim]
            shift = -entry["padding"][dim] + entry["kernel"][dim] // 2
            scale[axis] = scale[axis] * stride
            offset[axis] = offset[axis] * stride + shift
    return {"scale_xy": scale, "offset_xy": offset}


def _mmod_parameters(network: DlibNetwork, source: Path, sha256: str) -> dict[str, Any]:
    loss = network.loss
    assert isinstance(loss, MMODLoss)
    inp = network.input
    geometry = mmod_geometry(network)
    windows = [
        {"width": w.width, "height": w.height, "label": w.label} for w in loss.detector_windows
    ]
    channels_per_window = 5 if loss.use_bounding_box_regression else 1
    return {
        "source_file": source.name,
        "source_sha256": sha256,
        "detector_windows": windows,
        "num_score_channels": len(windows) * channels_per_window,
        "loss_mmod": {
            "options_version": loss.options_version,
            "detector_windows": windows,
            "loss_per_false_alarm": loss.loss_per_false_alarm,
            "loss_per_missed_target": loss.loss_per_missed_target,
            "truth_match_iou_threshold": loss.truth_match_iou_threshold,
            "overlaps_nms": {
                "iou_thresh": loss.overlaps_nms_iou_thresh,
                "percent_covered_thresh": loss.overlaps_nms_percent_covered_thresh,
            },
            "overlaps_ignore": {
                "iou_thresh": loss.overlaps_ignore_iou_thresh,
                "percent_covered_thresh": loss.overlaps_ignore_percent_covered_thresh,
            },
            "assume_image_pyramid": loss.assume_image_pyramid,
            "use_bounding_box_regression": loss.use_bounding_box_regression,
            "bbr_lambda": loss.bbr_lambda,
        },
        "input_layer": {
            "type": inp.kind,
            "version": inp.version,
            "avg_rgb": list(inp.avg_rgb),
            "divisor": _INPUT_DIVISOR,
            "pyramid_padding": inp.pyramid_padding,
            "pyramid_outer_padding": inp.pyramid_outer_padding,
            # Old "input_rgb_image_pyramid" files do not store the paddings; dlib then uses
            # 10 and 11, which is what the two fields above hold.
            "pyramid_padding_stored_in_file": inp.version == "input_rgb_image_pyramid2",
            # pyramid_down<N> is a template argument (from the network type, not the file).
            "pyramid_down": inp.pyramid_down,
            "pyramid_level_scale": (inp.pyramid_down - 1) / inp.pyramid_down,
        },
        "layers": geometry,
        "output_to_input": output_to_input_affine(geometry),
        "dlib_constants": {
            # Not in the file: hard-coded in dlib's detection code.
            "pyramid_min_level_height": _DLIB_PYRAMID_MIN_LEVEL_HEIGHT,
            "default_adjust_threshold": _DLIB_DEFAULT_ADJUST_THRESHOLD,
        },
    }


def build_mmod_model(network: DlibNetwork, source_sha256: str) -> onnx.ModelProto:
    builder = _GraphBuilder()
    normalised = _emit_normalisation(builder, network, "image")
    last, shape = _emit_layers(builder, network, normalised, (3, None, None))
    builder.node("Identity", [last], "scores")
    inputs = [
        helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    ]
    outputs = [
        helper.make_tensor_value_info(
            "scores", TensorProto.FLOAT, ["batch", shape[0], "out_height", "out_width"]
        )
    ]
    doc = (
        "dlib MMOD CNN face detector network. Input: raw RGB values 0..255 as float32 NCHW of "
        "the tiled image pyramid (fill the background with the input layer's avg_rgb). "
        "Output: raw detection scores per detector window."
    )
    return _make_model(builder, "dlib_mmod", inputs, outputs, source_sha256, doc)


def convert_dlib_mmod(source: Path, dest_dir: Path) -> ConvertedModel:
    """Convert ``mmod_human_face_detector.dat`` to ``dest_dir/dlib_mmod.onnx``."""
    network, sha256 = _convert_network(
        source, dest_dir / MMOD_FILENAME, mmod_architecture(), build_mmod_model
    )
    parameters = _mmod_parameters(network, source, sha256)
    num_channels = parameters["num_score_channels"]
    return ConvertedModel(
        name="dlib_mmod",
        task="face-detection",
        filename=MMOD_FILENAME,
        format="onnx",
        inputs=[
            TensorSpec(
                "image",
                "float32",
                ["batch", 3, "height", "width"],
                "tiled image pyramid, raw RGB 0..255 (not normalised), NCHW; background = avg_rgb",
            )
        ],
        outputs=[
            TensorSpec(
                "scores",
                "float32",
                ["batch", num_channels, "out_height", "out_width"],
                "raw MMOD score per detector window and output position (> 0 means detection)",
            )
        ],
        preprocessing={
            "layout": "NCHW",
            "channel_order": "RGB",
            "dtype": "float32",
            "value_range": [0.0, 255.0],
            "normalisation": "in graph: (x - avg_rgb) / 256",
            "background_fill_rgb": list(network.input.avg_rgb),
        },
        parameters=parameters,
    )


# --------------------------------------------------------------------------------------------
# ResNet face descriptor.


def build_resnet_model(network: DlibNetwork, source_sha256: str) -> onnx.ModelProto:
    rows, cols = network.input.size
    builder = _GraphBuilder()
    as_float = builder.node("Cast", ["chips"], "input_float", to=TensorProto.FLOAT)
    nchw = builder.node("Transpose", [as_float], "input_nchw", perm=[0, 3, 1, 2])
    normalised = _emit_normalisation(builder, network, nchw)
    last, shape = _emit_layers(builder, network, normalised, (3, rows, cols))
    builder.node("Identity", [last], "descriptor")
    inputs = [helper.make_tensor_value_info("chips", TensorProto.UINT8, ["batch", rows, cols, 3])]
    outputs = [helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, ["batch", shape[0]])]
    doc = (
        "dlib face_recognition_model_v1 (ResNet). Input: uint8 NHWC RGB face chips as made by "
        "dlib.get_face_chip(size=150, padding=0.25). Output: dlib's raw 128-d descriptor."
    )
    return _make_model(builder, "dlib_resnet_v1", inputs, outputs, source_sha256, doc)


def _descriptor_dims(network: DlibNetwork) -> int:
    last = network.layers[-1]
    if not isinstance(last, FcLayer):
        raise ModelError("the face descriptor network must end in an fc layer")
    return int(last.weights.shape[1])


def convert_dlib_resnet(source: Path, dest_dir: Path) -> ConvertedModel:
    """Convert ``dlib_face_recognition_resnet_model_v1.dat`` to ``dest_dir/dlib_resnet_v1.onnx``."""
    network, sha256 = _convert_network(
        source, dest_dir / RESNET_FILENAME, resnet_architecture(), build_resnet_model
    )
    loss = network.loss
    assert isinstance(loss, MetricLoss)
    rows, cols = network.input.size
    dims = _descriptor_dims(network)
    return ConvertedModel(
        name="dlib_resnet_v1",
        task="face-embedding",
        filename=RESNET_FILENAME,
        format="onnx",
        inputs=[
            TensorSpec(
                "chips",
                "uint8",
                ["batch", rows, cols, 3],
                "RGB face chips, dlib.get_face_chip(size=150, padding=0.25) alignment",
            )
        ],
        outputs=[
            TensorSpec("descriptor", "float32", ["batch", dims], "dlib's raw face descriptor")
        ],
        preprocessing={
            "layout": "NHWC",
            "channel_order": "RGB",
            "dtype": "uint8",
            "chip_size": rows,
            "chip_padding": 0.25,
            "normalisation": "in graph: (x - avg_rgb) / 256",
        },
        parameters={
            "source_file": source.name,
            "source_sha256": sha256,
            "avg_rgb": list(network.input.avg_rgb),
            "descriptor_dims": dims,
            # loss_metric's training margin and distance threshold: dlib's suggested
            # same-person cut-off is a Euclidean distance below dist_thresh.
            "metric_margin": loss.margin,
            "metric_dist_thresh": loss.dist_thresh,
        },
    )
