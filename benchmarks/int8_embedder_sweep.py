"""How the INT8 embedder's recipe was chosen: quantisation variants scored as ``int8-embedder``.

The FP32 pipeline's chip of each LFW dev image's central face is embedded by the FP32 embedder
and by each variant; per variant: LFW accuracy and TAR at FMR 1e-3 (pairs protocol and all
1.2 M pairs, as ``benchmarks.int8_gates``), the cosine of every template to its FP32 twin, and
ms per face at batch 1 (best of ``ROUNDS`` rounds of ``TIMED`` chips, one thread).
Calibration sets: ``lfw100`` (the central-face chips of the first 100 LFW dev photos by path,
which the evaluation also scores) and ``scenes`` (every face of the scene photos, what the build
uses). Also a per-layer sensitivity pass (``--sensitivity``): each Conv/MatMul/Add quantised
alone, mean cosine loss of the template on the scene chips.

    python -m benchmarks.int8_embedder_sweep --data ../shared/data --models var/models
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from benchmarks.int8_gates import _all_pairs_tar, _distribution
from edgeid.models.quantise import (
    EMBEDDER,
    EMBEDDER_KEPT_FP32,
    collect_calibration,
    fold_affine,
    quantise_model,
)
from edgeid.runtime.evaluation.lfw import central_index, evaluate, image_path, parse_pairs
from edgeid.runtime.inference.embedder import Embedder
from edgeid.runtime.inference.image_decode import load_image
from edgeid.runtime.inference.manifest import read_verified_model
from edgeid.runtime.inference.onnx_backend import create_cpu_session
from edgeid.runtime.inference.pipeline import FacePipeline

ROUNDS = 5
TIMED = 60
FIRST_LAST = list(EMBEDDER_KEPT_FP32)
# name: (calibration set, fold the affine, nodes kept FP32, method, op types)
VARIANTS: dict[str, tuple[str, bool, list[str], str, list[str] | None]] = {
    "first round (as built before)": ("lfw100", False, [], "MinMax", None),
    "first and last layer FP32": ("lfw100", False, FIRST_LAST, "MinMax", None),
    "affine folded": ("lfw100", True, [], "MinMax", None),
    "Conv and MatMul only": ("lfw100", False, [], "MinMax", ["Conv", "MatMul"]),
    "affine folded, Conv and MatMul only": ("lfw100", True, [], "MinMax", ["Conv", "MatMul"]),
    "Percentile ranges": ("lfw100", False, [], "Percentile", None),
    "Entropy ranges": ("lfw100", False, [], "Entropy", None),
    "scenes": ("scenes", False, [], "MinMax", None),
    "scenes, first and last layer FP32": ("scenes", False, FIRST_LAST, "MinMax", None),
    "scenes, affine folded": ("scenes", True, [], "MinMax", None),
    "scenes + mirrored, affine folded": ("scenes+flip", True, [], "MinMax", None),
    "scenes, affine folded, first and last FP32 (built)": (
        "scenes",
        True,
        FIRST_LAST,
        "MinMax",
        None,
    ),
    "scenes, affine folded, four most sensitive FP32": (
        "scenes",
        True,
        [*FIRST_LAST, "l010_add_prev", "l005_con"],
        "MinMax",
        None,
    ),
}

Chips = npt.NDArray[np.uint8]


def lfw_chips(data_dir: Path, models_dir: Path) -> tuple[list[Path], Chips]:
    """The FP32 pipeline's chip of every LFW dev image's central face, by image."""
    pairs = parse_pairs(data_dir / "lfw-dev" / "pairsDevTest.txt")
    keys = sorted({k for p in pairs.all_pairs() for k in (p.first, p.second)})
    pipeline = FacePipeline.load(models_dir, "mtcnn", threads=1, backend="cpu", with_embedder=False)
    paths, chips = [], []
    for key in keys:
        path = image_path(data_dir / "lfw-dev" / "images", *key)
        image = load_image(path)
        faces = pipeline.detect(image)
        boxes = [(f.box.x0, f.box.y0, f.box.x1, f.box.y1) for f in faces]
        face = faces[central_index(boxes, image.shape[1], image.shape[0])]
        paths.append(path)
        chips.append(pipeline.chips(image, [face])[0])
    return paths, np.stack(chips)


def embed(model: bytes, chips: Chips) -> npt.NDArray[np.float32]:
    embedder = Embedder(create_cpu_session(model, 1), "sweep")
    return np.concatenate(
        [embedder.embed(list(chips[i : i + 16])) for i in range(0, len(chips), 16)]
    )


def ms_per_face(model: bytes, chips: Chips) -> float:
    embedder = Embedder(create_cpu_session(model, 1), "sweep")
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for chip in chips[:TIMED]:
            embedder.embed([chip])
        best = min(best, (time.perf_counter() - started) / TIMED * 1000)
    return round(best, 2)


def quantised(fp32: bytes, feeds: Chips, variant: tuple[Any, ...]) -> bytes:
    _, fold, kept, method, op_types = variant
    with tempfile.TemporaryDirectory() as work:
        dest = Path(work) / "int8.onnx"
        source = fold_affine(fp32) if fold else fp32
        # The histogram calibrators print their progress: keep stdout for the JSON.
        with contextlib.redirect_stdout(sys.stderr):
            quantise_model(
                source,
                [{"chips": c[np.newaxis]} for c in feeds],
                dest,
                kept_fp32=kept,
                method=method,
                op_types=op_types,
            )
        return dest.read_bytes()


def sensitivity(fp32: bytes, scenes: Chips) -> list[dict[str, Any]]:
    """Each Conv/MatMul/Add of the folded model quantised alone: mean and max cosine loss."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from edgeid.models.quantise import _Reader

    folded = fold_affine(fp32)
    reference = embed(fp32, scenes)
    nodes = [
        n.name
        for n in onnx.load_from_string(folded).graph.node
        if n.op_type in ("Conv", "MatMul", "Add")
    ]
    rows = []
    for node in nodes:
        with tempfile.TemporaryDirectory() as work:
            source, dest = Path(work) / "f.onnx", Path(work) / "q.onnx"
            source.write_bytes(folded)

            class Reader(_Reader, CalibrationDataReader):  # type: ignore[misc]
                pass

            quantize_static(
                source,
                dest,
                Reader([{"chips": c[np.newaxis]} for c in scenes]),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=[node],
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )
            loss = 1 - np.sum(embed(dest.read_bytes(), scenes) * reference, axis=1)
        rows.append({"node": node, "mean_loss": float(loss.mean()), "max_loss": float(loss.max())})
    return sorted(rows, key=lambda r: -r["mean_loss"])


def run(
    data_dir: Path, models_dir: Path, say: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    _, fp32 = read_verified_model(models_dir, EMBEDDER)
    paths, chips = lfw_chips(data_dir, models_dir)
    scenes = np.concatenate(
        [f["chips"] for f in collect_calibration(models_dir, data_dir, [EMBEDDER]).feeds[EMBEDDER]]
    )
    sets = {
        "lfw100": chips[np.argsort([str(p) for p in paths])[:100]],
        "scenes": scenes,
        "scenes+flip": np.concatenate([scenes, scenes[:, :, ::-1]]),
    }
    pairs = parse_pairs(data_dir / "lfw-dev" / "pairsDevTest.txt")
    images_dir = data_dir / "lfw-dev" / "images"
    reference = embed(fp32, chips)

    def score(vectors: npt.NDArray[np.float32]) -> dict[str, Any]:
        templates = dict(zip(paths, vectors, strict=True))
        report = evaluate(pairs, images_dir, templates.__getitem__).to_json()
        cosine = _distribution(list(np.sum(vectors * reference, axis=1)))
        return {
            "accuracy": report["accuracy"],
            "tar_at_fmr_1e-3": report["tar_at_far_1e-3"],
            "all_pairs_tar_at_fmr_1e-3": _all_pairs_tar(templates)["tar_at_fmr_1e-3"],
            "cosine_min": cosine.get("min"),
            "cosine_below_0.99": cosine.get("below_gate"),
        }

    rows = [{"variant": "FP32", **score(reference), "ms_per_face": ms_per_face(fp32, chips)}]
    for name, variant in VARIANTS.items():
        model = quantised(fp32, sets[variant[0]], variant)
        rows.append(
            {
                "variant": name,
                "calibration": variant[0],
                **score(embed(model, chips)),
                "ms_per_face": ms_per_face(model, chips),
            }
        )
        say(json.dumps(rows[-1]))
    return {"benchmark": "INT8 embedder recipes, as int8-embedder, LFW dev", "variants": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--sensitivity", action="store_true", help="the per-layer pass only")
    args = parser.parse_args()
    if args.sensitivity:
        _, fp32 = read_verified_model(args.models, EMBEDDER)
        feeds = collect_calibration(args.models, args.data, [EMBEDDER]).feeds[EMBEDDER]
        report: dict[str, Any] = {
            "sensitivity": sensitivity(fp32, np.concatenate([f["chips"] for f in feeds]))
        }
    else:
        report = run(args.data, args.models, lambda line: print(line, file=sys.stderr))
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
