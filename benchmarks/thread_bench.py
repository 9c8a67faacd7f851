"""ONNX Runtime thread configurations compared in one run: which should the service use?

Configurations (each in a fresh process: a global pool is fixed when ONNX Runtime starts):

- ``spin``: one intra-op pool per session, threads spin after each run (ONNX Runtime's default);
- ``nospin``: one pool per session, ``session.intra_op.allow_spinning = 0`` (edgeid's default);
- ``global``: one process-wide pool shared by every session (``use_per_session_threads`` off;
  its spinning cannot be set from Python, so it keeps ONNX Runtime's default).

Each process measures, over the same images: **sequential** (one photo at a time through the
default pipeline, latency per photo) and **concurrent** (``--clients`` threads sharing the one
pipeline, as the service's analysis slots do: ``inference.max_running_jobs``, default 2; photos/s
and latency per request). The configurations are run in turn, ``--rounds`` times (A B C A B C…)
so the noise of a shared machine falls on all of them; the report gives per configuration the
median over rounds and its ratio to ``spin``.

    python -m benchmarks.thread_bench --images ../shared/data/lfw-dev/images --models var/models
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from edgeid.runtime.inference.precision import DEFAULT_PRECISION, PRECISIONS

CONFIGS = ("spin", "nospin", "global")


def _child(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.pipeline_bench import find_images
    from edgeid.runtime.inference import onnx_backend
    from edgeid.runtime.inference.image_decode import load_image
    from edgeid.runtime.inference.pipeline import FacePipeline

    if args.child == "global":
        onnx_backend.use_global_thread_pool()
    pipeline = FacePipeline.load(
        Path(args.models),
        backend="cpu",
        spinning=args.child == "spin",
        precision=args.precision,
    )
    images = [load_image(p) for p in find_images(Path(args.images), args.limit)]
    pipeline.embed(images[0])  # warm-up, untimed
    sequential = []
    for image in images:
        started = time.perf_counter()
        pipeline.embed(image)
        sequential.append(1000 * (time.perf_counter() - started))
    queue = list(range(len(images)))
    lock = threading.Lock()
    latencies: list[float] = []

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                index = queue.pop()
            started = time.perf_counter()
            pipeline.embed(images[index])
            with lock:
                latencies.append(1000 * (time.perf_counter() - started))

    started = time.perf_counter()
    workers = [threading.Thread(target=client) for _ in range(args.clients)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - started
    return {
        "sequential_ms_median": statistics.median(sequential),
        "sequential_images_per_s": len(sequential) / (sum(sequential) / 1000),
        "concurrent_images_per_s": len(images) / wall,
        "concurrent_latency_ms_median": statistics.median(latencies),
    }


def run(
    images: Path,
    models: Path,
    *,
    limit: int = 100,
    rounds: int = 2,
    clients: int = 2,
    precision: str = "fp32",
    configs: tuple[str, ...] = CONFIGS,
) -> dict[str, Any]:
    samples: dict[str, list[dict[str, float]]] = {c: [] for c in configs}
    order = []
    for _ in range(rounds):
        for config in configs:
            command = [
                sys.executable,
                "-m",
                "benchmarks.thread_bench",
                "--images",
                str(images),
                "--models",
                str(models),
                "--limit",
                str(limit),
                "--clients",
                str(clients),
                "--precision",
                precision,
                "--child",
                config,
            ]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            samples[config].append(json.loads(out))
            order.append(config)
    medians = {
        config: {key: round(statistics.median(s[key] for s in runs), 2) for key in runs[0]}
        for config, runs in samples.items()
    }
    base = medians[configs[0]]
    ratios = {
        config: {
            # >1 is better than the first configuration: speed up for rates, for times inverted.
            key: round(value / base[key] if key.endswith("per_s") else base[key] / value, 3)
            for key, value in figures.items()
        }
        for config, figures in medians.items()
    }
    return {
        "benchmark": "ONNX Runtime thread configuration (sequential and concurrent requests)",
        "images": limit,
        "clients": clients,
        "precision": precision,
        "order": order,
        "medians": medians,
        "ratio_vs_" + configs[0]: ratios,
        "samples": samples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        json.dump(_child(args), sys.stdout)
        return 0
    report = run(
        args.images,
        args.models,
        limit=args.limit,
        rounds=args.rounds,
        clients=args.clients,
        precision=args.precision,
        configs=tuple(args.configs.split(",")),
    )
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
