"""The embedder alone, FP32 against INT8: ms per face at batch 1 and 8, in turn (A B A B…).

    python -m benchmarks.embedder_precision_bench --models var/models [--rounds 3]

Chips are random pixels (the network's cost does not depend on them); sessions are the
product's (``create_cpu_session``: all cores, no spinning). Medians and best over rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from edgeid.runtime.inference.manifest import read_verified_model
from edgeid.runtime.inference.onnx_backend import create_cpu_session
from edgeid.runtime.inference.precision import PRECISIONS, precision_model

RUNS = 15


def run(models: Path, rounds: int = 3, batches: tuple[int, ...] = (1, 8)) -> dict[str, object]:
    sessions = {
        p: create_cpu_session(read_verified_model(models, precision_model("dlib_resnet_v1", p))[1])
        for p in PRECISIONS
        if p != "int8-embedder"  # the same embedder as int8
    }
    rng = np.random.default_rng(0)
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        for precision, session in sessions.items():
            for batch in batches:
                chips = rng.integers(0, 256, (batch, 150, 150, 3), dtype=np.uint8)
                session.run(None, {"chips": chips})  # warm-up
                times = []
                for _ in range(RUNS):
                    started = time.perf_counter()
                    session.run(None, {"chips": chips})
                    times.append(1000 * (time.perf_counter() - started) / batch)
                samples.setdefault(f"{precision}_batch{batch}", []).append(statistics.median(times))
    medians = {k: round(statistics.median(v), 2) for k, v in samples.items()}
    # On a shared machine the quietest round is the closest to the network's own cost.
    best = {k: round(min(v), 2) for k, v in samples.items()}
    return {
        "benchmark": "embedder ms per face, FP32 vs INT8",
        "ms_per_face": medians,
        "ms_per_face_best_round": best,
        "fp32_over_int8": {
            f"batch{b}": round(medians[f"fp32_batch{b}"] / medians[f"int8_batch{b}"], 2)
            for b in batches
        },
        "samples": samples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    json.dump(run(args.models, args.rounds), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
