"""dlib's MMOD CNN face detector (``mmod_human_face_detector.dat``) run through onnxruntime.

The network itself is a plain fully convolutional stack exported to ONNX by
``models.dlib_onnx.convert_dlib_mmod``. Everything dlib does around it lives here, reproduced from
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
import onnxruntime

from runtime.errors import BadInputError, ModelError
from runtime.inference.image_pyramid import (
    Float32Array,
    Float64Array,
    IntArray,
    TiledPyramidLayout,
    build_tiled_pyramid,
    lround,
    pyramid_up,
    rect_down_2,
    tiled_pyramid_to_image,
    tiled_pyramid_layout,
)
from runtime.inference.types import Box, Detection, RGBImage

logger = logging.getLogger(__name__)

# Refuse inputs whose (upsampled) canvas would need more memory than an appliance should spend
# on one frame: 64 Mpx of 3 float32 planes is ~0.8 GB before the network's activations.
MAX_CANVAS_PIXELS = 64_000_000
# dlib's CNN detector python API has no upper bound; each level quadruples the work, so cap it.
MAX_UPSAMPLE = 4
# dlib's input_rgb_image_pyramid defaults (used when the parameters omit them).
DEFAULT_CHANNEL_MEANS = (122.782, 117.001, 104.298)
DEFAULT_PIXEL_SCALE = 1.0 / 256.0
DEFAULT_PYRAMID_DOWNSAMPLING = 6
DEFAULT_PYRAMID_PADDING = 10
DEFAULT_PYRAMID_OUTER_PADDING = 11


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
    channel_means: tuple[float, float, float] = DEFAULT_CHANNEL_MEANS
    pixel_scale: float = DEFAULT_PIXEL_SCALE
    pyramid_downsampling: int = DEFAULT_PYRAMID_DOWNSAMPLING
    pyramid_padding: int = DEFAULT_PYRAMID_PADDING
    pyramid_outer_padding: int = DEFAULT_PYRAMID_OUTER_PADDING

    @staticmethod
    def from_parameters(parameters: Mapping[str, object]) -> MmodConfig:
        return _parse_parameters(parameters)


class MmodDetector:
    """Face detector matching ``dlib.cnn_face_detection_model_v1`` box for box."""

    def __init__(
        self, session: onnxruntime.InferenceSession, parameters: Mapping[str, object]
    ) -> None:
        self._session = session
        self._config = MmodConfig.from_parameters(parameters)
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"MMOD model must have one input, found {len(inputs)}")
        self._input_name = inputs[0].name

    @property
    def config(self) -> MmodConfig:
        return self._config

    def detect(
        self, image: RGBImage, upsample: int = 0, threshold: float = 0.0
    ) -> list[Detection]:
        """Faces in ``image`` (H, W, 3 uint8 RGB), best first.

        ``upsample`` doubles the image that many times first (dlib's ``upsample_num_times``) to
        find faces smaller than the 80 px window; ``threshold`` is loss_mmod's
        ``adjust_threshold``: positions scoring above it are kept (dlib's default is 0).
        Boxes are dlib's integer rectangles (x1/y1 exclusive here) and may extend past the image.
        """
        _check_image(image)
        if not 0 <= upsample <= MAX_UPSAMPLE:
            raise BadInputError(f"upsample must be 0..{MAX_UPSAMPLE}, got {upsample}")
        for _ in range(upsample):
            image = pyramid_up(image)
        rects, scores = self._detect_rects(image, threshold)
        if upsample and rects.shape[0]:
            rects = lround(rect_down_2(rects.astype(np.float64), upsample))
        return [
            Detection(
                box=Box(float(r[0]), float(r[1]), float(r[2] + 1), float(r[3] + 1)),
                score=float(s),
            )
            for r, s in zip(rects, scores, strict=True)
        ]

    def _detect_rects(
        self, image: RGBImage, threshold: float
    ) -> tuple[IntArray, npt.NDArray[np.float64]]:
        """Integer inclusive rects (n, 4) and scores of the image as the network sees it."""
        cfg = self._config
        rows, cols = image.shape[:2]
        layout = tiled_pyramid_layout(
            rows, cols, cfg.pyramid_downsampling, cfg.pyramid_padding, cfg.pyramid_outer_padding
        )
        if layout.height * layout.width > MAX_CANVAS_PIXELS:
            raise BadInputError(
                f"image {cols}x{rows} is too large for the MMOD detector "
                f"(pyramid canvas {layout.width}x{layout.height}); downscale it or upsample less"
            )
        empty = (np.zeros((0, 4), dtype=np.int64), np.zeros(0, dtype=np.float64))
        if not _output_size(layout.height, layout.width, cfg.layers):
            return empty  # too small for even one network output position
        canvas = build_tiled_pyramid(image, layout, cfg.channel_means, cfg.pixel_scale)
        scores = self._run(canvas)
        boxes, confidences = _decode(scores, layout, cfg, threshold)
        if boxes.shape[0] == 0:
            return empty
        keep = _non_max_suppression(
            boxes, cfg.nms_iou_thresh, cfg.nms_percent_covered_thresh
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
        return scores[0]


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
            with np.errstate(divide="ignore", invalid="ignore"):
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
            f"image must be uint8 of shape (height, width, 3) RGB, got {image.dtype} "
            f"{image.shape}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise BadInputError(f"image is empty: {image.shape}")


def _parse_parameters(parameters: Mapping[str, object]) -> MmodConfig:
    raise NotImplementedError  # filled in once the converter's parameter layout is known


def _as_mapping(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ModelError(f"MMOD parameters: {what} must be an object, got {type(value).__name__}")
    return value
