"""What every converter returns, so ``edgeid.models.build`` can write one manifest per model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "float32", "uint8", ...
    shape: list[int | str]  # symbolic dims as strings, e.g. ["batch", 3, 150, 150]
    meaning: str = ""


@dataclass(frozen=True)
class ConvertedModel:
    """A converted model file written into the destination folder."""

    name: str  # stable id, e.g. "dlib_resnet_v1"
    task: str  # "face-embedding" | "face-detection" | "face-landmarks"
    filename: str  # file name inside the destination folder
    format: str  # "onnx" | "edgeid-ertree" (our regression-tree format)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    preprocessing: dict[str, Any]
    # Values read from the source that the runtime needs (e.g. MMOD detector windows, MTCNN
    # thresholds). JSON-serialisable only.
    parameters: dict[str, Any] = field(default_factory=dict)
