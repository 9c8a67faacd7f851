"""The face embedder: aligned 150x150 RGB chips in, L2-normalised templates out."""

from __future__ import annotations

from typing import cast

import numpy as np

from edgeid.runtime.inference.backends.session import ModelSession
from edgeid.runtime.inference.types import FloatArray, RGBImage


class Embedder:
    def __init__(self, session: ModelSession, model_id: str) -> None:
        self._session = session
        self._input = session.get_inputs()[0].name
        shape = session.get_inputs()[0].shape
        self.chip_size = int(cast(int, shape[1]))
        self.model_id = model_id

    @property
    def dim(self) -> int:
        """Template length, from the model's output shape."""
        return int(cast(int, self._session.get_outputs()[0].shape[-1]))

    def embed(self, chips: list[RGBImage]) -> FloatArray:
        """One row per chip, unit length (cosine similarity is then a dot product)."""
        if not chips:
            return np.zeros((0, 0), dtype=np.float32)
        batch = np.ascontiguousarray(np.stack(chips), dtype=np.uint8)
        raw = np.asarray(self._session.run(None, {self._input: batch})[0], dtype=np.float32)
        norms = np.linalg.norm(raw, axis=1, keepdims=True)
        normalised: FloatArray = raw / np.maximum(norms, np.float32(1e-12))
        return normalised
