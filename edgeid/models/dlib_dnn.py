"""Parse dlib DNN ``.dat`` files into typed layer dataclasses.

dlib serializes a network as nested C++ templates: ``add_loss_layer`` holds the loss details and
its subnetwork; every ``add_layer`` writes a version integer, then its whole subnetwork, then its
own details (which start with a per-type version string such as ``"con_4"``); tag and skip
layers write only a version integer and their subnetwork. So the stream reads

    loss | version(top layer) ... version(first layer) | input layer | body(first) ... body(top)

Tag and skip layers leave no bytes after their subnetwork and ``add_prev`` does not store which
tag it reads, so the topology is not recoverable from the bytes alone: exactly like dlib itself,
we parse against the network type, written out here as an :class:`Architecture` mirroring the
C++ templates in dlib's ``tools/python/src/{cnn_face_detector,face_recognition}.cpp``. Every
layer tag, version and kernel/stride/padding value in the file is checked against it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from edgeid.models.dlib_serialization import DlibReader
from edgeid.runtime.errors import ModelError

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

# add_layer versions dlib accepts: over another layer 1..2, directly over the input 2..3.
_ADD_LAYER_VERSIONS = (1, 2)
_INPUT_ADD_LAYER_VERSIONS = (2, 3)
# add_tag_layer / add_skip_layer / add_loss_layer all write version 1.
_WRAPPER_VERSION = 1
# dlib's layer_mode enum (layers.h): per-channel vs per-element affine/batch-norm.
_CONV_MODE = 0
_FC_MODE = 1
# dlib's fc_bias_mode enum (layers.h).
_FC_HAS_BIAS = 0
_FC_NO_BIAS = 1
# Versions of mmod_options / detector_window_details dlib can read (loss.h).
_MMOD_OPTIONS_VERSIONS = (1, 2, 3, 4)
_DETECTOR_WINDOW_VERSIONS = (1, 2)
# mmod_options defaults for fields absent from old versions (loss.h, mmod_options()).
_MMOD_DEFAULT_BBR_LAMBDA = 100.0
_USE_IMAGE_PYRAMID_YES = 1
# input_rgb_image_pyramid's defaults when the file predates storing them ("..._pyramid", v1).
_DEFAULT_PYRAMID_PADDING = 10
_DEFAULT_PYRAMID_OUTER_PADDING = 11
# loss_metric_ v1 hard-coded these (loss.h).
_METRIC_V1_MARGIN = 0.1
_METRIC_V1_DIST_THRESH = 0.75


# --------------------------------------------------------------------------------------------
# Architecture: what the C++ network type says, layer by layer from the input.


@dataclass(frozen=True)
class LayerSpec:
    """One layer of a network type; ``tag`` is the tag id for tag/skip/add_prev."""

    kind: Literal["con", "affine", "relu", "max_pool", "avg_pool", "fc", "add_prev", "tag", "skip"]
    kernel: tuple[int, int] = (0, 0)  # (nr, nc); 0 means "the whole input" for pooling
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    tag: int = 0
    fc_bias: bool = True


def _default_padding(kernel: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int]:
    """dlib's template default: 'same' padding for stride 1, none otherwise."""
    return (
        kernel[0] // 2 if stride[0] == 1 else 0,
        kernel[1] // 2 if stride[1] == 1 else 0,
    )


def con(k: int, s: int) -> LayerSpec:
    kernel, stride = (k, k), (s, s)
    return LayerSpec("con", kernel, stride, _default_padding(kernel, stride))


def pool(kind: Literal["max_pool", "avg_pool"], k: int, s: int) -> LayerSpec:
    kernel, stride = (k, k), (s, s)
    return LayerSpec(kind, kernel, stride, _default_padding(kernel, stride))


AFFINE = LayerSpec("affine")
RELU = LayerSpec("relu")


@dataclass(frozen=True)
class Architecture:
    name: str
    input_kind: Literal["input_rgb_image_sized", "input_rgb_image_pyramid"]
    loss_kind: Literal["loss_mmod", "loss_metric"]
    layers: tuple[LayerSpec, ...]  # from the input to the loss
    input_size: tuple[int, int] = (0, 0)  # input_rgb_image_sized<NR, NC>
    pyramid_down: int = 0  # input_rgb_image_pyramid<pyramid_down<N>>


def mmod_architecture() -> Architecture:
    """``loss_mmod<con<1,9,9,1,1,rcon5<rcon5<rcon5<downsampler<input_rgb_image_pyramid<
    pyramid_down<6>>>>>>>>`` from dlib's cnn_face_detector."""
    layers: list[LayerSpec] = []
    for _ in range(3):  # downsampler: three con5d (5x5, stride 2) + affine + relu
        layers += [con(5, 2), AFFINE, RELU]
    for _ in range(3):  # rcon5: 5x5 stride 1
        layers += [con(5, 1), AFFINE, RELU]
    layers.append(con(9, 1))
    return Architecture(
        "dlib_mmod",
        "input_rgb_image_pyramid",
        "loss_mmod",
        tuple(layers),
        pyramid_down=6,
    )


def _res_block(stride: int) -> list[LayerSpec]:
    # block<N,BN,stride> = BN<con<N,3,3,1,1,relu<BN<con<N,3,3,stride,stride,SUBNET>>>>>
    return [con(3, stride), AFFINE, RELU, con(3, 1), AFFINE]


def _ares() -> list[LayerSpec]:
    # relu<add_prev1<block<N,affine,1,tag1<SUBNET>>>>
    return [LayerSpec("tag", tag=1), *_res_block(1), LayerSpec("add_prev", tag=1), RELU]


def _ares_down() -> list[LayerSpec]:
    # relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,affine,2,tag1<SUBNET>>>>>>>
    return [
        LayerSpec("tag", tag=1),
        *_res_block(2),
        LayerSpec("tag", tag=2),
        LayerSpec("skip", tag=1),
        pool("avg_pool", 2, 2),
        LayerSpec("add_prev", tag=2),
        RELU,
    ]


def resnet_architecture() -> Architecture:
    """``anet_type`` of dlib's face_recognition_model_v1 (29 conv layers, 128-d output)."""
    layers: list[LayerSpec] = [con(7, 2), AFFINE, RELU, pool("max_pool", 3, 2)]
    layers += _ares() * 3  # alevel4: 32 filters
    layers += _ares_down() + _ares() * 3  # alevel3: 64
    layers += _ares_down() + _ares() * 2  # alevel2: 128
    layers += _ares_down() + _ares() * 2  # alevel1: 256
    layers += _ares_down()  # alevel0: 256
    # avg_pool_everything = avg_pool<0,0,1,1>; fc_no_bias<128>
    layers += [LayerSpec("avg_pool", (0, 0), (1, 1), (0, 0)), LayerSpec("fc", fc_bias=False)]
    return Architecture(
        "dlib_resnet_v1",
        "input_rgb_image_sized",
        "loss_metric",
        tuple(layers),
        input_size=(150, 150),
    )


# --------------------------------------------------------------------------------------------
# Parsed layers.


@dataclass(frozen=True, eq=False)
class ConLayer:
    weights: FloatArray  # (num_filters, in_channels, kernel_h, kernel_w), cross-correlation
    bias: FloatArray | None  # (num_filters,)
    stride: tuple[int, int]  # (y, x)
    padding: tuple[int, int]  # (y, x), zero padding
    fused_relu: bool = False  # con_6's use_relu

    @property
    def num_filters(self) -> int:
        return int(self.weights.shape[0])

    @property
    def kernel(self) -> tuple[int, int]:
        return int(self.weights.shape[2]), int(self.weights.shape[3])


@dataclass(frozen=True, eq=False)
class AffineLayer:
    """y = x * gamma + beta; in conv mode per channel, in fc mode per element."""

    gamma: FloatArray  # conv mode: (k,); fc mode: (k, nr, nc)
    beta: FloatArray
    mode: Literal["conv", "fc"]
    source: str  # "affine_" or "bn_con2"/"bn_fc2" (batch norm folded at load time, as dlib does)


@dataclass(frozen=True)
class ReluLayer:
    pass


@dataclass(frozen=True)
class IdentityLayer:
    """A layer dlib serialized as disabled (affine_2/relu_2 with disabled=true)."""

    source: str


@dataclass(frozen=True)
class PoolLayer:
    kind: Literal["max", "avg"]
    kernel: tuple[int, int]  # (0, 0) pools the whole input (avg_pool_everything)
    stride: tuple[int, int]
    padding: tuple[int, int]  # padded cells are excluded (max: -inf, avg: not counted)


@dataclass(frozen=True, eq=False)
class FcLayer:
    weights: FloatArray  # (num_inputs, num_outputs): y = flatten(x) @ weights
    bias: FloatArray | None  # (num_outputs,)


@dataclass(frozen=True)
class AddPrevLayer:
    """Adds the output of tag ``tag``; a smaller operand is zero-padded at the end of each axis."""

    tag: int


@dataclass(frozen=True)
class TagLayer:
    tag: int


@dataclass(frozen=True)
class SkipLayer:
    """Continues from the output of tag ``tag`` instead of the previous layer."""

    tag: int


Layer = (
    ConLayer
    | AffineLayer
    | ReluLayer
    | IdentityLayer
    | PoolLayer
    | FcLayer
    | AddPrevLayer
    | TagLayer
    | SkipLayer
)


@dataclass(frozen=True)
class RGBInput:
    """dlib's RGB input layers: channel c of the tensor is ``(pixel_c - avg[c]) / 256``."""

    kind: Literal["input_rgb_image_sized", "input_rgb_image_pyramid"]
    version: str
    avg_rgb: tuple[float, float, float]
    size: tuple[int, int] = (0, 0)  # (nr, nc) for input_rgb_image_sized
    pyramid_padding: int = 0
    pyramid_outer_padding: int = 0
    pyramid_down: int = 0  # template argument N of pyramid_down<N>: each level is (N-1)/N


@dataclass(frozen=True)
class DetectorWindow:
    width: int
    height: int
    label: str


@dataclass(frozen=True)
class MMODLoss:
    options_version: int
    detector_windows: tuple[DetectorWindow, ...]
    loss_per_false_alarm: float
    loss_per_missed_target: float
    truth_match_iou_threshold: float
    overlaps_nms_iou_thresh: float
    overlaps_nms_percent_covered_thresh: float
    overlaps_ignore_iou_thresh: float
    overlaps_ignore_percent_covered_thresh: float
    assume_image_pyramid: int
    use_bounding_box_regression: bool
    bbr_lambda: float


@dataclass(frozen=True)
class MetricLoss:
    margin: float
    dist_thresh: float


@dataclass(frozen=True)
class DlibNetwork:
    architecture: Architecture
    input: RGBInput
    layers: tuple[Layer, ...]  # from the input to the loss
    loss: MMODLoss | MetricLoss


# --------------------------------------------------------------------------------------------
# Parsing.


def load_network(path: Path, architecture: Architecture) -> DlibNetwork:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read dlib model {path}: {exc}") from exc
    return parse_network(data, architecture, source=path.name)


def parse_network(data: bytes, architecture: Architecture, source: str) -> DlibNetwork:
    reader = DlibReader(data, source)
    specs = architecture.layers
    count = len(specs)
    with reader.section("loss layer"):
        reader.expect_int((_WRAPPER_VERSION,), "add_loss_layer version")
        loss: MMODLoss | MetricLoss
        if architecture.loss_kind == "loss_mmod":
            loss = _read_loss_mmod(reader)
        else:
            loss = _read_loss_metric(reader)

    # Wrapper versions, outermost (last layer) first.
    versions = [0] * count
    for index in reversed(range(count)):
        spec = specs[index]
        with reader.section(_layer_name(index, count, spec.kind) + " header"):
            if spec.kind in ("tag", "skip"):
                if index == 0:
                    raise ModelError(
                        f"{source}: a {spec.kind} directly over the input is unsupported"
                    )
                versions[index] = reader.expect_int((_WRAPPER_VERSION,), f"add_{spec.kind} version")
            elif index == 0:
                versions[index] = reader.expect_int(_INPUT_ADD_LAYER_VERSIONS, "add_layer version")
            else:
                versions[index] = reader.expect_int(_ADD_LAYER_VERSIONS, "add_layer version")

    with reader.section("input layer"):
        input_layer = _read_input(reader, architecture)

    layers: list[Layer] = []
    for index, spec in enumerate(specs):
        name = _layer_name(index, count, spec.kind)
        with reader.section(name):
            if spec.kind == "tag":
                layers.append(TagLayer(spec.tag))
                continue
            if spec.kind == "skip":
                layers.append(SkipLayer(spec.tag))
                continue
            layers.append(_read_details(reader, spec))
            _skip_add_layer_state(reader, versions[index], over_input=index == 0)

    if not reader.at_end():
        raise reader.error(f"{reader.remaining} unexpected bytes after the network")
    logger.debug("parsed %s: %d layers from %d bytes", source, count, len(data))
    return DlibNetwork(architecture, input_layer, tuple(layers), loss)


def _layer_name(index: int, count: int, kind: str) -> str:
    return f"layer {index + 1}/{count} from the input ({kind})"


def _skip_add_layer_state(reader: DlibReader, version: int, over_input: bool) -> None:
    """The training state add_layer stores after the details; inference does not use it."""
    reader.read_bool("this_layer_setup_called")
    reader.read_bool("gradient_input_is_stale")
    reader.read_bool("get_output_and_gradient_input_disabled")
    reader.read_tensor("x_grad")
    reader.read_tensor("cached_output")
    if over_input:
        reader.read_tensor("grad_final")
        if version >= 3:
            reader.read_uint("sample_expansion_factor")
    elif version >= 2:
        reader.read_tensor("params_grad")


def _read_details(reader: DlibReader, spec: LayerSpec) -> Layer:
    if spec.kind == "con":
        return _read_con(reader, spec)
    if spec.kind == "affine":
        return _read_affine(reader)
    if spec.kind == "relu":
        return _read_relu(reader)
    if spec.kind in ("max_pool", "avg_pool"):
        return _read_pool(reader, spec)
    if spec.kind == "fc":
        return _read_fc(reader, spec)
    if spec.kind == "add_prev":
        reader.expect_string(("add_prev_",), "layer tag")
        return AddPrevLayer(spec.tag)
    raise ModelError(
        f"{reader.source}: layer kind {spec.kind!r} cannot be read"
    )  # pragma: no cover


def _check_geometry(
    reader: DlibReader,
    spec: LayerSpec,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    start: int,
) -> None:
    found = (kernel, stride, padding)
    expected = (spec.kernel, spec.stride, spec.padding)
    if found != expected:
        raise reader.error(
            f"{spec.kind} geometry (kernel, stride, padding) {found} does not match the "
            f"network type's {expected}",
            start,
        )


def _params_slice(
    reader: DlibReader, params: FloatArray, offset: int, shape: tuple[int, ...], what: str
) -> FloatArray:
    flat = params.reshape(-1)
    size = int(np.prod(shape, dtype=np.int64))
    if offset + size > flat.size:
        raise reader.error(
            f"{what} of shape {shape} at offset {offset} overruns the parameter tensor "
            f"({flat.size} values)"
        )
    return flat[offset : offset + size].reshape(shape).copy()


def _read_con(reader: DlibReader, spec: LayerSpec) -> ConLayer:
    start = reader.pos
    version = reader.expect_string(("con_4", "con_5", "con_6"), "layer tag")
    params = reader.read_tensor("params")
    num_filters = reader.read_int("num_filters")
    nr = reader.read_int("nr")
    nc = reader.read_int("nc")
    stride = (reader.read_int("stride_y"), reader.read_int("stride_x"))
    padding = (reader.read_int("padding_y"), reader.read_int("padding_x"))
    _check_geometry(reader, spec, (nr, nc), stride, padding, start)
    filters = reader.read_alias_tensor("filters")
    biases = reader.read_alias_tensor("biases")
    for what in ("learning_rate", "weight_decay", "bias_learning_rate", "bias_weight_decay"):
        reader.read_float(what + "_multiplier")
    use_bias = reader.read_bool("use_bias") if version in ("con_5", "con_6") else True
    use_relu = reader.read_bool("use_relu") if version == "con_6" else False
    if filters[0] != num_filters or filters[2:] != (nr, nc):
        raise reader.error(f"filter shape {filters} disagrees with num_filters/nr/nc", start)
    weights = _params_slice(reader, params, 0, filters, "filters")
    bias = None
    if use_bias:
        bias = _params_slice(reader, params, weights.size, (num_filters,), "biases")
    elif biases[1] not in (0, num_filters):
        raise reader.error(f"bias shape {biases} disagrees with num_filters", start)
    return ConLayer(weights, bias, stride, padding, use_relu)


def _read_affine(reader: DlibReader) -> AffineLayer | IdentityLayer:
    start = reader.pos
    version = reader.expect_string(("affine_", "affine_2", "bn_con2", "bn_fc2"), "layer tag")
    if version.startswith("bn_"):
        return _read_bn_as_affine(reader, version)
    params = reader.read_tensor("params")
    gamma_shape = reader.read_alias_tensor("gamma")
    reader.read_alias_tensor("beta")
    mode = reader.read_int("mode")
    disabled = reader.read_bool("disabled") if version == "affine_2" else False
    if disabled:
        return IdentityLayer(version)
    if mode not in (_CONV_MODE, _FC_MODE):
        raise reader.error(f"unknown affine layer_mode {mode}", start)
    return _affine_from_params(reader, params, gamma_shape, mode, version)


def _affine_from_params(
    reader: DlibReader,
    params: FloatArray,
    gamma_shape: tuple[int, int, int, int],
    mode: int,
    source: str,
) -> AffineLayer:
    shape = (gamma_shape[1],) if mode == _CONV_MODE else gamma_shape[1:]
    gamma = _params_slice(reader, params, 0, shape, "gamma")
    beta = _params_slice(reader, params, gamma.size, shape, "beta")
    return AffineLayer(gamma, beta, "conv" if mode == _CONV_MODE else "fc", source)


def _read_bn_as_affine(reader: DlibReader, version: str) -> AffineLayer:
    """Fold a stored batch-norm layer into an affine one, as dlib's affine_(bn_) does."""
    params = reader.read_tensor("params")
    gamma_shape = reader.read_alias_tensor("gamma")
    reader.read_alias_tensor("beta")
    reader.read_tensor("means")
    reader.read_tensor("invstds")
    running_means = reader.read_tensor("running_means").reshape(-1)
    running_variances = reader.read_tensor("running_variances").reshape(-1)
    reader.read_uint("num_updates")
    reader.read_uint("running_stats_window_size")
    for what in ("learning_rate", "weight_decay", "bias_learning_rate", "bias_weight_decay"):
        reader.read_float(what + "_multiplier")
    eps = reader.read_float("eps")
    mode = _CONV_MODE if version == "bn_con2" else _FC_MODE
    raw = _affine_from_params(reader, params, gamma_shape, mode, version)
    if running_means.size != raw.gamma.size or running_variances.size != raw.gamma.size:
        raise reader.error("batch-norm running statistics do not match gamma's size")
    shape = raw.gamma.shape
    # float32 arithmetic throughout, as dlib does on its float tensors.
    scale = raw.gamma / np.sqrt(running_variances.reshape(shape) + np.float32(eps))
    shift = raw.beta - scale * running_means.reshape(shape)
    return AffineLayer(scale.astype(np.float32), shift.astype(np.float32), raw.mode, version)


def _read_relu(reader: DlibReader) -> ReluLayer | IdentityLayer:
    version = reader.expect_string(("relu_", "relu_2"), "layer tag")
    if version == "relu_2" and reader.read_bool("disabled"):
        return IdentityLayer(version)
    return ReluLayer()


def _read_pool(reader: DlibReader, spec: LayerSpec) -> PoolLayer:
    start = reader.pos
    reader.expect_string((spec.kind + "_2",), "layer tag")
    nr, nc = reader.read_int("nr"), reader.read_int("nc")
    stride = (reader.read_int("stride_y"), reader.read_int("stride_x"))
    padding = (reader.read_int("padding_y"), reader.read_int("padding_x"))
    _check_geometry(reader, spec, (nr, nc), stride, padding, start)
    return PoolLayer("max" if spec.kind == "max_pool" else "avg", (nr, nc), stride, padding)


def _read_fc(reader: DlibReader, spec: LayerSpec) -> FcLayer:
    start = reader.pos
    version = reader.expect_string(("fc_2", "fc_3"), "layer tag")
    num_outputs = reader.read_uint("num_outputs")
    num_inputs = reader.read_uint("num_inputs")
    params = reader.read_tensor("params")
    weights_shape = reader.read_alias_tensor("weights")
    reader.read_alias_tensor("biases")
    bias_mode = reader.read_int("bias_mode")
    expected_mode = _FC_HAS_BIAS if spec.fc_bias else _FC_NO_BIAS
    if bias_mode != expected_mode:
        raise reader.error(f"fc bias_mode {bias_mode}, network type needs {expected_mode}", start)
    for what in ("learning_rate", "weight_decay", "bias_learning_rate", "bias_weight_decay"):
        reader.read_float(what + "_multiplier")
    use_bias = reader.read_bool("use_bias") if version == "fc_3" else True
    if weights_shape[:2] != (num_inputs, num_outputs):
        raise reader.error(f"fc weights shape {weights_shape} disagrees with its sizes", start)
    weights = _params_slice(reader, params, 0, (num_inputs, num_outputs), "weights")
    bias = None
    if spec.fc_bias and use_bias:
        bias = _params_slice(reader, params, weights.size, (num_outputs,), "biases")
    return FcLayer(weights, bias)


def _read_avg_rgb(reader: DlibReader) -> tuple[float, float, float]:
    return (
        reader.read_float("avg_red"),
        reader.read_float("avg_green"),
        reader.read_float("avg_blue"),
    )


def _read_input(reader: DlibReader, architecture: Architecture) -> RGBInput:
    start = reader.pos
    if architecture.input_kind == "input_rgb_image_sized":
        version = reader.expect_string(("input_rgb_image_sized",), "input layer tag")
        avg = _read_avg_rgb(reader)
        size = (reader.read_uint("nr"), reader.read_uint("nc"))
        if size != architecture.input_size:
            raise reader.error(
                f"input size {size} does not match the network type's {architecture.input_size}",
                start,
            )
        return RGBInput("input_rgb_image_sized", version, avg, size=size)
    version = reader.expect_string(
        ("input_rgb_image_pyramid", "input_rgb_image_pyramid2"), "input layer tag"
    )
    avg = _read_avg_rgb(reader)
    if version == "input_rgb_image_pyramid2":
        padding = reader.read_uint("pyramid_padding")
        outer = reader.read_uint("pyramid_outer_padding")
    else:
        padding, outer = _DEFAULT_PYRAMID_PADDING, _DEFAULT_PYRAMID_OUTER_PADDING
    return RGBInput(
        "input_rgb_image_pyramid",
        version,
        avg,
        pyramid_padding=padding,
        pyramid_outer_padding=outer,
        pyramid_down=architecture.pyramid_down,
    )


def _read_box_overlap(reader: DlibReader, what: str) -> tuple[float, float]:
    # test_box_overlap: iou_thresh then percent_covered_thresh.
    return reader.read_float(what + " iou_thresh"), reader.read_float(what + " percent_covered")


def _read_loss_mmod(reader: DlibReader) -> MMODLoss:
    reader.expect_string(("loss_mmod_",), "loss tag")
    version = reader.expect_int(_MMOD_OPTIONS_VERSIONS, "mmod_options version")
    windows: list[DetectorWindow] = []
    if version == 1:
        windows.append(DetectorWindow(reader.read_uint("width"), reader.read_uint("height"), ""))
    else:
        for _ in range(reader.read_uint("detector window count")):
            wversion = reader.expect_int(_DETECTOR_WINDOW_VERSIONS, "detector window version")
            width, height = reader.read_uint("width"), reader.read_uint("height")
            label = reader.read_string("label") if wversion == 2 else ""
            windows.append(DetectorWindow(width, height, label))
    loss_per_false_alarm = reader.read_float("loss_per_false_alarm")
    loss_per_missed_target = reader.read_float("loss_per_missed_target")
    truth_match_iou = reader.read_float("truth_match_iou_threshold")
    nms = _read_box_overlap(reader, "overlaps_nms")
    ignore = _read_box_overlap(reader, "overlaps_ignore")
    assume_pyramid = (
        reader.read_byte("assume_image_pyramid") if version >= 3 else _USE_IMAGE_PYRAMID_YES
    )
    use_bbr, bbr_lambda = False, _MMOD_DEFAULT_BBR_LAMBDA
    if version >= 4:
        use_bbr = reader.read_bool("use_bounding_box_regression")
        bbr_lambda = reader.read_float("bbr_lambda")
    if not windows:
        raise reader.error("loss_mmod has no detector windows")
    return MMODLoss(
        options_version=version,
        detector_windows=tuple(windows),
        loss_per_false_alarm=loss_per_false_alarm,
        loss_per_missed_target=loss_per_missed_target,
        truth_match_iou_threshold=truth_match_iou,
        overlaps_nms_iou_thresh=nms[0],
        overlaps_nms_percent_covered_thresh=nms[1],
        overlaps_ignore_iou_thresh=ignore[0],
        overlaps_ignore_percent_covered_thresh=ignore[1],
        assume_image_pyramid=assume_pyramid,
        use_bounding_box_regression=use_bbr,
        bbr_lambda=bbr_lambda,
    )


def _read_loss_metric(reader: DlibReader) -> MetricLoss:
    version = reader.expect_string(("loss_metric_", "loss_metric_2"), "loss tag")
    if version == "loss_metric_":
        return MetricLoss(_METRIC_V1_MARGIN, _METRIC_V1_DIST_THRESH)
    return MetricLoss(reader.read_float("margin"), reader.read_float("dist_thresh"))
