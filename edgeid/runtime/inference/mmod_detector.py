"""dlib's MMOD CNN face detector (``mmod_human_face_detector.dat``) run through onnxruntime.

The network itself is a plain fully convolutional stack exported to ONNX by
``edgeid.models.dlib_onnx.convert_dlib_mmod``. Everything dlib does around it lives here,
reproduced from
dlib's source so that boxes and scores match ``dlib.cnn_face_detection_model_v1``:

1. optional upsampling (``upsample_num_times``): dlib's ``pyramid_up`` with ``pyramid_down<2>``;
2. the tiled image pyramid of ``input_rgb_image_pyramid<pyramid_down<N>>`` (``image_pyramid``);
3. the network, one output channel per detector window;
4. ``loss_mmod``'s decoding: every output position scoring above the threshold becomes a
   detector-window-sized box centred on that position's receptive field, mapped from the canvas
   back to the image; boxes are rounded to integers, sorted by score and greedily suppressed with
   the model's ``test_box_overlap``;
5. boxes mapped back down through the upsampling.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeid.runtime.errors import BadInputError, ModelError
from edgeid.runtime.inference.backends.session import ModelSession
from edgeid.runtime.inference.image_pyramid import (
    Float32Array,
    Float64Array,
    IntArray,
    TiledPyramidLayout,
    build_tiled_pyramid,
    lround,
    pyramid_up,
    pyramid_up_size,
    rect_down_2,
    tiled_pyramid_layout,
    tiled_pyramid_to_image,
)
from edgeid.runtime.inference.types import Box, Detection, RGBImage

logger = logging.getLogger(__name__)

# Refuse frames whose pyramid canvas would exhaust memory: peak use is ~60 bytes per canvas
# pixel (measured: bald_guys.jpg upsampled once, a 45 Mpx canvas, peaks at 2.7 GB).
MAX_CANVAS_PIXELS = 50_000_000
# dlib's Python API has no bound; each level quadruples the work, and the canvas cap above is
# reached by a 1 Mpx frame at 2 levels anyway.
MAX_UPSAMPLE = 4


@dataclass(frozen=True)
class DetectorWindow:
    """One of loss_mmod's sliding windows (one network output channel each)."""

    width: int
    height: int
    label: str = ""


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel, stride and padding of one spatial layer, as dlib maps points through it."""

    kernel_rows: int
    kernel_cols: int
    stride_y: int
    stride_x: int
    padding_y: int
    padding_x: int


@dataclass(frozen=True)
class MmodConfig:
    """Everything the runtime needs from the converted model's parameters."""

    windows: tuple[DetectorWindow, ...]
    nms_iou_thresh: float
    nms_percent_covered_thresh: float
    layers: tuple[ConvGeometry, ...]  # input to output order
    # The canvas background: the input layer's mean colour, which the graph normalises to 0.
    background_rgb: tuple[float, float, float]
    pyramid_downsampling: int  # N of pyramid_down<N>: each level is (N-1)/N of the previous
    pyramid_padding: int  # pixels between tiles
    pyramid_outer_padding: int  # pixels around the whole canvas

    @staticmethod
    def from_parameters(parameters: Mapping[str, object]) -> MmodConfig:
        return _parse_parameters(parameters)


class MmodDetector:
    """Face detector matching ``dlib.cnn_face_detection_model_v1`` box for box."""

    def __init__(self, session: ModelSession, parameters: Mapping[str, object]) -> None:
        self._session = session
        self._config = MmodConfig.from_parameters(parameters)
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"MMOD model must have one input, found {len(inputs)}")
        self._input_name = inputs[0].name

    @property
    def config(self) -> MmodConfig:
        return self._config

    def detect(self, image: RGBImage, upsample: int = 0, threshold: float = 0.0) -> list[Detection]:
        """Faces in ``image`` (H, W, 3 uint8 RGB), best first.

        ``upsample`` doubles the image that many times first (dlib's ``upsample_num_times``) to
        find faces smaller than the 80 px window; ``threshold`` is loss_mmod's
        ``adjust_threshold``: positions scoring above it are kept (dlib's default is 0).
        Boxes are dlib's integer rectangles (x1/y1 exclusive here) and may extend past the image.
        """
        _check_image(image)
        if not 0 <= upsample <= MAX_UPSAMPLE:
            raise BadInputError(f"upsample must be 0..{MAX_UPSAMPLE}, got {upsample}")
        layout = self._layout(image.shape[0], image.shape[1], upsample)
        for _ in range(upsample):
            image = pyramid_up(image)
        rects, scores = self._detect_rects(image, layout, threshold)
        if upsample and rects.shape[0]:
            # As dlib's Python wrapper: map the integer rects down and round again.
            rects = lround(rect_down_2(rects.astype(np.float64), upsample))
        return [
            Detection(
                box=Box(float(r[0]), float(r[1]), float(r[2] + 1), float(r[3] + 1)),
                score=float(s),
            )
            for r, s in zip(rects, scores, strict=True)
        ]

    def _layout(self, rows: int, cols: int, upsample: int) -> TiledPyramidLayout:
        """The canvas layout for the upsampled frame, checked before anything is allocated."""
        cfg = self._config
        up_rows, up_cols = rows, cols
        for _ in range(upsample):
            up_rows, up_cols = pyramid_up_size(up_rows, up_cols)
        layout = tiled_pyramid_layout(
            up_rows,
            up_cols,
            cfg.pyramid_downsampling,
            cfg.pyramid_padding,
            cfg.pyramid_outer_padding,
        )
        if layout.height * layout.width > MAX_CANVAS_PIXELS:
            raise BadInputError(
                f"image {cols}x{rows} with upsample {upsample} is too large for the MMOD detector "
                f"(pyramid canvas {layout.width}x{layout.height}); downscale it or upsample less"
            )
        return layout

    def _detect_rects(
        self, image: RGBImage, layout: TiledPyramidLayout, threshold: float
    ) -> tuple[IntArray, npt.NDArray[np.float64]]:
        """Integer inclusive rects (n, 4) and scores in ``image``'s coordinates, best first."""
        cfg = self._config
        empty = (np.zeros((0, 4), dtype=np.int64), np.zeros(0, dtype=np.float64))
        if not _output_size(layout.height, layout.width, cfg.layers):
            # dlib throws here; a frame too small to hold one window simply has no faces.
            return empty
        canvas = build_tiled_pyramid(image, layout, cfg.background_rgb)
        scores = self._run(canvas)
        boxes, confidences = _decode(scores, layout, cfg, threshold)
        keep = _non_max_suppression(boxes, cfg.nms_iou_thresh, cfg.nms_percent_covered_thresh)
        logger.debug(
            "MMOD on %dx%d (canvas %dx%d): %d positions above %.3f, %d after NMS",
            image.shape[1],
            image.shape[0],
            layout.width,
            layout.height,
            boxes.shape[0],
            threshold,
            len(keep),
        )
        return boxes[keep], confidences[keep]

    def _run(self, canvas: Float32Array) -> Float32Array:
        outputs = self._session.run(None, {self._input_name: canvas[None]})
        scores = np.asarray(outputs[0], dtype=np.float32)
        expected = len(self._config.windows)
        if scores.ndim != 4 or scores.shape[:2] != (1, expected):
            raise ModelError(
                f"MMOD model output has shape {scores.shape}, expected (1, {expected}, rows, cols)"
            )
        per_window: Float32Array = scores[0]
        return per_window


# --------------------------------------------------------------------------------------------
# loss_mmod decoding


def _output_size(rows: int, cols: int, layers: Sequence[ConvGeometry]) -> tuple[int, int] | None:
    """Spatial size of the network output for a canvas, or None when it would be empty."""
    for layer in layers:
        rows = (rows + 2 * layer.padding_y - layer.kernel_rows) // layer.stride_y + 1
        cols = (cols + 2 * layer.padding_x - layer.kernel_cols) // layer.stride_x + 1
        if rows <= 0 or cols <= 0:
            return None
    return rows, cols


def _output_to_canvas(
    xs: Float64Array, ys: Float64Array, layers: Sequence[ConvGeometry]
) -> tuple[Float64Array, Float64Array]:
    """dlib's output_tensor_to_input_tensor: undo each layer, last first, to the receptive
    field's centre (integer half-kernel, as dlib computes it)."""
    for layer in reversed(layers):
        xs = xs * layer.stride_x - layer.padding_x + layer.kernel_cols // 2
        ys = ys * layer.stride_y - layer.padding_y + layer.kernel_rows // 2
    return xs, ys


def _decode(
    scores: Float32Array, layout: TiledPyramidLayout, cfg: MmodConfig, threshold: float
) -> tuple[IntArray, npt.NDArray[np.float64]]:
    """Boxes (integer, inclusive, image coordinates) and scores above ``threshold``, best first."""
    channel, row, col = np.nonzero(scores.astype(np.float64) > threshold)
    confidences = scores[channel, row, col].astype(np.float64)
    xs, ys = _output_to_canvas(col.astype(np.float64), row.astype(np.float64), cfg.layers)
    # centered_drect: a window of width w spans w-1 pixel steps around the centre.
    half_w = np.array([(w.width - 1) / 2.0 for w in cfg.windows])[channel]
    half_h = np.array([(w.height - 1) / 2.0 for w in cfg.windows])[channel]
    canvas_boxes = np.stack([xs - half_w, ys - half_h, xs + half_w, ys + half_h], axis=1)
    image_boxes = tiled_pyramid_to_image(layout, cfg.pyramid_downsampling, canvas_boxes)
    # loss_mmod stores each detection as an integer rectangle before sorting and NMS.
    rects = lround(image_boxes)
    order = np.argsort(-confidences, kind="stable")
    return rects[order], confidences[order]


def _non_max_suppression(
    rects: IntArray, iou_thresh: float, percent_covered_thresh: float
) -> list[int]:
    """Greedy NMS with dlib's test_box_overlap over score-sorted integer inclusive rects.

    dlib's "IoU" divides the intersection by the area of the bounding box of both rects (not
    the area of their union); either box being mostly covered also counts as an overlap.
    """
    left, top, right, bottom = (rects[:, i].astype(np.float64) for i in range(4))
    areas = (right - left + 1) * (bottom - top + 1)
    kept: list[int] = []
    for i in range(rects.shape[0]):
        if kept:
            k = np.array(kept)
            iw = np.minimum(right[k], right[i]) - np.maximum(left[k], left[i]) + 1
            ih = np.minimum(bottom[k], bottom[i]) - np.maximum(top[k], top[i]) + 1
            inner = np.where((iw > 0) & (ih > 0), iw * ih, 0.0)
            outer = (np.maximum(right[k], right[i]) - np.minimum(left[k], left[i]) + 1) * (
                np.maximum(bottom[k], bottom[i]) - np.minimum(top[k], top[i]) + 1
            )
            hit = (inner > 0) & (
                (inner / outer > iou_thresh)
                | (inner / areas[k] > percent_covered_thresh)
                | (inner / areas[i] > percent_covered_thresh)
            )
            if hit.any():
                continue
        kept.append(i)
    return kept


# --------------------------------------------------------------------------------------------
# Inputs and parameters


def _check_image(image: object) -> None:
    if not isinstance(image, np.ndarray):
        raise BadInputError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise BadInputError(
            f"image must be uint8 of shape (height, width, 3) RGB, got {image.dtype} {image.shape}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise BadInputError(f"image is empty: {image.shape}")


def _parse_parameters(parameters: Mapping[str, object]) -> MmodConfig:
    """Read the converter's parameters (edgeid.models.dlib_onnx.convert_dlib_mmod) into a config."""
    try:
        loss = _as_mapping(parameters["loss_mmod"], "loss_mmod")
        if loss.get("use_bounding_box_regression", False):
            raise ModelError("MMOD model uses bounding box regression, which is not supported")
        if int(loss.get("assume_image_pyramid", 1)) != 1:
            raise ModelError("MMOD model does not use an image pyramid input; not supported")
        windows = tuple(
            DetectorWindow(int(w["width"]), int(w["height"]), str(w.get("label", "")))
            for w in loss["detector_windows"]
        )
        nms = _as_mapping(loss["overlaps_nms"], "loss_mmod.overlaps_nms")
        inp = _as_mapping(parameters["input_layer"], "input_layer")
        if inp.get("type") != "input_rgb_image_pyramid":
            raise ModelError(f"MMOD input layer {inp.get('type')!r} is not supported")
        red, green, blue = (float(v) for v in inp["avg_rgb"])
        layers = tuple(
            ConvGeometry(
                kernel_rows=int(layer["kernel"][0]),
                kernel_cols=int(layer["kernel"][1]),
                stride_y=int(layer["stride"][0]),
                stride_x=int(layer["stride"][1]),
                padding_y=int(layer["padding"][0]),
                padding_x=int(layer["padding"][1]),
            )
            for layer in parameters["layers"]  # type: ignore[attr-defined]
        )
        config = MmodConfig(
            windows=windows,
            nms_iou_thresh=float(nms["iou_thresh"]),
            nms_percent_covered_thresh=float(nms["percent_covered_thresh"]),
            layers=layers,
            background_rgb=(red, green, blue),
            pyramid_downsampling=int(inp["pyramid_down"]),
            pyramid_padding=int(inp["pyramid_padding"]),
            pyramid_outer_padding=int(inp["pyramid_outer_padding"]),
        )
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ModelError(f"MMOD parameters are incomplete or malformed: {exc!r}") from exc
    _check_config(config, parameters.get("output_to_input"))
    return config


def _check_config(config: MmodConfig, output_to_input: object) -> None:
    if not config.windows or any(w.width < 1 or w.height < 1 for w in config.windows):
        raise ModelError(f"MMOD detector windows are invalid: {config.windows}")
    if not config.layers or any(
        min(g.kernel_rows, g.kernel_cols, g.stride_y, g.stride_x) < 1 for g in config.layers
    ):
        raise ModelError("MMOD layer geometry is missing or invalid")
    if config.pyramid_downsampling < 2:
        raise ModelError(f"MMOD pyramid_down must be >= 2, got {config.pyramid_downsampling}")
    if output_to_input is not None:
        # The converter also records the composed mapping; it must agree with the layers.
        mapping = _as_mapping(output_to_input, "output_to_input")
        xs, ys = _output_to_canvas(np.array([0.0, 1.0]), np.array([0.0, 1.0]), config.layers)
        ours = ([xs[1] - xs[0], ys[1] - ys[0]], [xs[0], ys[0]])
        theirs = (list(mapping["scale_xy"]), list(mapping["offset_xy"]))
        if ours != theirs:
            raise ModelError(f"MMOD output_to_input {theirs} disagrees with the layers {ours}")


def _as_mapping(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ModelError(f"MMOD parameters: {what} must be an object, got {type(value).__name__}")
    return value
