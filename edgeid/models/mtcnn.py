"""Convert facenet-pytorch's MTCNN (P-Net, R-Net, O-Net) weights to ONNX, without torch.

Source: the facenet-pytorch 2.6.0 wheel (MIT), ``facenet_pytorch/data/{pnet,rnet,onet}.pt``,
read straight out of the zip and checked against its pinned sha256. The graphs are written with
``onnx.helper`` from our own description of the three networks (the layer list below), so the
output is byte-reproducible: fixed producer, no timestamps, names taken from the state_dict keys.

What the graphs compute, per network (all convolutions unpadded, stride 1):

* P-Net, fully convolutional, input ``[batch, 3, height, width]``:
  conv3x3(10) PReLU maxpool2/2 conv3x3(16) PReLU conv3x3(32) PReLU, then two 1x1 heads:
  ``box_deltas`` (4 channels) and ``probabilities`` (softmax over 2 channels: not-face, face).
* R-Net, input ``[batch, 3, 24, 24]``: conv3x3(28) PReLU maxpool3/2 conv3x3(48) PReLU maxpool3/2
  conv2x2(64) PReLU dense(128) PReLU, heads ``box_deltas`` (4) and ``probabilities`` (2).
* O-Net, input ``[batch, 3, 48, 48]``: conv3x3(32) PReLU maxpool3/2 conv3x3(64) PReLU maxpool3/2
  conv3x3(64) PReLU maxpool2/2 conv2x2(128) PReLU dense(256) PReLU, heads ``box_deltas`` (4),
  ``landmarks`` (10: five x then five y, relative to the box) and ``probabilities`` (2).

Max pooling uses ceil mode. Before the dense layer, facenet-pytorch permutes the feature map to
(batch, width, height, channels) (the weights descend from a Caffe model trained on transposed
images); the graph does the same with a Transpose.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeid.models.conversion import ConvertedModel, TensorSpec
from edgeid.models.sources import FACENET_LICENCE, FACENET_WHEEL, FACENET_WHEEL_SHA256
from edgeid.models.torch_weights import load_state_dict
from edgeid.runtime.errors import ModelError

logger = logging.getLogger(__name__)

# ONNX opset and IR version: opset 17 needs IR >= 8; IR 8 keeps onnxruntime >= 1.13 able to load.
OPSET = 17
IR_VERSION = 8
# Fixed producer fields: part of the bytes, so they must never carry a version that drifts.
PRODUCER_NAME = "edgeid-models"
PRODUCER_VERSION = "1"

# facenet-pytorch 2.6.0 MTCNN defaults (MTCNN.__init__ and detect_face): the values the weights
# were published and evaluated with.
MIN_FACE_SIZE = 20
SCALE_FACTOR = 0.709
PNET_THRESHOLD = 0.6
RNET_THRESHOLD = 0.7
ONET_THRESHOLD = 0.7
# NMS: IoU within one pyramid scale, then across scales, after R-Net; O-Net uses overlap over the
# smaller box ("Min"), which removes a small box nested inside a larger one.
PNET_SCALE_NMS_IOU = 0.5
PNET_NMS_IOU = 0.7
RNET_NMS_IOU = 0.7
ONET_NMS_MIN_OVERLAP = 0.7
# P-Net sees 12x12 windows at stride 2 in each pyramid level.
PNET_CELL_SIZE = 12
PNET_STRIDE = 2
RNET_INPUT = 24
ONET_INPUT = 48
# Input normalisation: (pixel - 127.5) * 0.0078125, i.e. [0, 255] -> about [-1, 1].
PIXEL_MEAN = 127.5
PIXEL_SCALE = 0.0078125

# Layer lists: (kind, state_dict prefix, arguments). conv: (out, in, kernel); prelu: (channels,);
# pool: (kernel, stride); flatten: (); dense: (out, in).
_Layer = tuple[str, str, tuple[int, ...]]
_PNET_TRUNK: list[_Layer] = [
    ("conv", "conv1", (10, 3, 3)), ("prelu", "prelu1", (10,)), ("pool", "pool1", (2, 2)),
    ("conv", "conv2", (16, 10, 3)), ("prelu", "prelu2", (16,)),
    ("conv", "conv3", (32, 16, 3)), ("prelu", "prelu3", (32,)),
]  # fmt: skip
_RNET_TRUNK: list[_Layer] = [
    ("conv", "conv1", (28, 3, 3)), ("prelu", "prelu1", (28,)), ("pool", "pool1", (3, 2)),
    ("conv", "conv2", (48, 28, 3)), ("prelu", "prelu2", (48,)), ("pool", "pool2", (3, 2)),
    ("conv", "conv3", (64, 48, 2)), ("prelu", "prelu3", (64,)),
    ("flatten", "flatten", ()), ("dense", "dense4", (128, 576)), ("prelu", "prelu4", (128,)),
]  # fmt: skip
_ONET_TRUNK: list[_Layer] = [
    ("conv", "conv1", (32, 3, 3)), ("prelu", "prelu1", (32,)), ("pool", "pool1", (3, 2)),
    ("conv", "conv2", (64, 32, 3)), ("prelu", "prelu2", (64,)), ("pool", "pool2", (3, 2)),
    ("conv", "conv3", (64, 64, 3)), ("prelu", "prelu3", (64,)), ("pool", "pool3", (2, 2)),
    ("conv", "conv4", (128, 64, 2)), ("prelu", "prelu4", (128,)),
    ("flatten", "flatten", ()), ("dense", "dense5", (256, 1152)), ("prelu", "prelu5", (256,)),
]  # fmt: skip


@dataclass(frozen=True)
class _Head:
    output: str  # graph output name
    prefix: str  # state_dict prefix of the 1x1 conv (P-Net) or dense layer
    channels: int
    softmax: bool
    meaning: str


@dataclass(frozen=True)
class _Net:
    name: str  # "pnet" | "rnet" | "onet"
    trunk: list[_Layer]
    heads: list[_Head]
    input_hw: tuple[int | str, int | str]
    input_meaning: str
    parameters: dict[str, Any]


_DELTAS = "box regression: offsets of x0, y0, x1, y1 as fractions of the input window's size"
_PROBS = "softmax over (not face, face)"
_LANDMARKS = "five x then five y (eyes, nose, mouth corners) as fractions of the input box"
_NETS: list[_Net] = [
    _Net(
        "pnet",
        _PNET_TRUNK,
        [
            _Head("box_deltas", "conv4_2", 4, False, _DELTAS + ", per 12x12 cell at stride 2"),
            _Head("probabilities", "conv4_1", 2, True, _PROBS + ", per 12x12 cell at stride 2"),
        ],
        ("height", "width"),
        "one pyramid level of the image, normalised",
        {
            "stage": "pnet",
            "score_threshold": PNET_THRESHOLD,
            "min_face_size": MIN_FACE_SIZE,
            "scale_factor": SCALE_FACTOR,
            "cell_size": PNET_CELL_SIZE,
            "stride": PNET_STRIDE,
            "scale_nms_iou": PNET_SCALE_NMS_IOU,
            "nms_iou": PNET_NMS_IOU,
        },
    ),
    _Net(
        "rnet",
        _RNET_TRUNK,
        [
            _Head("box_deltas", "dense5_2", 4, False, _DELTAS),
            _Head("probabilities", "dense5_1", 2, True, _PROBS),
        ],
        (RNET_INPUT, RNET_INPUT),
        "24x24 candidate crops, normalised",
        {"stage": "rnet", "score_threshold": RNET_THRESHOLD, "nms_iou": RNET_NMS_IOU},
    ),
    _Net(
        "onet",
        _ONET_TRUNK,
        [
            _Head("box_deltas", "dense6_2", 4, False, _DELTAS),
            _Head("landmarks", "dense6_3", 10, False, _LANDMARKS),
            _Head("probabilities", "dense6_1", 2, True, _PROBS),
        ],
        (ONET_INPUT, ONET_INPUT),
        "48x48 candidate crops, normalised",
        {
            "stage": "onet",
            "score_threshold": ONET_THRESHOLD,
            "nms_min_overlap": ONET_NMS_MIN_OVERLAP,
        },
    ),
]

_PREPROCESSING: dict[str, Any] = {
    "color": "RGB",
    "layout": "NCHW",
    "dtype": "float32",
    "mean": PIXEL_MEAN,
    "scale": PIXEL_SCALE,
    "formula": "(pixel - mean) * scale",
    # facenet-pytorch resizes both the pyramid and the R-/O-Net crops with
    # torch.nn.functional.interpolate(mode="area"), i.e. adaptive average pooling.
    "resize": "area (adaptive average pooling)",
}

_INPUT_NAME = "image"

FloatArray = npt.NDArray[np.float32]


class _GraphBuilder:
    """Collects nodes and initializers with deterministic, readable names."""

    def __init__(self, net: str, weights: dict[str, npt.NDArray[Any]]) -> None:
        self._net = net
        self._weights = weights
        self._used: set[str] = set()
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def weight(self, key: str, shape: tuple[int, ...], view: tuple[int, ...] | None = None) -> str:
        """Register state_dict entry ``key`` (checked against ``shape``) as an initializer."""
        array = self._weights.get(key)
        if array is None:
            raise ModelError(f"mtcnn {self._net}: weight {key} missing from the state_dict")
        if array.shape != shape or array.dtype != np.float32:
            raise ModelError(
                f"mtcnn {self._net}: weight {key} is {array.dtype}{list(array.shape)}, "
                f"expected float32{list(shape)}"
            )
        if not np.isfinite(array).all():
            raise ModelError(f"mtcnn {self._net}: weight {key} holds NaN or infinity")
        self._used.add(key)
        tensor = np.ascontiguousarray(array.reshape(view) if view else array)
        self.initializers.append(numpy_helper.from_array(tensor, name=key))
        return key

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=f"{output}/{op}", **attrs))
        return output

    def check_all_used(self) -> None:
        unused = sorted(set(self._weights) - self._used)
        if unused:
            raise ModelError(f"mtcnn {self._net}: unexpected weights in the state_dict: {unused}")


def _build_graph(net: _Net, weights: dict[str, npt.NDArray[Any]]) -> onnx.ModelProto:
    g = _GraphBuilder(net.name, weights)
    x = _INPUT_NAME
    flat = False  # True once the feature map has been flattened for the dense layers
    for kind, prefix, args in net.trunk:
        if kind == "conv":
            out_c, in_c, k = args
            w = g.weight(f"{prefix}.weight", (out_c, in_c, k, k))
            b = g.weight(f"{prefix}.bias", (out_c,))
            x = g.node("Conv", [x, w, b], prefix, kernel_shape=[k, k])
        elif kind == "prelu":
            (c,) = args
            # PReLU's slope broadcasts against NCHW as (C, 1, 1), against (N, C) as (C,).
            view = None if flat else (c, 1, 1)
            x = g.node("PRelu", [x, g.weight(f"{prefix}.weight", (c,), view)], prefix)
        elif kind == "pool":
            k, s = args
            x = g.node("MaxPool", [x], prefix, kernel_shape=[k, k], strides=[s, s], ceil_mode=1)
        elif kind == "flatten":
            # (N, C, H, W) -> (N, W, H, C) -> (N, W*H*C): facenet-pytorch's permute(0, 3, 2, 1).
            x = g.node("Transpose", [x], "permute", perm=[0, 3, 2, 1])
            x = g.node("Flatten", [x], prefix, axis=1)
            flat = True
        elif kind == "dense":
            out_f, in_f = args
            w = g.weight(f"{prefix}.weight", (out_f, in_f))
            b = g.weight(f"{prefix}.bias", (out_f,))
            x = g.node("Gemm", [x, w, b], prefix, transB=1)
        else:  # pragma: no cover - the layer lists above are fixed
            raise AssertionError(kind)

    trunk_out = x
    in_features = net.trunk[-1][2][0]  # channels of the trunk's last PReLU
    outputs: list[onnx.ValueInfoProto] = []
    for head in net.heads:
        # A softmax head's layer output is the logits; otherwise it is the graph output itself.
        y = head.prefix if head.softmax else head.output
        if flat:
            w = g.weight(f"{head.prefix}.weight", (head.channels, in_features))
            b = g.weight(f"{head.prefix}.bias", (head.channels,))
            g.node("Gemm", [trunk_out, w, b], y, transB=1)
            shape: list[int | str] = ["batch", head.channels]
        else:
            w = g.weight(f"{head.prefix}.weight", (head.channels, in_features, 1, 1))
            b = g.weight(f"{head.prefix}.bias", (head.channels,))
            g.node("Conv", [trunk_out, w, b], y, kernel_shape=[1, 1])
            shape = ["batch", head.channels, "out_height", "out_width"]
        if head.softmax:
            g.node("Softmax", [y], head.output, axis=1)
        outputs.append(helper.make_tensor_value_info(head.output, TensorProto.FLOAT, shape))
    g.check_all_used()

    inputs = [
        helper.make_tensor_value_info(
            _INPUT_NAME, TensorProto.FLOAT, ["batch", 3, net.input_hw[0], net.input_hw[1]]
        )
    ]
    graph = helper.make_graph(g.nodes, f"mtcnn_{net.name}", inputs, outputs, g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER_NAME,
        producer_version=PRODUCER_VERSION,
        ir_version=IR_VERSION,
    )
    helper.set_model_props(
        model,
        {
            "source": f"{FACENET_WHEEL}:facenet_pytorch/data/{net.name}.pt",
            "source_sha256": FACENET_WHEEL_SHA256,
            "licence": f"{FACENET_LICENCE} (facenet-pytorch)",
        },
    )
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:  # a bug in this converter, not in the input
        raise ModelError(f"mtcnn {net.name}: generated graph is invalid: {exc}") from exc
    return model


def _read_wheel(wheel: Path) -> zipfile.ZipFile:
    try:
        data = wheel.read_bytes()
    except OSError as exc:
        raise ModelError(f"mtcnn: cannot read {wheel}: {exc.strerror}") from exc
    # edgeid.models.build checks this too; a direct caller must not convert some other wheel.
    digest = hashlib.sha256(data).hexdigest()
    if digest != FACENET_WHEEL_SHA256:
        raise ModelError(
            f"mtcnn: {wheel} has sha256 {digest[:12]}…, expected {FACENET_WHEEL_SHA256[:12]}… "
            f"({FACENET_WHEEL})"
        )
    return zipfile.ZipFile(io.BytesIO(data))


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _tensor_spec(value: onnx.ValueInfoProto, meaning: str) -> TensorSpec:
    dims: list[int | str] = [
        d.dim_param if d.HasField("dim_param") else d.dim_value
        for d in value.type.tensor_type.shape.dim
    ]
    return TensorSpec(value.name, "float32", dims, meaning)


def convert_mtcnn(wheel: Path, dest_dir: Path) -> list[ConvertedModel]:
    """Write ``mtcnn_{pnet,rnet,onet}.onnx`` into ``dest_dir`` from the facenet-pytorch wheel.

    Raises ``ModelError`` if the wheel is not the pinned one or its weights are not what the
    architecture expects.
    """
    archive = _read_wheel(wheel)
    dest_dir.mkdir(parents=True, exist_ok=True)
    converted: list[ConvertedModel] = []
    for net in _NETS:
        member = f"facenet_pytorch/data/{net.name}.pt"
        try:
            raw = archive.read(member)
        except KeyError:
            raise ModelError(f"mtcnn: {member} missing from {wheel}") from None
        model = _build_graph(net, load_state_dict(raw))
        filename = f"mtcnn_{net.name}.onnx"
        _write_atomically(dest_dir / filename, model.SerializeToString())
        logger.info("wrote %s", dest_dir / filename)
        meanings = {head.output: head.meaning for head in net.heads}
        converted.append(
            ConvertedModel(
                name=f"mtcnn_{net.name}",
                task="face-detection",
                filename=filename,
                format="onnx",
                inputs=[_tensor_spec(model.graph.input[0], net.input_meaning)],
                outputs=[_tensor_spec(o, meanings[o.name]) for o in model.graph.output],
                preprocessing=dict(_PREPROCESSING),
                parameters=dict(net.parameters),
            )
        )
    return converted
