"""Two precisions' whole pipelines, interleaved image by image in one process.

``edgeid bench pipeline`` runs each precision as a phase of its own, FP32 first: on a small box
the later phases run measurably slower even where their models are the same (the FP32 MTCNN's
detect stage, 16.7-17.3 ms per image as the first phase, 17.6-19.5 ms as the third, in the
runs of README "INT8 on the CPU"). Here each image is analysed by both pipelines in turn, the
order alternating from image to image and round to round, so both see the same box.

    python -m benchmarks.precision_ab --images ../shared/data/lfw-dev/images --models var/models
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, cast

from edgeid.runtime.inference.image_decode import load_image
from edgeid.runtime.inference.pipeline import FacePipeline
from edgeid.runtime.inference.precision import PRECISIONS, Precision


def run(
    images_dir: Path,
    models_dir: Path,
    precisions: tuple[Precision, Precision] = ("fp32", "int8-embedder"),
    *,
    limit: int = 300,
    rounds: int = 3,
    threads: int | None = None,
) -> dict[str, Any]:
    """Images per second, wall and CPU ms per image of each pipeline, interleaved."""
    paths = sorted(images_dir.rglob("*.jpg"))[:limit]
    images = [load_image(p) for p in paths]
    pipelines = {
        p: FacePipeline.load(models_dir, "mtcnn", threads=threads, backend="cpu", precision=p)
        for p in precisions
    }
    for pipeline in pipelines.values():
        pipeline.embed(images[0])  # warm-up
    wall = dict.fromkeys(precisions, 0.0)
    cpu = dict.fromkeys(precisions, 0.0)
    faces = dict.fromkeys(precisions, 0)
    for round_ in range(rounds):
        for index, image in enumerate(images):
            order = precisions if (index + round_) % 2 == 0 else precisions[::-1]
            for name in order:
                cpu_started, started = time.process_time(), time.perf_counter()
                found = pipelines[name].embed(image)
                wall[name] += time.perf_counter() - started
                cpu[name] += time.process_time() - cpu_started
                faces[name] += len(found)
    analyses = rounds * len(images)
    return {
        "benchmark": "whole pipeline (MTCNN, CPU), two precisions interleaved per image",
        "images": len(images),
        "rounds": rounds,
        "threads": threads,
        "precisions": {
            name: {
                "images_per_s": round(analyses / wall[name], 2),
                "wall_ms_per_image": round(wall[name] / analyses * 1000, 2),
                "cpu_ms_per_image": round(cpu[name] / analyses * 1000, 2),
                "faces": faces[name] // rounds,
            }
            for name in precisions
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--precisions", nargs=2, choices=PRECISIONS, default=["fp32", "int8-embedder"]
    )
    args = parser.parse_args()
    chosen = cast(tuple[Precision, Precision], tuple(args.precisions))
    report = run(
        args.images, args.models, chosen, limit=args.limit, rounds=args.rounds, threads=args.threads
    )
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
