"""The inference-session interface every backend implements.

It is the subset of ``onnxruntime.InferenceSession`` that edgeid's detectors and embedder use, so
an ONNX Runtime session satisfies it as is and a TensorRT engine can stand in for one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy.typing as npt


@runtime_checkable
class TensorInfo(Protocol):
    """A model input or output: its name and shape (ints, or names/None for dynamic dims)."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> Sequence[int | str | None]: ...


@runtime_checkable
class ModelSession(Protocol):
    """What the runtime needs from an inference session (onnxruntime's calling convention)."""

    def get_inputs(self) -> Sequence[TensorInfo]: ...

    def get_outputs(self) -> Sequence[TensorInfo]: ...

    def run(
        self,
        output_names: Sequence[str] | None,
        input_feed: Mapping[str, npt.NDArray[Any]],
        /,
    ) -> list[npt.NDArray[Any]]:
        """The named outputs (all, in model order, when ``None``) for one set of inputs."""
        ...


# Opens one verified model (name, sha256, bytes) as a session on whatever backend is configured.
ModelOpener = Callable[[str, str, bytes], ModelSession]
