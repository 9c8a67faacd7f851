"""MTCNN face detector: the three-stage cascade in numpy around three onnxruntime sessions.

The networks are facenet-pytorch's (converted by ``edgeid.models.mtcnn``); the cascade reproduces
facenet-pytorch 2.6.0's ``detect_face`` step for step, so the same thresholds give the same
faces:

1. Scale pyramid: level ``i`` is the image resized by ``(12 / min_face_size) * factor**i`` to
   ``int(side * scale + 1)`` pixels, while the shorter side stays >= 12 px.
2. P-Net on every level; each 12x12 cell (stride 2) scoring >= threshold becomes a box; NMS per
   level (IoU 0.5), then over all levels (IoU 0.7); box regression; boxes made square.
3. R-Net on 24x24 crops of those boxes (batched); score > threshold; NMS (IoU 0.7); regression;
   square again.
4. O-Net on 48x48 crops (batched); score > threshold; five landmarks; regression; NMS with
   overlap measured against the smaller box (0.7).

Resizing matters: facenet-pytorch resizes both the pyramid and the crops with
``interpolate(mode="area")``, i.e. adaptive average pooling (output pixel ``i`` averages input
pixels ``floor(i*in/out)`` .. ``ceil((i+1)*in/out) - 1``). We compute exactly that from one
integral image, which serves every pyramid level and every crop. (facenet-pytorch's bilinear
resize is only in ``extract_face``, for the aligned output face, which is not the detector.)

Bilinear crops (what ``extract_face`` uses) move boxes by about a pixel and lose a face on
scenes/dlib-faces; a bilinear pyramid changes which candidates survive. Box arithmetic and NMS
run in float32 in facenet-pytorch's order of operations, so boxes agree to the pixel.

Crops that reach past the image edge are clipped to the image and stretched, as facenet-pytorch
does. (The original MTCNN zero-pads instead; on scenes/dlib-faces that changed nothing, while it
moved some edge boxes by up to 15 px away from facenet-pytorch's.)

Speed on the CPU (issue 17 item 2, measured by benchmarks/mtcnn_path_bench.py): the three
networks' runs are about two thirds of ``detect``, and inside them ONNX Runtime's PRelu and
tensors that outgrow the caches cost most. So every CPU session runs PRelu rewritten
(``prelu_split``), R-/O-Net take their crops in runs of RNET_BATCH / ONET_BATCH, and P-Net
runs a level larger than PNET_TILE in overlapping tiles; each gives the same numbers to the
bit. R- and O-Net were already batched across candidates. Packing the pyramid into one canvas
does not pay: the small levels cost tens of microseconds a run, padding adds pixels, and
P-Net's ceil-mode pooling makes the last cell of an odd-sized level see past its edge. No level
can be skipped: the pyramid already stops at the last level a 12-px cell fits, which is where a
face filling the shorter side is found.

Coordinates: facenet-pytorch's boxes ``(x1, y1, x2, y2)`` are 1-based inclusive, so the pixels a
box covers are columns ``x1 - 1`` .. ``x2 - 1``; we return them as ``Box(x1 - 1, y1 - 1, x2,
y2)`` in edge coordinates (``x0`` inclusive, ``x1`` exclusive). Landmarks come out in the same
0-based frame, exactly as facenet-pytorch computes them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edgeid.runtime.errors import BadInputError, ModelError
from edgeid.runtime.inference.backends.session import ModelOpener, ModelSession
from edgeid.runtime.inference.backends.tensorrt_backend import TensorRTSession
from edgeid.runtime.inference.manifest import read_verified_model
from edgeid.runtime.inference.onnx_backend import create_cpu_session
from edgeid.runtime.inference.precision import Precision, precision_model
from edgeid.runtime.inference.types import Box, Detection, FloatArray, RGBImage

logger = logging.getLogger(__name__)

I64 = npt.NDArray[np.int64]

# Model names (manifests) written by edgeid.models.mtcnn.convert_mtcnn, in cascade order.
MODEL_NAMES = ("mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet")
# Fixed input sizes of the second and third stage networks.
RNET_SIZE = 24
ONET_SIZE = 48
# Image sizes whose pyramid resize plans are kept (a camera or a photo set has a few sizes).
PLAN_CACHE_SIZE = 256
# Crops per R-/O-Net run, and the side of the tiles P-Net runs a large pyramid level in. ONNX
# Runtime's CPU cost per crop or pixel grows once a layer's tensors outgrow the caches. Measured
# (PRelu rewritten, one thread; issue 17): R-Net 0.06-0.07 ms a crop in runs of 16 to 128 crops,
# 0.17 in runs of 256; O-Net 0.38 ms in runs of 4 or 8, 1.05 in runs of 256; P-Net 0.09 us per
# useful pixel in 192-px tiles, 0.19 over a whole 461 x 820 level. The results are the same:
# each crop is computed on its own, and tiles overlap so that every output cell sees its whole
# 12 x 12 window (see _tiles).
RNET_BATCH = 32
ONET_BATCH = 8
PNET_TILE = 192
# Crops per run on a GPU backend (what every backend used before issue 17).
GPU_CROP_BATCH = 256
# How load sizes the runs: for each net's real backend, or whole levels and GPU_CROP_BATCH crops.
RunSizing = Literal["by-backend", "whole"]
# Rows of the NMS overlap matrix computed at once: bounds memory to NMS_BLOCK x candidates.
NMS_BLOCK = 128
# MTCNN boxes are narrower and taller than dlib's square ones and reach higher up the forehead.
# Measured on scenes/dlib-faces (42 faces against imglab truth) and confirmed on 401 LFW faces
# against dlib's HOG detector: dlib's side is 0.97 x sqrt(width x height) of the MTCNN box, and
# its centre sits 0.07 of that lower (0.069 and 0.084 measured). Mean IoU goes 0.70 -> 0.79.
DLIB_BOX_SIDE = 0.97
DLIB_BOX_DROP = 0.07
_INPUT = "image"
_DELTAS = "box_deltas"
_PROBS = "probabilities"
_LANDMARKS = "landmarks"


@dataclass(frozen=True)
class MtcnnParameters:
    """Cascade settings; the defaults are facenet-pytorch 2.6.0's, which the converter records."""

    # Smallest face side searched for, in image pixels; smaller is slower (bigger pyramid).
    min_face_size: float = 20.0
    # Ratio between successive pyramid levels.
    scale_factor: float = 0.709
    # Face-probability thresholds of P-Net (>=), R-Net (>) and O-Net (>).
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    # NMS overlaps: IoU within a pyramid level, across levels, after R-Net; after O-Net the
    # intersection over the smaller box, which also drops a small box nested in a bigger one.
    pnet_scale_nms_iou: float = 0.5
    pnet_nms_iou: float = 0.7
    rnet_nms_iou: float = 0.7
    onet_nms_min_overlap: float = 0.7
    # P-Net's receptive field and stride, in pyramid-level pixels.
    cell_size: int = 12
    stride: int = 2
    # Network input normalisation: (pixel - mean) * scale.
    pixel_mean: float = 127.5
    pixel_scale: float = 0.0078125

    def __post_init__(self) -> None:
        problems = []
        if not self.min_face_size > 0:
            problems.append(f"min_face_size {self.min_face_size} must be > 0")
        if not 0 < self.scale_factor < 1:  # 1 or more would never end the pyramid
            problems.append(f"scale_factor {self.scale_factor} must be in (0, 1)")
        if len(self.thresholds) != 3 or not all(0 <= t <= 1 for t in self.thresholds):
            problems.append(f"thresholds {self.thresholds} must be three values in [0, 1]")
        overlaps = (
            self.pnet_scale_nms_iou,
            self.pnet_nms_iou,
            self.rnet_nms_iou,
            self.onet_nms_min_overlap,
        )
        if not all(0 < v <= 1 for v in overlaps):
            problems.append("NMS overlaps must be in (0, 1]")
        if self.cell_size < 1 or self.stride < 1 or not self.pixel_scale > 0:
            problems.append("cell_size, stride and pixel_scale must be positive")
        if problems:
            raise ModelError("invalid MTCNN parameters: " + "; ".join(problems))

    @classmethod
    def from_manifest(
        cls,
        pnet: Mapping[str, Any],
        rnet: Mapping[str, Any],
        onet: Mapping[str, Any],
        preprocessing: Mapping[str, Any],
    ) -> MtcnnParameters:
        """Build from the ``parameters`` of the three converted models and their preprocessing."""

        def number(source: Mapping[str, Any], key: str, stage: str) -> float:
            value = source.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ModelError(f"MTCNN {stage} manifest: {key} missing or not a number")
            return float(value)

        for stage, params in (("pnet", pnet), ("rnet", rnet), ("onet", onet)):
            if params.get("stage") != stage:
                raise ModelError(f"MTCNN manifest: expected {stage} parameters")
        return cls(
            min_face_size=number(pnet, "min_face_size", "pnet"),
            scale_factor=number(pnet, "scale_factor", "pnet"),
            thresholds=(
                number(pnet, "score_threshold", "pnet"),
                number(rnet, "score_threshold", "rnet"),
                number(onet, "score_threshold", "onet"),
            ),
            pnet_scale_nms_iou=number(pnet, "scale_nms_iou", "pnet"),
            pnet_nms_iou=number(pnet, "nms_iou", "pnet"),
            rnet_nms_iou=number(rnet, "nms_iou", "rnet"),
            onet_nms_min_overlap=number(onet, "nms_min_overlap", "onet"),
            cell_size=int(number(pnet, "cell_size", "pnet")),
            stride=int(number(pnet, "stride", "pnet")),
            pixel_mean=number(preprocessing, "mean", "preprocessing"),
            pixel_scale=number(preprocessing, "scale", "preprocessing"),
        )


def dlib_style_box(box: Box) -> Box:
    """The square box dlib's detectors (and imglab annotations) would draw for an MTCNN box.

    For consumers tuned to dlib boxes, e.g. dlib's shape predictors.
    """
    size = float(np.sqrt(max(box.width, 0.0) * max(box.height, 0.0)))
    cx = (box.x0 + box.x1) / 2
    cy = (box.y0 + box.y1) / 2 + DLIB_BOX_DROP * size
    half = DLIB_BOX_SIDE * size / 2
    return Box(cx - half, cy - half, cx + half, cy + half)


def _check_session(session: ModelSession, stage: str, outputs: set[str], size: int | None) -> None:
    inputs = session.get_inputs()
    names = {o.name for o in session.get_outputs()}
    if len(inputs) != 1 or inputs[0].name != _INPUT or not outputs <= names:
        raise ModelError(
            f"MTCNN {stage}: expected input '{_INPUT}' and outputs {sorted(outputs)}, "
            f"got {[i.name for i in inputs]} -> {sorted(names)} (rebuild the models)"
        )
    shape = list(inputs[0].shape)
    if len(shape) != 4 or shape[1] != 3 or (size is not None and shape[2:] != [size, size]):
        raise ModelError(f"MTCNN {stage}: unexpected input shape {shape} (rebuild the models)")


def _pool_bounds(in_sizes: I64, out_size: int) -> tuple[I64, I64]:
    """Adaptive-average-pooling windows: [start, end) per output index, for each input size.

    ``in_sizes`` has shape (n,); the results have shape (n, out_size).
    """
    i = np.arange(out_size, dtype=np.int64)
    sizes = in_sizes.astype(np.int64)[:, None]
    start = (i * sizes) // out_size
    end = -((-(i + 1) * sizes) // out_size)  # ceil division
    return start, end


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _resize_plan(
    height: int, width: int, out_height: int, out_width: int
) -> tuple[I64, I64, I64, I64, FloatArray]:
    """Pooling windows (row starts, row ends, column starts, column ends) and window sizes
    for resizing a whole image: the same for every photo of a size, so kept (read-only)."""
    ys, ye = (v[0] for v in _pool_bounds(np.array([height]), out_height))
    xs, xe = (v[0] for v in _pool_bounds(np.array([width]), out_width))
    counts: FloatArray = np.outer(ye - ys, xe - xs).astype(np.float32)
    for array in (ys, ye, xs, xe, counts):
        array.flags.writeable = False
    return ys, ye, xs, xe, counts


class _AreaSampler:
    """torch's ``interpolate(mode="area")`` (adaptive average pooling) of any window of an image.

    Windows may reach outside the image; the pixels there count as zeros.
    """

    def __init__(self, image: RGBImage) -> None:
        self.height, self.width = int(image.shape[0]), int(image.shape[1])
        # Integral image, channels first, with a zero first row and column, so that any window's
        # sum takes four lookups. uint32 arithmetic wraps modulo 2**32, and a window's sum is a
        # difference of integrals, so it stays exact even where the integral itself wraps (every
        # window we sample holds far fewer than 2**32 / 255 pixels); half the memory of int64.
        channels = np.ascontiguousarray(image.transpose(2, 0, 1))
        integral = np.zeros((3, self.height + 1, self.width + 1), dtype=np.uint32)
        # Along rows (contiguous) first: the same integers, 1.1-1.4x faster than columns first.
        np.cumsum(channels, axis=2, dtype=np.uint32, out=integral[:, 1:, 1:])
        np.cumsum(integral[:, 1:, 1:], axis=1, out=integral[:, 1:, 1:])
        self._integral = integral

    def resize(self, out_height: int, out_width: int) -> FloatArray:
        """The whole image resized to (3, out_height, out_width)."""
        ys, ye, xs, xe, counts = _resize_plan(self.height, self.width, out_height, out_width)
        # Separable: difference of rows, then of columns; far cheaper than 2-D gathers.
        rows = np.take(self._integral, ye, axis=1) - np.take(self._integral, ys, axis=1)
        sums = np.take(rows, xe, axis=2) - np.take(rows, xs, axis=2)
        result: FloatArray = sums.astype(np.float32) / counts
        return result

    def crops(self, x0: I64, y0: I64, x1: I64, y1: I64, size: int) -> FloatArray:
        """Windows [x0, x1) x [y0, y1) (non-empty), each resized to (3, size, size): (n, 3, ...)."""
        ys, ye = _pool_bounds(y1 - y0, size)
        xs, xe = _pool_bounds(x1 - x0, size)
        ys, ye, xs, xe = ys + y0[:, None], ye + y0[:, None], xs + x0[:, None], xe + x0[:, None]
        counts = ((ye - ys)[:, :, None] * (xe - xs)[:, None, :]).astype(np.float32)
        # Clamping the corners to the image makes the outside contribute nothing: zero padding.
        stride = self.width + 1
        row_s = (np.clip(ys, 0, self.height) * stride)[:, :, None]
        row_e = (np.clip(ye, 0, self.height) * stride)[:, :, None]
        col_s = np.clip(xs, 0, self.width)[:, None, :]
        col_e = np.clip(xe, 0, self.width)[:, None, :]
        flat = self._integral.reshape(3, -1)
        sums = (
            flat.take(row_e + col_e, axis=1)
            - flat.take(row_s + col_e, axis=1)
            - flat.take(row_e + col_s, axis=1)
            + flat.take(row_s + col_s, axis=1)
        )  # (3, n, size, size)
        result: FloatArray = (sums.astype(np.float32) / counts).transpose(1, 0, 2, 3)
        return result


def _nms(boxes: FloatArray, scores: FloatArray, threshold: float, *, numpy_style: bool) -> I64:
    """Greedy NMS, best score first; indices of the boxes kept, in that order.

    Reproduces the two NMS flavours facenet-pytorch uses, in float32 like them:

    * torchvision's (P-Net, R-Net): IoU with sizes ``x2 - x1``; a box goes when IoU exceeds the
      threshold (compared in double); ties in score keep candidate order.
    * facenet-pytorch's numpy one (O-Net, ``numpy_style``): intersection over the smaller area,
      sizes ``x2 - x1 + 1``, compared in float32; ties go to the later candidate, as numpy's
      argsort-then-pop-last does for the handful of boxes that reach O-Net.
    """
    add = np.float32(1.0 if numpy_style else 0.0)
    if numpy_style:
        order = np.argsort(scores, kind="stable")[::-1]
    else:
        order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (np.ascontiguousarray(boxes[order, k]) for k in range(4))
    areas = (x2 - x1 + add) * (y2 - y1 + add)
    n = len(order)
    removed = np.zeros(n, dtype=bool)
    keep: list[int] = []
    for start in range(0, n, NMS_BLOCK):
        rows = slice(start, min(start + NMS_BLOCK, n))
        # Overlaps of this block of boxes with every box from the block on (upper triangle).
        inter_w = np.minimum(x2[rows, None], x2[None, start:])
        inter_w -= np.maximum(x1[rows, None], x1[None, start:])
        inter_h = np.minimum(y2[rows, None], y2[None, start:])
        inter_h -= np.maximum(y1[rows, None], y1[None, start:])
        inter = np.maximum(inter_w + add, 0.0) * np.maximum(inter_h + add, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):  # degenerate boxes: NaN, never drop
            if numpy_style:
                overlap = inter / np.minimum(areas[rows, None], areas[None, start:])
                suppresses = overlap > np.float32(threshold)
            else:
                overlap = inter / (areas[rows, None] + areas[None, start:] - inter)
                suppresses = overlap.astype(np.float64) > threshold
        for i in range(rows.start, rows.stop):
            if not removed[i]:
                keep.append(i)
                removed[start:] |= suppresses[i - start]
    return order[np.asarray(keep, dtype=np.int64)]


def _square(boxes: FloatArray) -> FloatArray:
    """Grow each box (x1, y1, x2, y2, score) to a square about its centre."""
    out = boxes.copy()
    wh = boxes[:, 2:4] - boxes[:, 0:2]
    side = wh.max(axis=1, keepdims=True)
    out[:, 0:2] = boxes[:, 0:2] + wh * np.float32(0.5) - side * np.float32(0.5)
    out[:, 2:4] = out[:, 0:2] + side
    return out


def _regress(boxes: FloatArray, deltas: FloatArray, extra: float) -> FloatArray:
    """Move the box edges by ``deltas`` times the box size (``x2 - x1 + extra``)."""
    out = boxes.copy()
    wh = boxes[:, 2:4] - boxes[:, 0:2] + np.float32(extra)
    out[:, 0:4] = boxes[:, 0:4] + deltas * np.tile(wh, 2)
    return out


def _tiles(size: int, tile: int, cell: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Split one axis of a P-Net level into overlapping runs: (start, end, first cell, cells).

    Output cell ``j`` sees input ``stride * j`` .. ``stride * j + cell - 1``. Every run but the
    last starts at a multiple of the stride and has an even length ``tile``, so its cells are
    whole windows inside it; the next starts ``cell - stride`` before it ends, at its first
    cell not yet computed. The last run ends where the level ends, so the one cell that may
    see past the edge there (P-Net pools with ceil_mode) is computed as on the whole level.
    """
    step = tile - (cell - stride)
    runs = []
    start = 0
    while start + tile < size:
        runs.append((start, start + tile, start // stride, (tile - cell) // stride + 1))
        start += step
    total = -(-(size - 2) // 2) - 4  # P-Net's output length: conv 3, pool 2 (ceil), conv 3, conv 3
    runs.append((start, size, start // stride, total - start // stride))
    return runs


def _on_gpu(session: ModelSession) -> bool:
    """Whether a session is a TensorRT engine; anything else (ONNX Runtime, or a wrapper around
    it such as INT8 calibration's recorder) runs on the CPU."""
    return isinstance(session, TensorRTSession)


class MtcnnDetector:
    """Finds faces with MTCNN; ``detect`` is thread-safe (onnxruntime sessions are)."""

    def __init__(
        self,
        pnet: ModelSession,
        rnet: ModelSession,
        onet: ModelSession,
        parameters: MtcnnParameters | None = None,
        *,
        crop_batches: tuple[int, int] = (RNET_BATCH, ONET_BATCH),
        pnet_tile: int | None = PNET_TILE,
    ) -> None:
        """``crop_batches``: crops per R-Net and O-Net run; ``pnet_tile``: the even side of the
        tiles P-Net runs larger levels in (None: each level whole). Neither changes a result."""
        if min(crop_batches) < 1 or (pnet_tile is not None and (pnet_tile < 24 or pnet_tile % 2)):
            raise ModelError("crop batches must be >= 1 and the P-Net tile even and >= 24")
        _check_session(pnet, "pnet", {_DELTAS, _PROBS}, None)
        _check_session(rnet, "rnet", {_DELTAS, _PROBS}, RNET_SIZE)
        _check_session(onet, "onet", {_DELTAS, _LANDMARKS, _PROBS}, ONET_SIZE)
        self._pnet = pnet
        self._rnet = rnet
        self._onet = onet
        self.parameters = parameters if parameters is not None else MtcnnParameters()
        self._crop_batches = crop_batches
        self._pnet_tile = pnet_tile

    @classmethod
    def load(
        cls,
        models_dir: Path,
        *,
        threads: int | None = None,
        open_model: ModelOpener | None = None,
        precision: Precision = "fp32",
        runs: RunSizing = "by-backend",
    ) -> MtcnnDetector:
        """The detector over the verified ``mtcnn_{pnet,rnet,onet}`` models and their manifests.

        ``threads`` caps onnxruntime's intra-op threads (default: the cores this process may use);
        ``open_model`` opens each model on another backend (default: ONNX Runtime on the CPU);
        ``precision`` picks the FP32 models or their INT8 twins (``edgeid models build
        --precision int8``). ``runs``: ``by-backend`` sizes each net's runs for the backend its
        session really runs on (a TensorRT engine: whole levels and GPU_CROP_BATCH crops;
        anything else, ONNX Runtime or a wrapper around it: tiles and small batches);
        ``whole`` gives whole levels and GPU_CROP_BATCH crops on any backend (what INT8
        calibration records). Results are the same either way.
        """
        manifests = []
        sessions: list[ModelSession] = []
        for name in (precision_model(n, precision) for n in MODEL_NAMES):
            manifest, data = read_verified_model(models_dir, name)
            try:
                if open_model is None:
                    sessions.append(create_cpu_session(data, threads))
                else:
                    sessions.append(open_model(name, manifest.sha256, data))
            except Exception as exc:  # onnxruntime raises its own exception types
                raise ModelError(
                    f"MTCNN model {name} cannot be loaded ({exc}); rebuild with "
                    "`edgeid models build --force`"
                ) from exc
            manifests.append(manifest)
        pnet, rnet, onet = manifests
        parameters = MtcnnParameters.from_manifest(
            pnet.parameters, rnet.parameters, onet.parameters, pnet.preprocessing
        )
        # On a GPU the cache sizes above do not apply, and each run costs a launch and two
        # copies: whole levels and large batches (its engines' own limit chunks them).
        whole = [runs == "whole" or _on_gpu(session) for session in sessions]
        return cls(
            sessions[0],
            sessions[1],
            sessions[2],
            parameters,
            crop_batches=(
                GPU_CROP_BATCH if whole[1] else RNET_BATCH,
                GPU_CROP_BATCH if whole[2] else ONET_BATCH,
            ),
            pnet_tile=None if whole[0] else PNET_TILE,
        )

    def scales(self, height: int, width: int) -> list[float]:
        """Pyramid scales for an image of this size, largest first."""
        p = self.parameters
        scale = p.cell_size / p.min_face_size
        shorter = min(height, width) * scale
        scales = []
        while shorter >= p.cell_size:
            scales.append(scale)
            scale *= p.scale_factor
            shorter *= p.scale_factor
        return scales

    def detect(self, image: RGBImage) -> list[Detection]:
        """Faces in ``image`` (uint8, height x width x 3, RGB), best score first.

        A face cut by the image border gets a box that reaches past the border.
        """
        if (
            not isinstance(image, np.ndarray)
            or image.dtype != np.uint8
            or image.ndim != 3
            or image.shape[2] != 3
            or image.shape[0] < 1
            or image.shape[1] < 1
        ):
            described = (
                f"{image.dtype}{list(image.shape)}"
                if isinstance(image, np.ndarray)
                else type(image).__name__
            )
            raise BadInputError(f"expected a uint8 height x width x 3 RGB image, got {described}")
        sampler = _AreaSampler(image)
        boxes = self._stage_pnet(sampler)
        logger.debug("MTCNN P-Net: %d candidates", len(boxes))
        if len(boxes):
            boxes = self._stage_rnet(sampler, boxes)
            logger.debug("MTCNN R-Net: %d candidates", len(boxes))
        if not len(boxes):
            return []
        boxes, landmarks = self._stage_onet(sampler, boxes)
        logger.debug("MTCNN O-Net: %d faces", len(boxes))
        return [
            Detection(
                box=Box(float(b[0]) - 1.0, float(b[1]) - 1.0, float(b[2]), float(b[3])),
                score=float(b[4]),
                landmarks=marks,
            )
            for b, marks in zip(boxes, landmarks, strict=True)
        ]

    def _normalise(self, pixels: FloatArray) -> FloatArray:
        """Pixel means, channels first, -> network input."""
        p = self.parameters
        data = (pixels - np.float32(p.pixel_mean)) * np.float32(p.pixel_scale)
        return np.ascontiguousarray(data, dtype=np.float32)

    def _stage_pnet(self, sampler: _AreaSampler) -> FloatArray:
        """Candidate boxes (n, 5): x1, y1, x2, y2 (1-based inclusive), score."""
        p = self.parameters
        height, width = sampler.height, sampler.width
        per_scale: list[FloatArray] = []
        for scale in self.scales(height, width):
            resized = sampler.resize(int(height * scale + 1), int(width * scale + 1))
            deltas, probs = self._run_pnet(self._normalise(resized[None]))
            face = probs[0, 1]
            rows, cols = np.nonzero(face >= np.float32(p.thresholds[0]))
            if not rows.size:
                continue
            # Each output cell sees a cell_size window at stride `stride` of this level. float32,
            # as in facenet-pytorch: floor() of a quotient that is a whole number in exact
            # arithmetic can land one pixel lower, and we want the same pixels.
            cells = np.column_stack([cols, rows]).astype(np.float32)
            scale32 = np.float32(scale)
            top_left = np.floor((np.float32(p.stride) * cells + np.float32(1)) / scale32)
            bottom_right = np.floor(
                (np.float32(p.stride) * cells + np.float32(p.cell_size)) / scale32
            )
            found = np.column_stack(
                [top_left, bottom_right, face[rows, cols], deltas[0][:, rows, cols].T]
            )
            keep = _nms(found[:, :4], found[:, 4], p.pnet_scale_nms_iou, numpy_style=False)
            per_scale.append(found[keep])
        if not per_scale:
            return np.zeros((0, 5), dtype=np.float32)
        boxes = np.concatenate(per_scale)
        boxes = boxes[_nms(boxes[:, :4], boxes[:, 4], p.pnet_nms_iou, numpy_style=False)]
        # P-Net's regression scales by x2 - x1, the later stages' by x2 - x1 + 1.
        return _square(_regress(boxes[:, 0:5], boxes[:, 5:9], 0.0))

    def _crops(
        self, sampler: _AreaSampler, boxes: FloatArray, size: int
    ) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
        """Network input for each box resized to size x size, and which boxes had a crop."""
        corners = np.trunc(boxes[:, 0:4]).astype(np.int64)
        # 1-based inclusive (x1, y1, x2, y2) -> 0-based [x1 - 1, x2) pixel window.
        x0, y0, x1, y1 = corners[:, 0] - 1, corners[:, 1] - 1, corners[:, 2], corners[:, 3]
        x0, y0 = np.maximum(x0, 0), np.maximum(y0, 0)
        x1, y1 = np.minimum(x1, sampler.width), np.minimum(y1, sampler.height)
        valid = (x1 > x0) & (y1 > y0)
        pixels = sampler.crops(x0[valid], y0[valid], x1[valid], y1[valid], size)
        return self._normalise(pixels), valid

    def _run_pnet(self, level: FloatArray) -> tuple[FloatArray, FloatArray]:
        """P-Net's (deltas, probabilities) maps over one level (1, 3, h, w), tile by tile."""
        p = self.parameters
        names = [_DELTAS, _PROBS]
        if self._pnet_tile is None:
            deltas, probs = self._pnet.run(names, {_INPUT: level})
            return deltas, probs
        rows = _tiles(level.shape[2], self._pnet_tile, p.cell_size, p.stride)
        cols = _tiles(level.shape[3], self._pnet_tile, p.cell_size, p.stride)
        if len(rows) == 1 and len(cols) == 1:
            deltas, probs = self._pnet.run(names, {_INPUT: level})
            return deltas, probs
        out_h = sum(n for _, _, _, n in rows)
        out_w = sum(n for _, _, _, n in cols)
        maps: list[FloatArray] = []
        for y0, y1, cy, ny in rows:
            for x0, x1, cx, nx in cols:
                tile = np.ascontiguousarray(level[:, :, y0:y1, x0:x1])
                parts = self._pnet.run(names, {_INPUT: tile})
                if not maps:
                    maps = [
                        np.empty((1, part.shape[1], out_h, out_w), part.dtype) for part in parts
                    ]
                for whole, part in zip(maps, parts, strict=True):
                    whole[:, :, cy : cy + ny, cx : cx + nx] = part[:, :, :ny, :nx]
        return maps[0], maps[1]

    @staticmethod
    def _run_batched(
        session: ModelSession, names: list[str], data: FloatArray, batch: int
    ) -> list[FloatArray]:
        parts = [
            session.run(names, {_INPUT: data[i : i + batch]}) for i in range(0, len(data), batch)
        ]
        return [np.concatenate([part[k] for part in parts]) for k in range(len(names))]

    def _stage_rnet(self, sampler: _AreaSampler, boxes: FloatArray) -> FloatArray:
        p = self.parameters
        crops, valid = self._crops(sampler, boxes, RNET_SIZE)
        boxes = boxes[valid]
        if not len(boxes):
            return boxes
        deltas, probs = self._run_batched(
            self._rnet, [_DELTAS, _PROBS], crops, self._crop_batches[0]
        )
        passed = probs[:, 1] > np.float32(p.thresholds[1])
        boxes = np.column_stack([boxes[passed, 0:4], probs[passed, 1]])
        deltas = deltas[passed]
        keep = _nms(boxes[:, :4], boxes[:, 4], p.rnet_nms_iou, numpy_style=False)
        return _square(_regress(boxes[keep], deltas[keep], 1.0))

    def _stage_onet(
        self, sampler: _AreaSampler, boxes: FloatArray
    ) -> tuple[FloatArray, list[FloatArray]]:
        p = self.parameters
        crops, valid = self._crops(sampler, boxes, ONET_SIZE)
        boxes = boxes[valid]
        if not len(boxes):
            return boxes, []
        deltas, marks, probs = self._run_batched(
            self._onet, [_DELTAS, _LANDMARKS, _PROBS], crops, self._crop_batches[1]
        )
        passed = probs[:, 1] > np.float32(p.thresholds[2])
        boxes = np.column_stack([boxes[passed, 0:4], probs[passed, 1]])
        marks = marks[passed]
        # Landmarks are fractions of the (pre-regression) box, whose pixels start at x1 - 1.
        wh = boxes[:, 2:4] - boxes[:, 0:2] + np.float32(1)
        points = np.stack(
            [
                wh[:, 0:1] * marks[:, 0:5] + boxes[:, 0:1] - np.float32(1),
                wh[:, 1:2] * marks[:, 5:10] + boxes[:, 1:2] - np.float32(1),
            ],
            axis=-1,
        )
        boxes = _regress(boxes, deltas[passed], 1.0)
        keep = _nms(boxes[:, :4], boxes[:, 4], p.onet_nms_min_overlap, numpy_style=True)
        return boxes[keep], [points[i].copy() for i in keep]
