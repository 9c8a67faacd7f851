"""The face embedder: stored aligned chips in, L2-normalised templates out.

Callers always hand the box's stored chip (dlib's 150 px alignment); ``ChipInput`` cuts and
encodes the model's own chip from it (``chip_input.py``), so any embedding model sees the same
faces at enrolment, at search and when a gallery is re-embedded.
"""

from __future__ import annotations

from typing import cast

import numpy as np

from edgeid.runtime.inference.backends.session import ModelSession
from edgeid.runtime.inference.chip_input import SOURCE_CHIP_SIZE, ChipInput
from edgeid.runtime.inference.types import FloatArray, RGBImage


class Embedder:
    def __init__(
        self, session: ModelSession, model_id: str, chip_input: ChipInput | None = None
    ) -> None:
        self._session = session
        self._input = session.get_inputs()[0].name
        self.chip_input = chip_input or ChipInput()
        if chip_input is None:
            # The shipped model: its input is the stored chip itself (NHWC).
            shape = session.get_inputs()[0].shape
            self.chip_size = int(cast(int, shape[1]))
        else:
            self.chip_size = SOURCE_CHIP_SIZE
        self.model_id = model_id

    @property
    def dim(self) -> int:
        """Template length, from the model's output shape."""
        return int(cast(int, self._session.get_outputs()[0].shape[-1]))

    def embed(self, chips: list[RGBImage]) -> FloatArray:
        """One row per chip, unit length (cosine similarity is then a dot product)."""
        if not chips:
            return np.zeros((0, 0), dtype=np.float32)
        if self.chip_input.fixed_batch == 1 and len(chips) > 1:
            return np.concatenate([self.embed([chip]) for chip in chips])
        batch = self.chip_input.tensor(chips)
        raw = np.asarray(self._session.run(None, {self._input: batch})[0], dtype=np.float32)
        raw = raw.reshape(len(chips), -1)
        norms = np.linalg.norm(raw, axis=1, keepdims=True)
        normalised: FloatArray = raw / np.maximum(norms, np.float32(1e-12))
        return normalised
