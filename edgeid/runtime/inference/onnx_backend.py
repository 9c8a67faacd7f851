"""ONNX Runtime sessions tuned for a small CPU box."""

from __future__ import annotations

import os

import onnxruntime as ort

from edgeid.runtime.inference.prelu_split import split_prelu


def cpu_threads() -> int:
    """Cores this process may use (respects CPU affinity set by systemd or taskset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# The session config key that lets intra-op threads busy-wait after each run (ORT's default: on).
SPINNING_KEY = "session.intra_op.allow_spinning"
# Measured (README "Thread configuration"): with five sessions on two cores the idle sessions'
# spinning threads steal the CPU from the working one, so spinning is off by default.
DEFAULT_SPINNING = False


_GLOBAL_POOL = False


def use_global_thread_pool(threads: int | None = None) -> None:
    """Every later session shares one process-wide intra-op pool (call before the first
    session: ONNX Runtime fixes its environment then). Measured against per-session pools
    in benchmarks/thread_bench.py."""
    global _GLOBAL_POOL
    from onnxruntime.capi import _pybind_state

    _pybind_state.set_global_thread_pool_sizes(threads or cpu_threads(), 1)
    _GLOBAL_POOL = True


def create_cpu_session(
    model_bytes: bytes,
    threads: int | None = None,
    *,
    spinning: bool = DEFAULT_SPINNING,
    rewrite_prelu: bool = True,
) -> ort.InferenceSession:
    """A CPU session over already-verified model bytes (never re-read from disk).

    ``spinning``: whether intra-op threads busy-wait for work after a run (``inference.spinning``
    in edgeid.toml). ``rewrite_prelu``: run PRelu nodes as the exact Relu/Sub/Mul/Add form that
    ONNX Runtime's CPU runs faster (``prelu_split``; False only to measure the difference).
    """
    if rewrite_prelu:
        model_bytes = split_prelu(model_bytes)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if _GLOBAL_POOL:
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = threads or cpu_threads()
    # One request at a time per session; parallelism comes from intra-op threads.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # No arena: it keeps the largest tensors it ever served (a big photo's detector pyramid)
    # for the life of the service; measured, the service then stays 100+ MB above its idle
    # size, while plain malloc (trimmed after each job) returns to it at no measurable cost.
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = True
    options.add_session_config_entry(SPINNING_KEY, "1" if spinning else "0")
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    return ort.InferenceSession(
        model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
    )
