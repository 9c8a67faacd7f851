"""ONNX Runtime sessions tuned for a small CPU box."""

from __future__ import annotations

import os

import onnxruntime as ort


def cpu_threads() -> int:
    """Cores this process may use (respects CPU affinity set by systemd or taskset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def create_cpu_session(model_bytes: bytes, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session over already-verified model bytes (never re-read from disk)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or cpu_threads()
    # One request at a time per session; parallelism comes from intra-op threads.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # No arena: it keeps the largest tensors it ever served (a big photo's detector pyramid)
    # for the life of the service; measured, the service then stays 100+ MB above its idle
    # size, while plain malloc (trimmed after each job) returns to it at no measurable cost.
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = True
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    return ort.InferenceSession(
        model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
    )
