"""Model precision on the CPU: the FP32 models, or their statically quantised INT8 twins.

``edgeid models build --precision int8`` writes ``<model>_int8`` beside each quantised model
(the MTCNN nets and the shipped embedder; QDQ, per-channel weights). The INT8 embedder is its
own model id, so its open-set thresholds are measured on their own
(``edgeid/runtime/gallery/calibration/dlib_resnet_v1_int8.json``).

- ``fp32``: every model FP32;
- ``int8-embedder``: the INT8 embedder behind the FP32 MTCNN (passes the issue 17 gates; the
  INT8 MTCNN nets are not faster and move landmarks);
- ``int8``: the INT8 MTCNN nets and the INT8 embedder (passes the gates with the rebuilt
  embedder but is not faster than FP32; README "INT8 on the CPU").

The twins quantise activations to unsigned INT8 with offsets, which TensorRT cannot run: on a
GPU box the TensorRT backend refuses them (``is_quantised``) and those models run on the CPU.
"""

from __future__ import annotations

from typing import Literal, get_args

Precision = Literal["fp32", "int8", "int8-embedder"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
# Measured on LFW dev (README "INT8 on the CPU"): see the gates there before changing this.
DEFAULT_PRECISION: Precision = "fp32"
INT8_SUFFIX = "_int8"
# The models that have an INT8 twin (the MMOD detector and the landmark trees do not).
QUANTISED_MODELS = ("mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet", "dlib_resnet_v1")
# Which twins each precision runs.
RUNS_INT8: dict[Precision, tuple[str, ...]] = {
    "fp32": (),
    "int8": QUANTISED_MODELS,
    "int8-embedder": ("dlib_resnet_v1",),
}


def precision_model(name: str, precision: Precision) -> str:
    """The model name to load for ``name`` at ``precision`` (itself where it has no twin)."""
    if name in RUNS_INT8[precision]:
        return name + INT8_SUFFIX
    return name
