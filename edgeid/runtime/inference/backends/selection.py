"""Choosing the inference backend for a model: ONNX Runtime on the CPU, or TensorRT on a GPU.

``open_session`` never fails for want of a GPU: where TensorRT was asked for and cannot be used
(not installed, no GPU, the engine does not build or load) the model runs on ONNX Runtime and the
result says so (``degraded``) with the reason, which is also logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from edgeid.runtime.errors import BadInputError, ModelIntegrityError
from edgeid.runtime.inference.backends import tensorrt_backend
from edgeid.runtime.inference.backends.engine_cache import sha256_hex
from edgeid.runtime.inference.backends.session import ModelSession
from edgeid.runtime.inference.onnx_backend import DEFAULT_SPINNING, create_cpu_session

logger = logging.getLogger(__name__)
_REPORTED: set[str] = set()  # why TensorRT is unavailable, already logged

BackendChoice = Literal["auto", "cpu", "tensorrt"]
BackendUsed = Literal["cpu", "tensorrt"]
BACKEND_CHOICES: tuple[BackendChoice, ...] = get_args(BackendChoice)


@dataclass(frozen=True)
class OpenedSession:
    session: ModelSession
    backend_used: BackendUsed
    # True when TensorRT was expected (asked for, or chosen by "auto") but the CPU runs instead.
    degraded: bool
    # Why the backend differs from the one asked for (also set, not degraded, when "auto" finds
    # no GPU); None when the requested or preferred backend runs.
    reason: str | None


def open_session(
    model_bytes: bytes,
    model_sha256: str,
    *,
    backend: BackendChoice,
    engine_cache_dir: Path,
    threads: int | None,
    model_name: str | None = None,
    spinning: bool = DEFAULT_SPINNING,
    rewrite_prelu: bool = True,
) -> OpenedSession:
    """A session over verified model bytes on the chosen backend.

    * ``cpu``: ONNX Runtime.
    * ``auto``: TensorRT where the ``tensorrt`` and ``pycuda`` packages import and a GPU answers,
      else ONNX Runtime (not degraded: there is nothing better on this machine).
    * ``tensorrt``: TensorRT; when it is unavailable, ONNX Runtime, degraded, with the reason.

    On a GPU, an engine that will not build or load also falls back (degraded); a corrupt cached
    engine is rebuilt once first. ``model_sha256`` must be the bytes' sha256 (it keys the
    engine cache); a mismatch is refused. ``model_name`` picks the model's TensorRT profile
    limits (P-Net's are smaller than MMOD's). ``rewrite_prelu``: see ``create_cpu_session``.
    """
    if backend not in BACKEND_CHOICES:
        raise BadInputError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    if sha256_hex(model_bytes) != model_sha256:
        raise ModelIntegrityError(
            f"model bytes do not match sha256 {model_sha256[:12]}… given for them"
        )

    def cpu_session() -> ModelSession:
        session: ModelSession = create_cpu_session(
            model_bytes, threads, spinning=spinning, rewrite_prelu=rewrite_prelu
        )
        return session

    if backend == "cpu":
        return OpenedSession(cpu_session(), "cpu", False, None)

    try:
        platform = tensorrt_backend.probe()
    except tensorrt_backend.TensorRTUnavailableError as exc:
        if backend == "auto":
            if str(exc) not in _REPORTED:  # once per process, not once per model
                _REPORTED.add(str(exc))
                logger.info("TensorRT not available (%s); using ONNX Runtime on the CPU", exc)
            reason = f"TensorRT not available: {exc}"
            return OpenedSession(cpu_session(), "cpu", False, reason)
        return _degraded(
            cpu_session,
            f"TensorRT was requested but is unavailable: {exc}",
        )

    try:
        session = tensorrt_backend.open_tensorrt_session(
            model_bytes,
            model_sha256,
            engine_cache_dir,
            fallback=cpu_session,
            model_name=model_name,
        )
    except Exception as exc:  # TensorRT, CUDA and the filesystem each raise their own types
        said = tensorrt_backend.last_trt_error()
        told = f"; TensorRT's last error: {said}" if said and said not in str(exc) else ""
        return _degraded(
            cpu_session,
            f"TensorRT engine for model {model_sha256[:12]} on {platform.gpu_name} could not be "
            f"built or loaded ({type(exc).__name__}: {exc}{told})",
        )
    logger.info(
        "model %s runs on TensorRT %s, %s, %s (engine from %s)",
        model_sha256[:12],
        platform.trt_version,
        platform.gpu_name,
        platform.precision,
        session.engine_source,
    )
    return OpenedSession(session, "tensorrt", False, None)


def _degraded(cpu_session: Callable[[], ModelSession], problem: str) -> OpenedSession:
    reason = f"{problem}; running on the CPU (ONNX Runtime) instead"
    logger.error("%s", reason)
    return OpenedSession(cpu_session(), "cpu", True, reason)


BackendState = Literal["cpu", "tensorrt", "degraded"]


class SessionFactory:
    """Opens every model of a pipeline on one backend choice and remembers what each got.

    The runtime reports itself ``degraded`` when any model fell back from TensorRT to the CPU.
    """

    def __init__(
        self,
        backend: BackendChoice,
        engine_cache_dir: Path,
        threads: int | None = None,
        spinning: bool = DEFAULT_SPINNING,
        rewrite_prelu: bool = True,
    ) -> None:
        self.backend = backend
        self.engine_cache_dir = engine_cache_dir
        self.threads = threads
        self.spinning = spinning
        self.rewrite_prelu = rewrite_prelu
        self.opened: dict[str, OpenedSession] = {}

    def open(self, name: str, sha256: str, model_bytes: bytes) -> ModelSession:
        opened = open_session(
            model_bytes,
            sha256,
            backend=self.backend,
            engine_cache_dir=self.engine_cache_dir,
            threads=self.threads,
            model_name=name,
            spinning=self.spinning,
            rewrite_prelu=self.rewrite_prelu,
        )
        previous = self.opened.get(name)
        self.opened[name] = opened
        if previous is not None:
            _close(previous.session)
        return opened.session

    def gpu_memory(self) -> dict[str, int]:
        """Device memory (bytes) each model's TensorRT engine holds now; CPU models are absent."""
        return {
            name: opened.session.gpu_memory_bytes()
            for name, opened in self.opened.items()
            if isinstance(opened.session, tensorrt_backend.TensorRTSession)
        }

    def close(self) -> None:
        """Free every TensorRT engine opened here (the pipeline that used them is done)."""
        opened, self.opened = self.opened, {}
        for item in opened.values():
            _close(item.session)

    @property
    def state(self) -> BackendState:
        if any(o.degraded for o in self.opened.values()):
            return "degraded"
        if self.opened and all(o.backend_used == "tensorrt" for o in self.opened.values()):
            return "tensorrt"
        return "cpu"


def _close(session: ModelSession) -> None:
    if isinstance(session, tensorrt_backend.TensorRTSession):
        session.close()
