"""Which detector should be the default? Both measured on the shared data in one run.

- scenes/dlib-faces: recall and precision against the annotated boxes (IoU >= 0.5), ms/image;
- lfw-dev: verification accuracy of the full pipeline with each detector, and images where no
  face was found.
MTCNN boxes are compared in dlib framing (``dlib_style_box``), the framing of the annotations.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgeid.runtime.evaluation.detection import read_imglab, score
from edgeid.runtime.evaluation.lfw import central_face_embedder, evaluate, parse_pairs
from edgeid.runtime.inference.image_decode import load_image
from edgeid.runtime.inference.mtcnn_detector import dlib_style_box
from edgeid.runtime.inference.pipeline import DETECTOR_NAMES, DetectorName, FacePipeline
from edgeid.runtime.inference.types import Box


def scenes(
    models_dir: Path, data: Path, detector: DetectorName, upsample: int
) -> dict[str, object]:
    folder = data / "scenes" / "dlib-faces"
    truth = read_imglab(folder / "training.xml", folder / "testing.xml")
    pipeline = FacePipeline.load(models_dir, detector, upsample=upsample, with_embedder=False)
    found: dict[str, list[Box]] = {}
    started = time.perf_counter()
    for name in truth:
        detections = pipeline.detector.detect(load_image(folder / name))
        boxes = [d.box for d in detections]
        found[name] = [dlib_style_box(b) for b in boxes] if detector == "mtcnn" else boxes
    elapsed = time.perf_counter() - started
    return score(truth, found).to_json() | {"ms_per_image": round(1000 * elapsed / len(truth), 1)}


def lfw(models_dir: Path, data: Path, detector: DetectorName, upsample: int) -> dict[str, object]:
    pipeline = FacePipeline.load(models_dir, detector, upsample=upsample)

    pairs = parse_pairs(data / "lfw-dev" / "pairsDevTest.txt")
    report = evaluate(pairs, data / "lfw-dev" / "images", central_face_embedder(pipeline)).to_json()
    keep = ("accuracy", "accuracy_std", "pairs", "no_face", "images", "ms_per_image")
    return {k: report[k] for k in keep}


def run(models_dir: Path, data: Path) -> dict[str, object]:
    settings: list[tuple[DetectorName, int]] = [("mmod", 0), ("mmod", 1), ("mtcnn", 0)]
    assert {d for d, _ in settings} == set(DETECTOR_NAMES)
    results: dict[str, object] = {}
    for detector, upsample in settings:
        label = f"{detector}" + (f"-upsample{upsample}" if detector == "mmod" else "")
        results[label] = {
            "dlib_faces": scenes(models_dir, data, detector, upsample),
            "lfw_dev": lfw(models_dir, data, detector, upsample) if upsample == 0 else None,
        }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True)
    args = parser.parse_args()
    json.dump(run(args.models, args.data), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
