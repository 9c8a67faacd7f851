"""Regenerate the shipped open-set calibration: ``edgeid/runtime/gallery/calibration/<model>.json``.

Embeds every LFW dev image once with the product pipeline (default detector, the most central
face, no flip TTA) and measures the **adult** band with ``edgeid.runtime.evaluation.calibration``:

- the **non-mated** distribution: every pair of images of two different people (with the 1,549
  images of 963 people, about 1.2 million comparisons);
- the **mated** distribution: every pair of images of the same person (about a thousand).

The threshold for a false-match rate ``fmr`` is the lowest score at which at most
``floor(fmr * comparisons)`` non-mated comparisons score at or above it (as
``edgeid.runtime.evaluation.lfw.tar_at_fmr``). These pairs share images (each image is in about
1,500
of them), so they are not independent draws: the tail thresholds (1e-5 rests on about a dozen
pairs) are estimates, and the JSON says how many non-mated pairs lie above each one.

LFW holds no children. The child and teen bands of the shipped file were measured outside this
product on data that cannot ship; they are kept from the existing file (its provenance says
so), and a file in the old single-band format is replaced by the adult band alone, with a
warning.

    python -m benchmarks.calibrate_thresholds --data ../shared/data --models var/models
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgeid.runtime.evaluation.calibration import (
    LabelledTemplates,
    Source,
    calibrate_bands,
    calibration_data,
)
from edgeid.runtime.evaluation.lfw import central_face_embedder
from edgeid.runtime.gallery.age_bands import MeasuredBand
from edgeid.runtime.gallery.thresholds import (
    BandData,
    CalibrationData,
    CalibrationError,
    calibration_path,
    parse_calibration,
)
from edgeid.runtime.inference.pipeline import DEFAULT_DETECTOR, EMBEDDER_MODEL, FacePipeline
from edgeid.runtime.inference.precision import PRECISIONS, Precision, precision_model

logger = logging.getLogger(__name__)


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


def embed_lfw_dev(
    data: Path, models_dir: Path, limit: int | None = None, precision: Precision = "fp32"
) -> LfwEmbeddings:
    """Embed the LFW dev images (all, or the first ``limit`` by path); images without a face are
    skipped and counted. Public research images: never point this at case data."""
    embed = central_face_embedder(
        FacePipeline.load(models_dir, DEFAULT_DETECTOR, backend="cpu", precision=precision)
    )
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


LFW_SET = "LFW View 1 development test images (the 1,549 images pairsDevTest.txt names)"
ADULT_CAVEATS = [
    "Pairs share images (each image takes part in about 1,500 non-mated pairs), so they are "
    "not independent; thresholds at 1e-5 rest on about a dozen pairs.",
    "LFW is adult, mostly frontal, well-lit press photography: operational FMR on profile or "
    "low-quality faces is higher at the same threshold.",
]
CAVEATS = [
    "In 1:N search each probe meets every enrolled face: the chance that a person who is not "
    "enrolled gets a candidate above threshold (FPIR) grows with gallery size, about "
    "gallery_size * fmr while that is small.",
    "The age band is the probe's, as the investigator states it; a probe whose age is not "
    "stated is searched with the strictest band the file holds.",
]


def adult_band(embeddings: LfwEmbeddings, detector: str, precision: Precision = "fp32") -> BandData:
    """The adult band, measured on LFW dev (press photographs of adults)."""
    source = Source(
        data_set=LFW_SET,
        measured_by="python -m benchmarks.calibrate_thresholds (this repository)",
        date=datetime.date.today().isoformat(),
        details={
            "no_face": embeddings.no_face,
            "detector": detector,
            # Which models ran INT8 (edgeid/runtime/inference/precision.py).
            "precision": precision,
            "face": "the most central face of each image",
            "flip_tta": False,
        },
    )
    bands = calibrate_bands(LabelledTemplates(embeddings.vectors, embeddings.people), source)
    return bands["adult"].model_copy(update={"caveats": ADULT_CAVEATS})


def kept_bands(path: Path) -> dict[MeasuredBand, BandData]:
    """The bands of the existing file, measured elsewhere (LFW re-measures only adults)."""
    if not path.exists():
        return {}
    try:
        previous = parse_calibration(path.read_text(encoding="utf-8"), path.name)
    except CalibrationError as exc:
        logger.warning("not keeping the bands of %s: %s", path.name, exc)
        return {}
    return dict(previous.data.bands)


def calibrate(
    embeddings: LfwEmbeddings,
    model_id: str,
    detector: str,
    keep: dict[MeasuredBand, BandData],
    precision: Precision = "fp32",
) -> CalibrationData:
    adult = adult_band(embeddings, detector, precision)
    previous = keep.get("adult")
    if previous is not None:  # keep what was measured elsewhere: cross-checks, clustering
        adult = adult.model_copy(
            update={
                "clustering": previous.clustering,
                "verification": previous.verification,
                "caveats": [
                    *ADULT_CAVEATS,
                    *(c for c in previous.caveats if c not in ADULT_CAVEATS),
                ],
            }
        )
    return calibration_data(
        model_id,
        {"adult": adult},
        generated=datetime.date.today().isoformat(),
        generated_by=(
            "python -m benchmarks.calibrate_thresholds (adult band from LFW); other bands "
            "kept from the previous file"
        ),
        caveats=CAVEATS,
        keep=keep,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="int8-embedder (FP32 detector) or int8 (INT8 MTCNN too): written as the INT8 "
        "embedder's own calibration",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model_id = precision_model(EMBEDDER_MODEL, args.precision)
    args.out = args.out or calibration_path(model_id)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not (args.data / "lfw-dev" / "images").is_dir():
        print(f"calibration data not found at {args.data}/lfw-dev/images", file=sys.stderr)
        return 2
    embeddings = embed_lfw_dev(args.data, args.models, precision=args.precision)
    # A first INT8 file keeps the FP32 file's child and teen bands (measured elsewhere, on the
    # FP32 model: INT8 templates are within cosine 0.99 of them, see README "INT8 on the CPU").
    keep = kept_bands(args.out) or kept_bands(calibration_path(EMBEDDER_MODEL))
    result = calibrate(embeddings, model_id, DEFAULT_DETECTOR, keep, args.precision)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result.model_dump(mode="json"), indent=2) + "\n"
    parse_calibration(text, args.out.name)  # what is written must load
    args.out.write_text(text, encoding="utf-8")
    logger.info(
        "wrote %s (%s images embedded in %.0f s)",
        args.out,
        len(embeddings.people),
        embeddings.seconds,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
