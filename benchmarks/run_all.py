"""`make bench`: every benchmark, each against its baseline in the same process."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import face_recognition_models

from benchmarks import (
    cluster_bench,
    detectors,
    gallery_open_bench,
    hostile_load,
    ingest_bench,
    lfw_vs_dlib,
    pipeline_bench,
    search_bench,
)
from edgeid.runtime.evaluation.lfw import LfwReport, central_face_embedder, evaluate, parse_pairs
from edgeid.runtime.inference.activity import InferenceLimits
from edgeid.runtime.inference.pipeline import DEFAULT_DETECTOR, FacePipeline

# Gallery sizes for the search bench; 1,000,000 is the goal size (its build takes minutes).
SEARCH_SIZES = (100_000, 1_000_000)
# First N LFW dev images (by path) for the pipeline speed bench: dlib's own CPU pipeline takes
# ~0.5 s per LFW image on a 2-core box (single-threaded), so 300 keep this part to minutes.
LFW_PIPELINE_LIMIT = 300


def pipeline_speed(models_dir: Path, images: Path, limit: int | None) -> dict[str, object]:
    """Ours with MMOD (dlib's detector: like for like; with flip TTA's cost) beside dlib, and
    ours with the default detector, whose ratio is taken against that same dlib run."""
    like_for_like = pipeline_bench.run(
        images, models_dir, limit=limit, detector="mmod", flip_tta=True
    )
    default = pipeline_bench.run(
        images,
        models_dir,
        limit=limit,
        detector=DEFAULT_DETECTOR,
        baseline=False,
        streams=InferenceLimits().ingest_streams,  # also as a case ingest runs: two at once
    )
    baseline = like_for_like.get("baseline")
    if baseline and baseline["images_per_s"]:
        default["ratio_vs_baseline"] = round(default["images_per_s"] / baseline["images_per_s"], 2)
        default["baseline_note"] = "dlib's pipeline (MMOD): the mmod entry's baseline, same images"
    return {"mmod": like_for_like, DEFAULT_DETECTOR: default}


def flip_tta_accuracy(models_dir: Path, data: Path) -> dict[str, object]:
    """LFW dev verification with the default detector, flip TTA off and on."""
    pairs = parse_pairs(data / "lfw-dev" / "pairsDevTest.txt")
    images = data / "lfw-dev" / "images"
    keep = ("accuracy", "accuracy_std", "pairs", "no_face", "ms_per_image", "tar_at_far_1e-3")
    reports: dict[bool, LfwReport] = {}
    for flip in (False, True):
        pipeline = FacePipeline.load(models_dir, DEFAULT_DETECTOR, flip_tta=flip)
        reports[flip] = evaluate(pairs, images, central_face_embedder(pipeline))
    plain, flipped = reports[False], reports[True]
    return {
        "detector": DEFAULT_DETECTOR,
        "plain": {k: plain.to_json()[k] for k in keep},
        "flip_tta": {k: flipped.to_json()[k] for k in keep},
        "accuracy_delta": round(flipped.accuracy - plain.accuracy, 4),
        "tar_at_far_1e-3_delta": round(flipped.tar_at_far_1e_3 - plain.tar_at_far_1e_3, 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()
    if not (args.data / "lfw-dev").is_dir():
        print(f"benchmark data not found at {args.data}", file=sys.stderr)
        return 2
    home = Path(os.environ.get("EDGEID_HOME", "var"))
    models = home / "models"
    weights = Path(face_recognition_models.__file__).parent / "models"
    search = {
        str(size): search_bench.run(size, data=args.data, models=models) for size in SEARCH_SIZES
    }
    # The encrypted store at the goal size: open before and after compaction into batches. Its
    # templates are the search bench's (same generator, same seed), and the open goal is store
    # plus index, so the search report takes this store's open instead of building another.
    gallery_open = gallery_open_bench.run(SEARCH_SIZES[-1], data=args.data)
    search_bench.add_store(search[str(SEARCH_SIZES[-1])], gallery_open)
    results = {
        "detectors": detectors.run(models, args.data),
        "lfw_vs_dlib": lfw_vs_dlib.run(args.data, models, weights),
        "pipeline_lfw_dev": pipeline_speed(
            models, args.data / "lfw-dev" / "images", LFW_PIPELINE_LIMIT
        ),
        # scenes/dlib-faces and scenes/group, every image: several faces each, up to 1366x768.
        "pipeline_scenes": pipeline_speed(models, args.data / "scenes", None),
        "lfw_flip_tta": flip_tta_accuracy(models, args.data),
        "search": search,
        "gallery_open": gallery_open,
        # Case ingest: clustering beside dlib's Chinese whispers, ingest beside the bare pipeline.
        "clustering": cluster_bench.run(args.data, models),
        "case_ingest": ingest_bench.run(
            args.data, models, streams_ab=InferenceLimits().ingest_streams, repeat=2
        ),
        # Ordinary searches alone and beside 8 concurrent hostile uploads; the service's RSS.
        "hostile_load": hostile_load.run(args.data, models),
    }
    json.dump(results, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
