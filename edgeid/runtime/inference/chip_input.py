"""What an embedding model is fed: its chip geometry (alignment template) and pixel encoding.

Every face the box keeps is an aligned dlib chip (150 px, padding 0.25: ``alignment.py``),
sealed in its gallery as the face's thumbnail. A model trained on another alignment gets its
chip cut from that dlib chip by one fixed similarity transform (``rechip``), the same at
enrolment, at search and when a gallery is re-embedded, so probe and gallery templates always
come from the same pixels. Two templates are known:

- ``dlib``: dlib's 5-point template padded by 0.25 (``alignment.FACE_TEMPLATE_5``) at any size;
- ``arcface``: the common ArcFace 112x112 five-point template (eye centres, nose tip, mouth
  corners). dlib's five landmarks are four eye corners and the base of the nose, with no mouth
  corners, so the template used here is dlib's five points placed where the two eye centres
  fall on ArcFace's (``ARCFACE_112_DLIB5``). Its eyes are ArcFace's; the rest of the face
  follows dlib's mean face. ArcFace's crop reaches higher up the forehead than dlib's chip:
  the top ~18% of its rows (and ~5% at each side) lie outside the dlib chip and are black.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np
import numpy.typing as npt

from edgeid.runtime.errors import ModelError
from edgeid.runtime.inference.alignment import FACE_TEMPLATE_5, Float64Array, bilinear, similarity
from edgeid.runtime.inference.types import FloatArray, RGBImage

AlignName = Literal["dlib", "arcface"]
ALIGNMENTS: tuple[AlignName, ...] = ("dlib", "arcface")
Layout = Literal["NHWC", "NCHW"]
InputDtype = Literal["uint8", "float32"]
ChannelOrder = Literal["RGB", "BGR"]
InputTensor = npt.NDArray[np.generic]

# The chip every stored face is (dlib.get_face_chip(size=150, padding=0.25)).
SOURCE_CHIP_SIZE = 150
SOURCE_CHIP_PADDING = 0.25
# ArcFace's reference points in a 112x112 chip (insightface's arcface_dst): left eye, right
# eye (as seen in the image), nose tip, left and right mouth corners.
ARCFACE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
ARCFACE_SIZE = 112


def _dlib_points(size: int, padding: float = SOURCE_CHIP_PADDING) -> Float64Array:
    points: Float64Array = (padding + FACE_TEMPLATE_5) / (2 * padding + 1) * float(size)
    return points


def _arcface_dlib5() -> Float64Array:
    """dlib's five template points, placed so that its eye centres land on ArcFace's."""
    eyes_dlib = np.stack([FACE_TEMPLATE_5[2:4].mean(axis=0), FACE_TEMPLATE_5[0:2].mean(axis=0)])
    m, t = similarity(eyes_dlib, ARCFACE_112[:2])
    placed: Float64Array = FACE_TEMPLATE_5 @ m.T + t
    return placed


# dlib's 5 points (dlib's order) where the ArcFace 112 template puts the face.
ARCFACE_112_DLIB5 = _arcface_dlib5()


@dataclass(frozen=True)
class ChipTemplate:
    """Where a model wants dlib's five landmarks in its square chip of ``size`` pixels."""

    align: AlignName
    size: int

    @property
    def points(self) -> Float64Array:
        if self.align == "dlib":
            return _dlib_points(self.size)
        scaled: Float64Array = ARCFACE_112_DLIB5 * (self.size / ARCFACE_SIZE)
        return scaled


SOURCE_TEMPLATE = ChipTemplate("dlib", SOURCE_CHIP_SIZE)


def rechip(chip: RGBImage, target: ChipTemplate) -> RGBImage:
    """The model's chip cut from a stored dlib chip (bilinear, black outside)."""
    if target == SOURCE_TEMPLATE:
        return chip
    # Model chip pixel -> source chip pixel: exact, both templates are similar point sets.
    m, t = similarity(target.points, SOURCE_TEMPLATE.points)
    grid = np.arange(target.size, dtype=np.float64)
    x = m[0, 0] * grid[None, :] + m[0, 1] * grid[:, None] + t[0]
    y = m[1, 0] * grid[None, :] + m[1, 1] * grid[:, None] + t[1]
    planes = np.moveaxis(chip, 2, 0).astype(np.uint16, order="C")
    return bilinear(planes, x, y)


@dataclass(frozen=True)
class ChipInput:
    """How a batch of stored chips becomes the model's input tensor."""

    template: ChipTemplate = SOURCE_TEMPLATE
    layout: Layout = "NHWC"
    dtype: InputDtype = "uint8"
    channel_order: ChannelOrder = "RGB"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # A model exported with a fixed batch of one is run chip by chip.
    fixed_batch: int | None = None

    @classmethod
    def of(cls, preprocessing: Mapping[str, object]) -> ChipInput:
        """From a manifest's ``preprocessing`` (the shipped dlib model's holds no ``align``:
        dlib chips, uint8 NHWC, normalised in its graph)."""
        try:
            align = str(preprocessing.get("align", "dlib"))
            size = int(cast(int, preprocessing.get("chip_size", SOURCE_CHIP_SIZE)))
            if align not in ALIGNMENTS or size < 16:
                raise ValueError(f"alignment {align} at {size} px")
            batch = preprocessing.get("fixed_batch")
            return cls(
                template=ChipTemplate(align, size),
                layout=cast(Layout, _choice(preprocessing, "layout", ("NHWC", "NCHW"))),
                dtype=cast(InputDtype, _choice(preprocessing, "dtype", ("uint8", "float32"))),
                channel_order=cast(
                    ChannelOrder, _choice(preprocessing, "channel_order", ("RGB", "BGR"))
                ),
                mean=_triple(preprocessing.get("mean", (0.0, 0.0, 0.0))),
                std=_triple(preprocessing.get("std", (1.0, 1.0, 1.0)), nonzero=True),
                fixed_batch=None if batch is None else int(cast(int, batch)),
            )
        except (TypeError, ValueError) as exc:
            raise ModelError(f"model preprocessing is unusable ({exc})") from exc

    def tensor(self, chips: Sequence[RGBImage]) -> InputTensor:
        """The input tensor for ``chips`` (stored dlib chips)."""
        cut = [rechip(chip, self.template) for chip in chips]
        batch = np.ascontiguousarray(np.stack(cut), dtype=np.uint8)
        if self.channel_order == "BGR":
            batch = np.ascontiguousarray(batch[..., ::-1])
        if self.dtype == "uint8":
            out: InputTensor = batch
        else:
            mean = np.asarray(self.mean, dtype=np.float32)
            std = np.asarray(self.std, dtype=np.float32)
            scaled: FloatArray = (batch.astype(np.float32) - mean) / std
            out = scaled
        if self.layout == "NCHW":
            out = np.ascontiguousarray(np.moveaxis(out, 3, 1))
        return out


def _choice(values: Mapping[str, object], key: str, allowed: tuple[str, ...]) -> str:
    value = str(values.get(key, allowed[0]))
    if value not in allowed:
        raise ValueError(f"{key} {value!r} is not one of {', '.join(allowed)}")
    return value


def _triple(value: object, *, nonzero: bool = False) -> tuple[float, float, float]:
    items = [float(v) for v in cast(Sequence[float], value)]
    if len(items) == 1:
        items = items * 3
    if len(items) != 3 or not all(np.isfinite(items)) or (nonzero and not all(items)):
        raise ValueError(f"expected 1 or 3 finite non-zero numbers, got {value!r}")
    return (items[0], items[1], items[2])
