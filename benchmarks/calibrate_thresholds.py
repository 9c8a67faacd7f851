"""Regenerate the shipped open-set calibration: ``runtime/gallery/calibration/<model>.json``.

Embeds every LFW dev image once with the product pipeline (default detector, the most central
face, no flip TTA), scores every pair of images by cosine similarity, and takes

- the **non-mated** distribution: every pair of images of two different people (with the 1,549
  images of 963 people, about 1.2 million comparisons);
- the **mated** distribution: every pair of images of the same person (about a thousand).

The threshold for a false-match rate ``fmr`` is the lowest score at which at most
``floor(fmr * comparisons)`` non-mated comparisons score at or above it (as
``runtime.evaluation.lfw.tar_at_fmr``). These pairs share images (each image is in about 1,500
of them), so they are not independent draws: the tail thresholds (1e-5 rests on about a dozen
pairs) are estimates, and the JSON says how many non-mated pairs lie above each one.

    python -m benchmarks.calibrate_thresholds --data ../shared/data --models var/models
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from runtime.evaluation.lfw import central_face_embedder
from runtime.gallery.thresholds import CALIBRATED_FMRS, calibration_path
from runtime.inference.pipeline import DEFAULT_DETECTOR, EMBEDDER_MODEL, FacePipeline

logger = logging.getLogger(__name__)

# Percentiles reported for both distributions: enough for the UI to draw them, small enough to
# read in the JSON.
PERCENTILES = (0.1, 1, 5, 25, 50, 75, 95, 99, 99.9)
# Digits kept for scores in the JSON: float32 cosines carry about seven.
SCORE_DIGITS = 6


@dataclass(frozen=True)
class LfwEmbeddings:
    """Unit-length templates of LFW dev images (rows), the person of each row, its image path."""

    vectors: npt.NDArray[np.float32]
    people: list[str]
    paths: list[str]
    no_face: int
    seconds: float


def lfw_dev_images(data: Path) -> list[Path]:
    return sorted((data / "lfw-dev" / "images").glob("*/*.jpg"))


def embed_lfw_dev(data: Path, models_dir: Path, limit: int | None = None) -> LfwEmbeddings:
    """Embed the LFW dev images (all, or the first ``limit`` by path); images without a face are
    skipped and counted. Public research images: never point this at case data."""
    embed = central_face_embedder(FacePipeline.load(models_dir, DEFAULT_DETECTOR))
    images = lfw_dev_images(data)[:limit]
    vectors: list[npt.NDArray[np.float32]] = []
    people: list[str] = []
    paths: list[str] = []
    no_face = 0
    started = time.perf_counter()
    for done, path in enumerate(images, start=1):
        vector = embed(path)
        if vector is None:
            no_face += 1
            continue
        vectors.append(np.asarray(vector, dtype=np.float32))
        people.append(path.parent.name)
        paths.append(f"{path.parent.name}/{path.name}")
        if done % 200 == 0:
            logger.info("embedded %s of %s images", done, len(images))
    return LfwEmbeddings(np.stack(vectors), people, paths, no_face, time.perf_counter() - started)


def pair_scores(
    vectors: npt.NDArray[np.float32], people: list[str]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(mated, non-mated) cosine scores over every unordered pair of rows."""
    unit = vectors.astype(np.float64)
    scores = unit @ unit.T
    ids = np.unique(np.asarray(people), return_inverse=True)[1]
    upper = np.triu_indices(len(ids), k=1)
    same = ids[upper[0]] == ids[upper[1]]
    flat = scores[upper]
    return flat[same], flat[~same]


def threshold_at(non_mated_desc: npt.NDArray[np.float64], fmr: float) -> float:
    """Lowest score admitting at most floor(fmr * n) non-mated comparisons (scores >= it)."""
    allowed = int(np.floor(fmr * len(non_mated_desc)))
    return float(non_mated_desc[allowed] + 1e-9)


def _stats(scores: npt.NDArray[np.float64]) -> dict[str, object]:
    return {
        "comparisons": len(scores),
        "mean": round(float(scores.mean()), SCORE_DIGITS),
        "std": round(float(scores.std()), SCORE_DIGITS),
        "min": round(float(scores.min()), SCORE_DIGITS),
        "max": round(float(scores.max()), SCORE_DIGITS),
        "percentiles": {
            str(p): round(float(np.percentile(scores, p)), SCORE_DIGITS) for p in PERCENTILES
        },
    }


def calibrate(embeddings: LfwEmbeddings, model_id: str, detector: str) -> dict[str, object]:
    mated, non_mated = pair_scores(embeddings.vectors, embeddings.people)
    descending = np.sort(non_mated)[::-1]
    thresholds = []
    for fmr in CALIBRATED_FMRS:
        score = threshold_at(descending, fmr)
        thresholds.append(
            {
                "fmr": fmr,
                # Rounded up, so that the stored threshold never admits more than fmr.
                "score": math.ceil(score * 10**SCORE_DIGITS) / 10**SCORE_DIGITS,
                "non_mated_at_or_above": int(np.sum(non_mated >= score)),
                "tar": round(float(np.mean(mated >= score)), 4),
            }
        )
    people = len(set(embeddings.people))
    return {
        "model_id": model_id,
        "score": "cosine similarity of the L2-normalised templates (1 = identical)",
        "generated": datetime.date.today().isoformat(),
        "generated_by": "python -m benchmarks.calibrate_thresholds",
        "method": (
            "threshold(fmr) = the lowest score at which at most floor(fmr * comparisons) "
            "non-mated comparisons score at or above it; tar = share of mated comparisons at "
            "or above it"
        ),
        "data": {
            "set": "LFW View 1 development test images (the 1,549 images pairsDevTest.txt names)",
            "images": len(embeddings.people),
            "people": people,
            "no_face": embeddings.no_face,
            "detector": detector,
            "face": "the most central face of each image",
            "flip_tta": False,
        },
        "non_mated": _stats(non_mated),
        "mated": _stats(mated) | {"people": len(set(_repeated(embeddings.people)))},
        "thresholds": thresholds,
        "caveats": [
            "Pairs share images (each image takes part in about 1,500 non-mated pairs), so they "
            "are not independent; thresholds at 1e-5 rest on about a dozen pairs.",
            "LFW is adult, mostly frontal, well-lit press photography: operational FMR on "
            "children, profile or low-quality faces is higher at the same threshold.",
            "In 1:N search each probe meets every enrolled face: the chance that a person who is "
            "not enrolled gets a candidate above threshold (FPIR) grows with gallery size, about "
            "gallery_size * fmr while that is small.",
        ],
    }


def _repeated(people: list[str]) -> list[str]:
    counts: dict[str, int] = {}
    for person in people:
        counts[person] = counts.get(person, 0) + 1
    return [p for p, n in counts.items() if n > 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=calibration_path(EMBEDDER_MODEL))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not (args.data / "lfw-dev" / "images").is_dir():
        print(f"calibration data not found at {args.data}/lfw-dev/images", file=sys.stderr)
        return 2
    embeddings = embed_lfw_dev(args.data, args.models)
    result = calibrate(embeddings, EMBEDDER_MODEL, DEFAULT_DETECTOR)
    if args.out.exists():
        # Age-band reliability is measured on data that does not ship here: keep it.
        previous = json.loads(args.out.read_text(encoding="utf-8"))
        result["age_bands"] = previous.get("age_bands", {})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "wrote %s (%s images embedded in %.0f s)",
        args.out,
        len(embeddings.people),
        embeddings.seconds,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
