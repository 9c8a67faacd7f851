"""LFW dev verification accuracy: edgeid's ONNX pipeline beside dlib's own, in one run.

Both pipelines run the same source models (MMOD detector, 5-point shape predictor, ResNet
embedder) on the same images and are scored by the same protocol code, so the two accuracies and
the ratio of their speeds are directly comparable. dlib is a test-only reference (dlib-bin).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgeid.runtime.evaluation.lfw import (
    LfwReport,
    central_face_embedder,
    central_index,
    evaluate,
    parse_pairs,
)
from edgeid.runtime.inference.pipeline import FacePipeline
from edgeid.runtime.inference.types import FloatArray


def _dlib_embedder(weights: Path, upsample: int) -> Any:
    import dlib

    detector = dlib.cnn_face_detection_model_v1(str(weights / "mmod_human_face_detector.dat"))
    predictor = dlib.shape_predictor(str(weights / "shape_predictor_5_face_landmarks.dat"))
    facerec = dlib.face_recognition_model_v1(
        str(weights / "dlib_face_recognition_resnet_model_v1.dat")
    )

    def embed(path: Path) -> FloatArray | None:
        image = dlib.load_rgb_image(str(path))
        dets = detector(image, upsample)
        if len(dets) == 0:
            return None
        rects = [d.rect for d in dets]
        boxes = [(r.left(), r.top(), r.right() + 1, r.bottom() + 1) for r in rects]
        rect = rects[central_index(boxes, image.shape[1], image.shape[0])]
        vec = np.asarray(facerec.compute_face_descriptor(image, predictor(image, rect)), np.float32)
        return vec / np.linalg.norm(vec)

    return embed


def _summary(report: LfwReport) -> dict[str, object]:
    keep = ("accuracy", "accuracy_std", "pairs", "images", "no_face", "ms_per_image",
            "tar_at_far_1e-3", "fmr_resolution")  # fmt: skip
    full = report.to_json()
    return {k: full[k] for k in keep}


def run(data: Path, models_dir: Path, weights: Path, upsample: int = 0) -> dict[str, object]:
    pairs = parse_pairs(data / "lfw-dev" / "pairsDevTest.txt")
    images = data / "lfw-dev" / "images"
    pipeline = FacePipeline.load(models_dir, "mmod", upsample=upsample)
    ours = evaluate(pairs, images, central_face_embedder(pipeline))
    reference = evaluate(pairs, images, _dlib_embedder(weights, upsample))
    return {
        "benchmark": "lfw-dev verification (pairsDevTest.txt), MMOD + sp5 + ResNet",
        "edgeid": _summary(ours),
        "dlib": _summary(reference),
        "accuracy_delta": round(ours.accuracy - reference.accuracy, 4),
        "no_face_delta": ours.no_face - reference.no_face,
        "ratio_vs_baseline": round(reference.ms_per_image / ours.ms_per_image, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--upsample", type=int, default=0)
    args = parser.parse_args()
    import face_recognition_models

    weights = Path(face_recognition_models.__file__).parent / "models"
    result = run(args.data, args.models, weights, args.upsample)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
