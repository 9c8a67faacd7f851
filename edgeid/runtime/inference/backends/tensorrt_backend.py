"""TensorRT sessions: verified ONNX bytes -> cached engine -> a ``ModelSession`` on an NVIDIA GPU.

``tensorrt`` (10.x) and ``pycuda`` are imported lazily, on the first ``probe()``: they are the
optional extra ``edgeid[tensorrt]`` and absent on CPU boxes, where everything here but the
profile planning reports TensorRT as unavailable instead of failing at import.

Engines are built from the ONNX bytes with one optimisation profile chosen from the model's input
shapes (``plan_profiles``):

* inputs whose only dynamic dimension is the batch (the embedder, MTCNN R-/O-Net) get batches
  1..``PROFILE_MAX_BATCH``; bigger batches are run in chunks;
* inputs with dynamic height and width (the MMOD pyramid canvas, MTCNN P-Net levels) get batch 1
  and sides from the smallest the network accepts up to the model's own maximum
  (``SPATIAL_PLANS``: what the pyramid of a 4K frame asks of it); a frame outside that range runs
  on the CPU fallback session instead.

Activation memory is allocated on demand where the TensorRT release allows it (the
``USER_MANAGED`` allocation strategy sized by ``update_device_memory_size_for_shapes``): a P-Net
level of a small frame does not hold the memory of the largest one. TensorRT's own log goes to
Python logging (``TrtLogRelay``) and its errors end up in the exceptions, and so in
``OpenedSession.reason``.

FP16 is used where the GPU has fast FP16; inputs and outputs stay in the model's own types. The
engine cache (``engine_cache``) keeps engines and the tactic timing cache across restarts.

A session runs one call at a time (a lock around one execution context): inputs are copied into
page-locked host buffers, then asynchronously to the device, the engine is enqueued with
``execute_async_v3`` on the session's CUDA stream, and outputs come back the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edgeid.runtime.errors import BadInputError, EdgeidError, ModelError
from edgeid.runtime.inference.backends.engine_cache import (
    EngineCache,
    EngineKey,
    EngineLoadError,
    EngineSource,
    Platform,
    Precision,
    open_cached_engine,
)
from edgeid.runtime.inference.backends.session import ModelSession

logger = logging.getLogger(__name__)

# The tensor-name API used here (set_input_shape, set_tensor_address, execute_async_v3) is
# TensorRT 10's; TensorRT 11 removes BuilderFlag.FP16, so other majors are refused, not guessed.
SUPPORTED_TRT_MAJOR = 10
# The GPU engines are built for and run on (CUDA_VISIBLE_DEVICES picks which one that is).
DEVICE_INDEX = 0
# Scratch memory the builder may give a layer's tactics; 1 GiB fits Jetson boards and is more
# than these convnets' best tactics use.
WORKSPACE_BYTES = 1 << 30
# Batch range of batch-only-dynamic models: 64 covers the embedder's micro-batches and MTCNN's
# crop batches at a bounded activation memory; larger batches are split into chunks.
PROFILE_MAX_BATCH = 64
# The batch TensorRT tunes tactics for: a typical multi-face frame.
PROFILE_OPT_BATCH = 8
# Height/width limits of spatially dynamic inputs. The MMOD canvas is a column of pyramid levels
# about twice as high as wide: 8192 x 4096 holds the canvas of a 4K frame (3862 x 7813) or of a
# 1080p frame upsampled once (3864 x 7814); bigger frames run on the CPU for that call.
DYNAMIC_MAX_HEIGHT = 8192
DYNAMIC_MAX_WIDTH = 4096
# The shape tactics are tuned for: the MMOD canvas of a 1366 x 768 frame.
DYNAMIC_OPT_HEIGHT = 2816
DYNAMIC_OPT_WIDTH = 1392
# MTCNN P-Net sees the pyramid levels themselves, the largest being the frame scaled by
# cell_size / min_face_size (12 / 20 in the shipped manifest): 1297 x 2305 for a 4K frame, in
# either orientation. Its profile stops there instead of at the MMOD canvas (8192 x 4096 would
# reserve about 0.7 GB of FP16 activations for one small network).
MAX_FRAME_SIDE = 3840
PNET_FIRST_SCALE = 12 / 20
PNET_MAX_SIDE = int(MAX_FRAME_SIDE * PNET_FIRST_SCALE + 1)
# Tuned for the first level of a 1080p frame.
PNET_OPT_HEIGHT = int(1080 * PNET_FIRST_SCALE + 1)
PNET_OPT_WIDTH = int(1920 * PNET_FIRST_SCALE + 1)
# Largest side tried when searching the smallest input a spatial network accepts.
MIN_SIDE_SEARCH_LIMIT = 256
# Bumped whenever plan_profiles changes what it plans: part of every engine's cache key.
PROFILE_PLAN_VERSION = 2
# The distributions NVIDIA publishes TensorRT's Python bindings in name their CUDA build.
_CUDA_VARIANT = re.compile(r"^tensorrt[-_.]cu(\d+)(?:[-_.](?:bindings|libs))?$")
# Compute capabilities with fast native FP16, for TensorRT releases without
# Builder.platform_has_fast_fp16 (deprecated in 10.5): sm_53, sm_60, sm_62 and sm_70 onwards.
FAST_FP16_LEGACY_CC = ((5, 3), (6, 0), (6, 2))
FAST_FP16_MIN_CC = (7, 0)

# TensorRT data types (by enum name) to numpy.
_NUMPY_DTYPES: dict[str, npt.DTypeLike] = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
}
# onnxruntime's input type names to numpy, for probing the smallest accepted input.
_ORT_DTYPES: dict[str, npt.DTypeLike] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}

Dims = tuple[int | str | None, ...]
Shape = tuple[int, ...]


@dataclass(frozen=True)
class SpatialPlan:
    """Height/width limits of a model with spatially dynamic inputs: (height, width) pairs."""

    opt: tuple[int, int]
    max: tuple[int, int]


DEFAULT_SPATIAL_PLAN = SpatialPlan(
    (DYNAMIC_OPT_HEIGHT, DYNAMIC_OPT_WIDTH), (DYNAMIC_MAX_HEIGHT, DYNAMIC_MAX_WIDTH)
)
# Models whose inputs never reach the MMOD canvas's size, by model name.
SPATIAL_PLANS: dict[str, SpatialPlan] = {
    "mtcnn_pnet": SpatialPlan((PNET_OPT_HEIGHT, PNET_OPT_WIDTH), (PNET_MAX_SIDE, PNET_MAX_SIDE)),
}


def spatial_plan(model_name: str | None) -> SpatialPlan:
    return SPATIAL_PLANS.get(model_name or "", DEFAULT_SPATIAL_PLAN)


class TensorRTUnavailableError(EdgeidError):
    """TensorRT, pycuda or a usable NVIDIA GPU is missing on this machine."""


class EngineBuildError(ModelError):
    """TensorRT could not turn the ONNX model into an engine."""


# --------------------------------------------------------------------------------------------
# Model inputs and optimisation profiles (pure logic: no GPU needed)


@dataclass(frozen=True)
class IOSpec:
    """A model input or output as ONNX declares it (satisfies ``session.TensorInfo``)."""

    name: str
    dims: Dims

    @property
    def shape(self) -> list[int | str | None]:
        return list(self.dims)

    @property
    def dynamic_axes(self) -> tuple[int, ...]:
        return tuple(i for i, d in enumerate(self.dims) if not isinstance(d, int) or d < 1)


@dataclass(frozen=True)
class InputProfile:
    """One input's shape range in the optimisation profile."""

    name: str
    min: Shape
    opt: Shape
    max: Shape


def read_onnx_io(model_bytes: bytes) -> tuple[list[IOSpec], list[IOSpec]]:
    """The graph's inputs (initialisers excluded) and outputs, in model order."""
    import onnx

    try:
        model = onnx.load_model_from_string(model_bytes)
    except Exception as exc:  # protobuf raises its own DecodeError
        raise ModelError(f"model bytes are not an ONNX model ({exc})") from exc
    initialisers = {t.name for t in model.graph.initializer}

    def spec(value: onnx.ValueInfoProto) -> IOSpec:
        dims: list[int | str | None] = []
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                dims.append(int(dim.dim_value))
            elif dim.HasField("dim_param"):
                dims.append(str(dim.dim_param))
            else:
                dims.append(None)
        return IOSpec(value.name, tuple(dims))

    inputs = [spec(v) for v in model.graph.input if v.name not in initialisers]
    return inputs, [spec(v) for v in model.graph.output]


def is_quantised(model_bytes: bytes) -> bool:
    """Whether the model is explicitly quantised (Q/DQ nodes: an INT8 twin), checked against
    what TensorRT takes: signed INT8 with zero points of 0 (symmetric). ONNX Runtime's CPU
    twins quantise activations to unsigned INT8 with offsets, which TensorRT cannot run, so
    they are refused here with the fix, not by a parser error deep in the build."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_model_from_string(model_bytes)
    constants = {t.name: t for t in model.graph.initializer}
    quantisers = [
        n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
    ]
    for node in quantisers:
        point = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        values = numpy_helper.to_array(point) if point is not None else np.zeros(1, np.int8)
        if values.dtype != np.int8 or np.any(values != 0):
            raise EngineBuildError(
                f"{node.op_type} {node.name or node.output[0]} quantises to {values.dtype} "
                "with offsets; TensorRT runs symmetric signed INT8 only. This INT8 twin is "
                "for ONNX Runtime on the CPU: set inference.precision to fp32 on a GPU box "
                "(TensorRT then uses FP16 where the GPU has it)"
            )
    return bool(quantisers)


def _spatial_axes(spec: IOSpec) -> tuple[int, int] | None:
    """The (height, width) axes of an input with dynamic spatial dims, None if only the batch
    is dynamic; any other pattern cannot be planned."""
    extra = tuple(a for a in spec.dynamic_axes if a != 0)
    if not extra:
        return None
    if len(extra) == 2 and extra[1] == extra[0] + 1:
        return extra[0], extra[1]
    raise EngineBuildError(
        f"input {spec.name} {spec.shape}: only a dynamic batch and/or a dynamic height and "
        "width can be given an optimisation profile"
    )


def _probe_shape(spec: IOSpec, side: int) -> Shape:
    axes = _spatial_axes(spec) or ()
    return tuple(
        d if isinstance(d, int) and d > 0 else (side if axis in axes else 1)
        for axis, d in enumerate(spec.dims)
    )


def min_spatial_side(model_bytes: bytes, inputs: Sequence[IOSpec]) -> int:
    """The smallest height = width for which the network yields a non-empty output.

    Found by running the model in onnxruntime on zeros (binary search): ONNX shape inference
    rounds negative convolution sizes towards zero and accepts inputs that have no output.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 4  # the too-small probes fail on purpose; do not log them
    session = ort.InferenceSession(
        model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
    )
    types = {i.name: str(i.type) for i in session.get_inputs()}

    def accepted(side: int) -> bool:
        feeds = {
            spec.name: np.zeros(_probe_shape(spec, side), dtype=_ORT_DTYPES[types[spec.name]])
            for spec in inputs
        }
        try:
            outputs = session.run(None, feeds)
        except Exception:  # onnxruntime's own exception types: this size is invalid
            return False
        return all(dim >= 1 for out in outputs for dim in np.shape(out))

    low, high = 1, MIN_SIDE_SEARCH_LIMIT
    if not accepted(high):
        raise EngineBuildError(
            f"the model accepts no input up to {high} x {high}; cannot plan a profile"
        )
    while low < high:
        middle = (low + high) // 2
        if accepted(middle):
            high = middle
        else:
            low = middle + 1
    return low


def plan_profiles(
    model_bytes: bytes,
    inputs: Sequence[IOSpec] | None = None,
    plan: SpatialPlan = DEFAULT_SPATIAL_PLAN,
) -> list[InputProfile]:
    """The optimisation profile for a model: one entry per input with a dynamic dimension."""
    if inputs is None:
        inputs = read_onnx_io(model_bytes)[0]
    spatial = {spec.name: _spatial_axes(spec) for spec in inputs}
    has_spatial = any(axes is not None for axes in spatial.values())
    min_side = min_spatial_side(model_bytes, inputs) if has_spatial else 1
    if min_side > min(plan.max):
        raise EngineBuildError(f"the model needs inputs of at least {min_side} px per side")
    # Spatially dynamic models run one frame at a time.
    batch = (1, 1, 1) if has_spatial else (1, PROFILE_OPT_BATCH, PROFILE_MAX_BATCH)
    (opt_h, opt_w), (max_h, max_w) = plan.opt, plan.max
    limits = {
        "height": (min_side, min(max_h, max(min_side, opt_h)), max_h),
        "width": (min_side, min(max_w, max(min_side, opt_w)), max_w),
    }
    profiles = []
    for spec in inputs:
        if not spec.dynamic_axes:
            continue
        axes = spatial[spec.name]
        ranges: list[tuple[int, int, int]] = []
        for axis, dim in enumerate(spec.dims):
            if isinstance(dim, int) and dim > 0:
                ranges.append((dim, dim, dim))
            elif axis == 0:
                ranges.append(batch)
            elif axes is not None and axis == axes[0]:
                ranges.append(limits["height"])
            else:
                ranges.append(limits["width"])
        profiles.append(
            InputProfile(
                spec.name,
                tuple(r[0] for r in ranges),
                tuple(r[1] for r in ranges),
                tuple(r[2] for r in ranges),
            )
        )
    return profiles


def build_settings_fingerprint(plan: SpatialPlan = DEFAULT_SPATIAL_PLAN) -> str:
    """What besides the model decides an engine's profiles and tactics (part of the cache key)."""
    settings = {
        "plan": PROFILE_PLAN_VERSION,
        "batch": [PROFILE_OPT_BATCH, PROFILE_MAX_BATCH],
        "dynamic_max": list(plan.max),
        "dynamic_opt": list(plan.opt),
        "workspace": WORKSPACE_BYTES,
    }
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def has_fast_fp16(compute_capability: tuple[int, int]) -> bool:
    return compute_capability in FAST_FP16_LEGACY_CC or compute_capability >= FAST_FP16_MIN_CC


# --------------------------------------------------------------------------------------------
# The GPU: TensorRT, pycuda and the CUDA context, set up once per process


@dataclass(frozen=True)
class GpuPlatform:
    """What ``probe()`` found: the TensorRT version and the GPU engines are built for."""

    trt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    fast_fp16: bool
    # TensorRT's CUDA build, "cu12" or "cu13" ("" when it cannot be told): see cuda_variant().
    cuda_variant: str = ""
    # Whether execution contexts allocate activation memory for the shapes of each call.
    on_demand_memory: bool = False

    @property
    def precision(self) -> Precision:
        return "fp16" if self.fast_fp16 else "fp32"

    @property
    def cache_platform(self) -> Platform:
        return Platform(self.trt_version, self.gpu_name, self.compute_capability, self.cuda_variant)

    def engine_key(self, model_sha256: str, model_name: str | None = None) -> EngineKey:
        return EngineKey(
            model_sha256=model_sha256,
            trt_version=self.trt_version,
            gpu_name=self.gpu_name,
            compute_capability=self.compute_capability,
            precision=self.precision,
            build_settings=build_settings_fingerprint(spatial_plan(model_name)),
            cuda_variant=self.cuda_variant,
        )


def cuda_variant(distribution_names: Iterable[str] | None = None) -> str:
    """TensorRT's CUDA build from the installed distributions' names (tensorrt-cu12,
    tensorrt_cu13_bindings, ...): "cu12", "cu13", "cu12+cu13" when both are installed, "" when
    none names one (JetPack's system ``tensorrt``, a bare ``tensorrt`` wheel)."""
    if distribution_names is None:
        distribution_names = (
            str(d.metadata["Name"] or "") for d in importlib.metadata.distributions()
        )
    found = set()
    for name in distribution_names:
        match = _CUDA_VARIANT.match(name.strip().lower())
        if match:
            found.add(int(match.group(1)))
    return "+".join(f"cu{major}" for major in sorted(found))


# --------------------------------------------------------------------------------------------
# TensorRT's log


_TRT_LEVELS = {
    "INTERNAL_ERROR": logging.CRITICAL,
    "ERROR": logging.ERROR,
    "WARNING": logging.WARNING,
    "INFO": logging.DEBUG,  # TensorRT's INFO is build chatter
}
# Errors kept per capture: enough to explain a failure, bounded for a message.
MAX_CAPTURED_ERRORS = 5
MAX_ERROR_CHARS = 500


class TrtLogRelay:
    """Where TensorRT's log messages go: Python logging (``edgeid.tensorrt``), the last error
    (for a reason), and the errors of the operation running in this thread (``capture``).

    Pure Python; ``_make_trt_logger`` wraps it in a ``tensorrt.ILogger``."""

    def __init__(self) -> None:
        self.logger = logging.getLogger("edgeid.tensorrt")
        self.last_error: str | None = None
        self._local = threading.local()

    def log(self, severity: object, message: str) -> None:
        name = str(getattr(severity, "name", severity)).rsplit(".", 1)[-1].upper()
        level = _TRT_LEVELS.get(name)
        if level is None:  # VERBOSE: per-layer detail, never wanted in the journal
            return
        text = " ".join(str(message).split())[:MAX_ERROR_CHARS]
        self.logger.log(level, "TensorRT: %s", text)
        if level >= logging.ERROR:
            self.last_error = text
            captured: list[str] | None = getattr(self._local, "errors", None)
            if captured is not None and len(captured) < MAX_CAPTURED_ERRORS:
                captured.append(text)

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[str]]:
        """The TensorRT errors logged by this thread inside the block (nested blocks share)."""
        outer: list[str] | None = getattr(self._local, "errors", None)
        errors: list[str] = outer if outer is not None else []
        self._local.errors = errors
        try:
            yield errors
        finally:
            self._local.errors = outer


def _said(errors: Sequence[str]) -> str:
    """TensorRT's own words for a failure message, or a pointer to the log."""
    if not errors:
        return "TensorRT logged no error"
    return "TensorRT said: " + " | ".join(errors)


def _make_trt_logger(trt: Any, relay: TrtLogRelay) -> Any:
    """A ``tensorrt.ILogger`` forwarding every message to ``relay`` (TensorRT's own Logger
    prints to stdout, which the journal keeps apart from the reason a model fell back)."""

    class ForwardingLogger(trt.ILogger):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            with contextlib.suppress(Exception):  # a logger must never raise into TensorRT
                relay.log(severity, msg)

    return ForwardingLogger()


class _Gpu:
    """The imported modules, the device's primary CUDA context and TensorRT's logger.

    TensorRT works in whichever CUDA context is current; every use pushes the device's primary
    context (the one the CUDA runtime itself uses) and pops it again, so any thread may call.
    """

    def __init__(
        self, trt: Any, cuda: Any, context: Any, trt_logger: Any, relay: TrtLogRelay
    ) -> None:
        self.trt = trt
        self.cuda = cuda
        self.context = context
        self.trt_logger = trt_logger
        self.relay = relay
        self.platform: GpuPlatform | None = None
        # Serialises the free-memory readings around engine loads (see TensorRTSession).
        self.memory_lock = threading.Lock()

    def free_bytes(self) -> int | None:
        """Free device memory now (call inside ``activated``); None where it cannot be read."""
        try:
            free, _total = self.cuda.mem_get_info()
            return int(free)
        except Exception:  # an optional figure; never a reason to fail
            return None

    @contextlib.contextmanager
    def activated(self) -> Iterator[None]:
        self.context.push()
        try:
            yield
        finally:
            self.cuda.Context.pop()


_gpu_lock = threading.Lock()
_gpu_state: _Gpu | str | None = None


def _import(name: str, purpose: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or OSError when a shared library is missing
        raise TensorRTUnavailableError(
            f"{purpose} cannot be imported ({type(exc).__name__}: {exc}); "
            "install edgeid[tensorrt] on a machine with an NVIDIA driver"
        ) from exc


def _open_gpu() -> _Gpu:
    trt = _import("tensorrt", "TensorRT (the tensorrt package)")
    version = str(getattr(trt, "__version__", "unknown"))
    if version.split(".")[0] != str(SUPPORTED_TRT_MAJOR):
        raise TensorRTUnavailableError(
            f"TensorRT {version} is installed; edgeid needs TensorRT {SUPPORTED_TRT_MAJOR}.x"
        )
    cuda = _import("pycuda.driver", "pycuda (needed to run TensorRT)")
    try:
        cuda.init()
        count = int(cuda.Device.count())
    except Exception as exc:  # pycuda.driver.Error and its subclasses
        raise TensorRTUnavailableError(
            f"TensorRT is installed but CUDA does not initialise ({exc}); "
            "no NVIDIA driver or GPU is usable"
        ) from exc
    if count < 1:
        raise TensorRTUnavailableError("TensorRT is installed but no CUDA GPU is visible")
    try:
        device = cuda.Device(DEVICE_INDEX)
        name = str(device.name())
        major, minor = (int(v) for v in device.compute_capability())
        relay = TrtLogRelay()
        trt_logger = _make_trt_logger(trt, relay)
        gpu = _Gpu(trt, cuda, device.retain_primary_context(), trt_logger, relay)
        with gpu.activated():
            builder = trt.Builder(gpu.trt_logger)
            fast = getattr(builder, "platform_has_fast_fp16", None)
            fast_fp16 = bool(fast) if fast is not None else has_fast_fp16((major, minor))
            del builder
    except Exception as exc:  # any CUDA or TensorRT failure means no usable GPU
        raise TensorRTUnavailableError(
            f"TensorRT cannot use GPU {DEVICE_INDEX} ({type(exc).__name__}: {exc})"
        ) from exc
    variant = cuda_variant()
    if not variant:  # JetPack's system TensorRT: the CUDA pycuda was built with is the same
        with contextlib.suppress(Exception):
            variant = f"cu{int(cuda.get_version()[0])}"
    gpu.platform = GpuPlatform(
        version, name, (major, minor), fast_fp16, variant, _supports_on_demand_memory(trt)
    )
    logger.info("TensorRT %s on %s", version, gpu.platform.cache_platform.describe())
    return gpu


def _supports_on_demand_memory(trt: Any) -> bool:
    """TensorRT >= 10.1: contexts without their own activation memory, sized per call."""
    strategies = getattr(trt, "ExecutionContextAllocationStrategy", None)
    context_type = getattr(trt, "IExecutionContext", None)
    return (
        strategies is not None
        and hasattr(strategies, "USER_MANAGED")
        and context_type is not None
        and hasattr(context_type, "update_device_memory_size_for_shapes")
        and hasattr(context_type, "set_device_memory")
    )


def _require_gpu() -> _Gpu:
    """The process's GPU state, set up on first use; the outcome is remembered either way."""
    global _gpu_state
    with _gpu_lock:
        if _gpu_state is None:
            try:
                _gpu_state = _open_gpu()
            except TensorRTUnavailableError as exc:
                _gpu_state = str(exc)
        state = _gpu_state
    if isinstance(state, str):
        raise TensorRTUnavailableError(state)
    return state


def device_memory() -> tuple[int, int] | None:
    """(free, total) bytes of the GPU's memory now; None without a usable GPU."""
    try:
        gpu = _require_gpu()
    except TensorRTUnavailableError:
        return None
    with gpu.activated():
        try:
            free, total = gpu.cuda.mem_get_info()
        except Exception:  # pycuda.driver.Error: the figure is optional
            return None
    return int(free), int(total)


def last_trt_error() -> str | None:
    """The last error TensorRT logged in this process (None before TensorRT was set up)."""
    state = _gpu_state
    return state.relay.last_error if isinstance(state, _Gpu) else None


def probe() -> GpuPlatform:
    """The GPU TensorRT would use; ``TensorRTUnavailableError`` says why there is none."""
    gpu = _require_gpu()
    assert gpu.platform is not None  # set before the state is published
    return gpu.platform


# --------------------------------------------------------------------------------------------
# Building


def _parser_errors(parser: Any) -> str:
    """The ONNX parser's errors: description and the node it failed on, where it says."""
    messages = []
    for index in range(int(parser.num_errors)):
        error = parser.get_error(index)
        text = str(error.desc()) if hasattr(error, "desc") else str(error)
        node = getattr(error, "node_name", None)
        where = str(node()) if callable(node) else ""
        messages.append(f"{text} (node {where})" if where else text)
    return "; ".join(messages) or "no error recorded"


def _build_engine(
    gpu: _Gpu,
    model_bytes: bytes,
    profiles: Sequence[InputProfile],
    precision: Precision,
    timing_cache: bytes | None,
    *,
    int8: bool = False,
) -> tuple[bytes, bytes | None]:
    """The serialised engine and the updated timing cache. ``int8``: the model carries its
    own Q/DQ scales (explicit quantisation), so TensorRT is allowed INT8 kernels; no
    calibrator or calibration cache is involved (TensorRT 10.1 deprecated them for this)."""
    trt = gpu.trt
    with gpu.relay.capture() as errors, gpu.activated():
        builder = trt.Builder(gpu.trt_logger)
        # TensorRT 10 networks are always explicit-batch (the EXPLICIT_BATCH flag is deprecated
        # and ignored), so no creation flags are needed.
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, gpu.trt_logger)
        if not parser.parse(model_bytes):
            raise EngineBuildError(
                f"TensorRT's ONNX parser rejected the model: {_parser_errors(parser)}"
            )
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        if int8:
            config.set_flag(trt.BuilderFlag.INT8)
        # TensorRT >= 10.10 sizes on-demand activation memory by the actual shapes only with
        # this preview feature; earlier releases size it by the profile's maximum.
        preview = getattr(
            getattr(trt, "PreviewFeature", None), "RUNTIME_ACTIVATION_RESIZE_10_10", None
        )
        if preview is not None:
            config.set_preview_feature(preview, True)
        if profiles:
            profile = builder.create_optimization_profile()
            for p in profiles:
                profile.set_shape(p.name, p.min, p.opt, p.max)
            if int(config.add_optimization_profile(profile)) < 0:
                raise EngineBuildError(
                    f"TensorRT rejected the optimisation profile {profiles} ({_said(errors)})"
                )
        _use_timing_cache(config, timing_cache)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineBuildError(f"TensorRT could not build the engine ({_said(errors)})")
        engine = bytes(serialized)
        updated = config.get_timing_cache()
        new_cache = bytes(updated.serialize()) if updated is not None else None
    if not engine:
        raise EngineBuildError("TensorRT built an empty engine")
    return engine, new_cache


def _use_timing_cache(config: Any, stored: bytes | None) -> None:
    """Start from the stored timing cache, else a fresh one; either is advisory, so a cache
    TensorRT refuses costs build time, never the build."""
    for data in [stored, b""] if stored else [b""]:
        try:
            cache = config.create_timing_cache(data)
        except Exception as exc:  # TensorRT's own error type: this cache is unusable
            logger.warning("TensorRT refused a timing cache (%s); not using it", exc)
            continue
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return
        logger.warning(
            "TensorRT refused the %s timing cache; %s",
            "stored" if data else "fresh",
            "starting a fresh one" if data else "building without one",
        )


# --------------------------------------------------------------------------------------------
# Running


class _Slot:
    """One I/O tensor: its type, profile range (inputs) and growable host and device buffers."""

    def __init__(
        self, name: str, dtype: np.dtype[Any], is_input: bool, low: Shape, high: Shape
    ) -> None:
        self.name = name
        self.dtype = dtype
        self.is_input = is_input
        self.low = low
        self.high = high
        self.capacity = 0
        self.host: Any = None  # page-locked numpy array (pycuda)
        self.device: Any = None  # pycuda DeviceAllocation

    def host_view(self, cuda: Any, shape: Shape) -> npt.NDArray[Any]:
        """A page-locked array of ``shape``, growing both buffers when needed."""
        count = max(1, int(np.prod(shape, dtype=np.int64)))
        if count > self.capacity:
            self.release()
            capacity = max(count, 2 * self.capacity)
            self.host = cuda.pagelocked_empty(capacity, self.dtype)
            self.device = cuda.mem_alloc(capacity * self.dtype.itemsize)
            self.capacity = capacity
        view: npt.NDArray[Any] = self.host[: int(np.prod(shape, dtype=np.int64))].reshape(shape)
        return view

    @property
    def device_bytes(self) -> int:
        return self.capacity * self.dtype.itemsize if self.device is not None else 0

    def release(self) -> None:
        if self.device is not None:
            self.device.free()
        self.host = self.device = None
        self.capacity = 0


class _Scratch:
    """Activation memory handed to a context created with the USER_MANAGED strategy: grown to
    what the shapes of a call need (``update_device_memory_size_for_shapes``), never shrunk."""

    def __init__(self) -> None:
        self.size = 0
        self.device: Any = None

    def fit(self, cuda: Any, context: Any) -> None:
        needed = int(context.update_device_memory_size_for_shapes())
        if self.device is not None and needed <= self.size:
            return
        self.release()
        size = max(needed, 256)  # TensorRT wants an address even when it needs nothing
        self.device = cuda.mem_alloc(size)
        self.size = size
        context.set_device_memory(int(self.device), size)

    def release(self) -> None:
        if self.device is not None:
            self.device.free()
        self.device = None
        self.size = 0


class TensorRTSession:
    """A deserialised engine behind onnxruntime's ``get_inputs``/``get_outputs``/``run``."""

    def __init__(
        self,
        gpu: _Gpu,
        engine_bytes: bytes,
        inputs: Sequence[IOSpec],
        outputs: Sequence[IOSpec],
        *,
        fallback: Callable[[], ModelSession] | None = None,
    ) -> None:
        """Raises ``EngineLoadError`` when the bytes are not a usable engine for this model;
        whatever was allocated by then is freed first."""
        self._gpu = gpu
        self._inputs = list(inputs)
        self._outputs = list(outputs)
        self._fallback_factory = fallback
        self._fallback: ModelSession | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._slots: dict[str, _Slot] = {}
        self._scratch: _Scratch | None = None
        # Device memory the engine and its context took when loaded (weights, and activations
        # unless they are allocated on demand); None where the driver did not say.
        self.resident_bytes: int | None = None
        # How the engine was obtained: set by open_tensorrt_session.
        self.engine_source: EngineSource = "built"
        try:
            self._load(engine_bytes)
        except BaseException:
            try:
                self._free()
            except Exception:  # keep the load's own error; this one is only logged
                logger.exception("freeing a TensorRT session that failed to load failed")
            raise

    def _load(self, engine_bytes: bytes) -> None:
        gpu, trt = self._gpu, self._gpu.trt
        on_demand = gpu.platform is not None and gpu.platform.on_demand_memory
        try:
            with gpu.relay.capture() as errors, gpu.activated(), gpu.memory_lock:
                free_before = gpu.free_bytes()
                self._runtime = trt.Runtime(gpu.trt_logger)
                self._engine = self._runtime.deserialize_cuda_engine(engine_bytes)
                if self._engine is None:
                    raise EngineLoadError(
                        f"TensorRT could not deserialise the engine ({_said(errors)})"
                    )
                if on_demand:
                    strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
                    self._context = self._engine.create_execution_context(strategy)
                    self._scratch = _Scratch()
                else:
                    self._context = self._engine.create_execution_context()
                if self._context is None:
                    raise EngineLoadError(
                        f"TensorRT could not create an execution context ({_said(errors)})"
                    )
                self._stream = gpu.cuda.Stream()
                self._slots = self._read_slots()
                free_after = gpu.free_bytes()
                if free_before is not None and free_after is not None:
                    self.resident_bytes = max(0, free_before - free_after)
        except EngineLoadError:
            raise
        except Exception as exc:  # TensorRT and pycuda raise their own types
            raise EngineLoadError(
                f"TensorRT engine unusable ({type(exc).__name__}: {exc})"
            ) from exc
        expected = {s.name for s in self._inputs} | {s.name for s in self._outputs}
        if set(self._slots) != expected:
            raise EngineLoadError(
                f"engine tensors {sorted(self._slots)} do not match the model's {sorted(expected)}"
            )

    def _free(self) -> None:
        """Release everything this session holds on the GPU, in the CUDA context (pycuda
        frees from other threads or after the context is gone warn and leak)."""
        with self._gpu.activated():
            for slot in self._slots.values():
                slot.release()
            if self._scratch is not None:
                self._scratch.release()
            # The context before its engine, the engine before its runtime.
            self._context = None
            self._engine = None
            self._runtime = None
            self._stream = None

    def gpu_memory_bytes(self) -> int:
        """Device memory this session holds now: the engine as loaded plus its buffers.

        Read without the session's lock (plain integers), so /healthz never waits for a long
        call; a figure read while a buffer grows is the old or the new size."""
        if self._closed:
            return 0
        buffers = sum(slot.device_bytes for slot in list(self._slots.values()))
        scratch = self._scratch.size if self._scratch is not None else 0
        return (self.resident_bytes or 0) + buffers + scratch

    def _read_slots(self) -> dict[str, _Slot]:
        trt, engine = self._gpu.trt, self._engine
        slots = {}
        for index in range(int(engine.num_io_tensors)):
            name = str(engine.get_tensor_name(index))
            trt_dtype = engine.get_tensor_dtype(name)
            dtype_name = str(getattr(trt_dtype, "name", trt_dtype)).rsplit(".", 1)[-1]
            dtype = np.dtype(_NUMPY_DTYPES.get(dtype_name) or trt.nptype(trt_dtype))
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            low: Shape = ()
            high: Shape = ()
            if is_input:
                shape = tuple(int(d) for d in engine.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    low_dims, _, high_dims = engine.get_tensor_profile_shape(name, 0)
                    low = tuple(int(d) for d in low_dims)
                    high = tuple(int(d) for d in high_dims)
                else:
                    low = high = shape
            slots[name] = _Slot(name, dtype, is_input, low, high)
        return slots

    # ModelSession -------------------------------------------------------------------------

    def get_inputs(self) -> list[IOSpec]:
        return list(self._inputs)

    def get_outputs(self) -> list[IOSpec]:
        return list(self._outputs)

    def run(
        self,
        output_names: Sequence[str] | None,
        input_feed: Mapping[str, npt.NDArray[Any]],
        /,
    ) -> list[npt.NDArray[Any]]:
        names = [o.name for o in self._outputs] if output_names is None else list(output_names)
        unknown = [n for n in names if n not in self._slots or self._slots[n].is_input]
        if unknown:
            raise BadInputError(f"unknown output(s) {unknown}; the model has {self._output_names}")
        feeds = self._checked_feeds(input_feed)
        mode = self._fit(feeds)
        if mode == "fallback":
            return self._fallback_session().run(names, input_feed)
        if mode == "empty":
            return self._empty_outputs(names, feeds)
        if mode == "chunks":
            step = min(s.high[0] for s in self._slots.values() if s.is_input)
            total = next(iter(feeds.values())).shape[0]
            parts = [
                self._execute(names, {k: v[start : start + step] for k, v in feeds.items()})
                for start in range(0, total, step)
            ]
            return [np.concatenate([p[i] for p in parts]) for i in range(len(names))]
        return self._execute(names, feeds)

    def close(self) -> None:
        """Free the GPU buffers and the engine; the session cannot run afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._free()

    # Internals ------------------------------------------------------------------------------

    @property
    def _output_names(self) -> list[str]:
        return [o.name for o in self._outputs]

    def _checked_feeds(self, input_feed: Mapping[str, npt.NDArray[Any]]) -> dict[str, Any]:
        expected = [s.name for s in self._inputs]
        if sorted(input_feed) != sorted(expected):
            raise BadInputError(f"inputs {sorted(input_feed)} given; the model takes {expected}")
        feeds: dict[str, npt.NDArray[Any]] = {}
        for name in expected:
            array = np.asarray(input_feed[name])
            slot = self._slots[name]
            if array.dtype != slot.dtype:
                raise BadInputError(
                    f"input {name} is {array.dtype.name}, the model takes {slot.dtype.name}"
                )
            if array.ndim != len(slot.low):
                raise BadInputError(
                    f"input {name} has shape {list(array.shape)}, the model takes "
                    f"{len(slot.low)} dimensions"
                )
            feeds[name] = np.ascontiguousarray(array)
        return feeds

    def _fit(
        self, feeds: Mapping[str, npt.NDArray[Any]]
    ) -> Literal["run", "chunks", "empty", "fallback"]:
        """How to run these inputs: directly, in batch chunks, as an empty batch, or elsewhere."""
        batch_only = True
        in_range = True
        batches = set()
        for name, array in feeds.items():
            slot = self._slots[name]
            batches.add(array.shape[0] if array.ndim else None)
            for axis, (size, low, high) in enumerate(
                zip(array.shape, slot.low, slot.high, strict=True)
            ):
                if low <= size <= high:
                    continue
                in_range = False
                if axis != 0:
                    if low == high:  # a fixed dimension: no backend can run this
                        raise BadInputError(
                            f"input {name} has shape {list(array.shape)}; the model takes "
                            f"{list(slot.high)} on axis {axis}"
                        )
                    batch_only = False
        if in_range:
            return "run"
        outputs_batched = all(
            o.dims and not (isinstance(o.dims[0], int) and o.dims[0] > 0) for o in self._outputs
        )
        if batch_only and len(batches) == 1 and outputs_batched:
            batch = batches.pop()
            if batch == 0:
                return "empty"
            if batch is not None and batch > 0:
                return "chunks"
        if self._fallback_factory is None:
            shapes = {name: list(a.shape) for name, a in feeds.items()}
            ranges = {
                s.name: (list(s.low), list(s.high)) for s in self._slots.values() if s.is_input
            }
            raise BadInputError(f"inputs {shapes} are outside the TensorRT engine's range {ranges}")
        return "fallback"

    def _fallback_session(self) -> ModelSession:
        with self._lock:
            if self._fallback is None:
                assert self._fallback_factory is not None
                logger.warning(
                    "input shape outside the TensorRT engine's profile; running such inputs on "
                    "the CPU (ONNX Runtime)"
                )
                self._fallback = self._fallback_factory()
            return self._fallback

    def _empty_outputs(
        self, names: Sequence[str], feeds: Mapping[str, npt.NDArray[Any]]
    ) -> list[npt.NDArray[Any]]:
        """A zero-row batch: the outputs' shapes for one row, with no rows."""
        with self._lock, self._gpu.activated():
            self._require_open()
            for name, array in feeds.items():
                self._set_shape(name, (1, *array.shape[1:]))
            return [
                np.zeros((0, *self._output_shape(name)[1:]), dtype=self._slots[name].dtype)
                for name in names
            ]

    def _require_open(self) -> None:
        if self._closed:
            raise ModelError("the TensorRT session is closed")

    def _set_shape(self, name: str, shape: Shape) -> None:
        if not self._context.set_input_shape(name, shape):
            raise BadInputError(f"TensorRT refused shape {list(shape)} for input {name}")

    def _set_address(self, name: str, slot: _Slot, errors: Sequence[str]) -> None:
        if not self._context.set_tensor_address(name, int(slot.device)):
            self._stream.synchronize()
            raise ModelError(f"TensorRT refused the buffer of tensor {name} ({_said(errors)})")

    def _output_shape(self, name: str) -> Shape:
        shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise ModelError(f"output {name} has a data-dependent shape {list(shape)}")
        return shape

    def _execute(
        self, names: Sequence[str], feeds: Mapping[str, npt.NDArray[Any]]
    ) -> list[npt.NDArray[Any]]:
        cuda = self._gpu.cuda
        with self._lock, self._gpu.relay.capture() as errors, self._gpu.activated():
            self._require_open()
            context, stream = self._context, self._stream
            for name, array in feeds.items():
                self._set_shape(name, array.shape)
            if self._scratch is not None:
                self._scratch.fit(cuda, context)
            for name, array in feeds.items():
                slot = self._slots[name]
                staged = slot.host_view(cuda, array.shape)
                np.copyto(staged, array)
                cuda.memcpy_htod_async(slot.device, staged, stream)
                self._set_address(name, slot, errors)
            results: dict[str, npt.NDArray[Any]] = {}
            for output in self._outputs:
                slot = self._slots[output.name]
                results[output.name] = slot.host_view(cuda, self._output_shape(output.name))
                self._set_address(output.name, slot, errors)
            if not context.execute_async_v3(stream.handle):
                stream.synchronize()  # the copies already queued still use the buffers
                raise ModelError(f"TensorRT failed to enqueue the engine ({_said(errors)})")
            for name in dict.fromkeys(names):
                cuda.memcpy_dtoh_async(results[name], self._slots[name].device, stream)
            stream.synchronize()
            # The staging buffers are reused by the next call: hand out copies.
            return [results[name].copy() for name in names]


def open_tensorrt_session(
    model_bytes: bytes,
    model_sha256: str,
    cache_dir: Path,
    *,
    fallback: Callable[[], ModelSession] | None = None,
    model_name: str | None = None,
) -> TensorRTSession:
    """A TensorRT session over verified model bytes, its engine from (or built into) the cache.

    Raises ``TensorRTUnavailableError`` without a usable GPU, ``EngineBuildError`` or
    ``EngineLoadError`` (after one rebuild) when no working engine can be made. ``fallback``
    makes the session for inputs outside the engine's profile (built on first need);
    ``model_name`` picks the model's spatial profile limits (``SPATIAL_PLANS``).
    """
    gpu = _require_gpu()
    assert gpu.platform is not None  # set before the state is published
    inputs, outputs = read_onnx_io(model_bytes)
    key = gpu.platform.engine_key(model_sha256, model_name)
    plan = spatial_plan(model_name)
    cache = EngineCache(cache_dir)

    def build() -> bytes:
        profiles = plan_profiles(model_bytes, inputs, plan)
        logger.info("building TensorRT engine for %s with profiles %s", key.describe(), profiles)
        timing = cache.load_timing_cache(key.platform)
        engine, new_timing = _build_engine(
            gpu, model_bytes, profiles, key.precision, timing, int8=is_quantised(model_bytes)
        )
        if new_timing:
            cache.store_timing_cache(key.platform, new_timing)
        return engine

    def load(data: bytes) -> TensorRTSession:
        return TensorRTSession(gpu, data, inputs, outputs, fallback=fallback)

    session, entry = open_cached_engine(cache, key, build, load)
    session.engine_source = entry.source
    return session
