"""Inference backends behind one interface: ONNX Runtime on the CPU, TensorRT on NVIDIA GPUs.

``ModelSession`` is what the detectors and the embedder run; ``open_session`` picks the backend.
TensorRT and pycuda are imported only when a TensorRT session is asked for.
"""

from __future__ import annotations

from edgeid.runtime.inference.backends.selection import (
    BACKEND_CHOICES,
    BackendChoice,
    BackendUsed,
    OpenedSession,
    open_session,
)
from edgeid.runtime.inference.backends.session import ModelSession, TensorInfo

__all__ = [
    "BACKEND_CHOICES",
    "BackendChoice",
    "BackendUsed",
    "ModelSession",
    "OpenedSession",
    "TensorInfo",
    "open_session",
]
