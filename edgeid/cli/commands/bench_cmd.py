"""`edgeid bench pipeline` and `edgeid bench search`."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

import edgeid
from edgeid.cli import EXIT_OK, emit
from edgeid.cli.options import detector_options, positive_int
from edgeid.cli.paths import models_dir
from edgeid.runtime.config.settings import load_settings
from edgeid.runtime.errors import EdgeidError


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks.<name>``, which lives beside the edgeid package in a source checkout."""
    module = f"benchmarks.{name}"
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name not in ("benchmarks", module):
            raise
    # The console script does not put the checkout on sys.path; an editable install does
    # not map benchmarks/ (not an installed package), so look next to the edgeid package.
    checkout = Path(edgeid.__file__).resolve().parent.parent
    if not (checkout / "benchmarks" / "__init__.py").is_file():
        raise EdgeidError(
            "edgeid bench needs the benchmarks package of a source checkout; "
            "run it from the edgeid repository (python -m edgeid bench ...)"
        )
    sys.path.insert(0, str(checkout))
    return importlib.import_module(module)


def _progress(name: str, done: int, total: int) -> None:
    if done % 50 == 0 or done == total:
        print(f"\r{name}: {done}/{total} images", end="", file=sys.stderr, flush=True)
        if done == total:
            print(file=sys.stderr)


def pipeline(args: argparse.Namespace) -> int:
    bench = load_benchmark("pipeline_bench")
    report = bench.run(
        Path(args.images),
        models_dir(args.home_dir),
        limit=args.limit,
        detector=args.detector,
        upsample=args.upsample,
        threads=args.threads,
        flip_tta=args.flip_tta,
        baseline=not args.no_baseline,
        progress=None if args.json else _progress,
        compare_detector=args.compare_detector,
        streams=args.streams or load_settings(args.home_dir).inference.ingest_streams,
    )
    emit(args, report, bench.summary(report))
    return EXIT_OK


def search(args: argparse.Namespace) -> int:
    bench = load_benchmark("search_bench")
    data = Path(args.data) if args.data else None
    report = bench.run(
        args.size, data=data, models=models_dir(args.home_dir), store=not args.no_store
    )
    opened = report.get("open_total_s", report["open_s"])
    held = [goal for goal, met in report["goals"].items() if met]
    text = (
        f"{report['size']} faces: recall@10 {report['recall_at_10']}, "
        f"p50/p99 {report['p50_ms']}/{report['p99_ms']} ms, "
        f"{report['ratio_vs_baseline']}x exact search, open {opened} s "
        f"(index {report['open_s']} s), {report['sealed_bytes_per_face']} bytes/face\n"
        f"the 1M-face goals held: {len(held)} of {len(report['goals'])}"
        + (f" ({'; '.join(held)})" if held else "")
    )
    emit(args, report, text)
    return EXIT_OK


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    bench = sub.add_parser("bench", help="measure speed beside a baseline")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    bench_pipeline = bench_sub.add_parser(
        "pipeline", parents=[common], help="images/s of decode, detect, align, embed vs dlib"
    )
    bench_pipeline.add_argument("--images", required=True, help="folder of .jpg/.png images")
    bench_pipeline.add_argument(
        "--limit", type=positive_int, default=None, help="only the first N images (by path)"
    )
    detector_options(bench_pipeline)
    bench_pipeline.add_argument(
        "--flip-tta", action="store_true", help="also measure flip test-time augmentation"
    )
    bench_pipeline.add_argument(
        "--no-baseline", action="store_true", help="skip dlib's pipeline (ours only)"
    )
    bench_pipeline.add_argument(
        "--compare-detector",
        action="store_true",
        help="also run the detector path as built (before issue 17 item 2), interleaved",
    )
    bench_pipeline.add_argument(
        "--streams",
        type=positive_int,
        default=None,
        help="also run N images at once (ours on threads, dlib in processes); default: "
        "inference.ingest_streams in edgeid.toml (2); 1: one at a time only",
    )
    bench_pipeline.set_defaults(handler=pipeline)

    bench_search = bench_sub.add_parser(
        "search", parents=[common], help="gallery search: recall, latency vs exact search"
    )
    bench_search.add_argument("--size", type=positive_int, required=True, help="faces")
    bench_search.add_argument(
        "--data",
        help="folder with lfw-dev/ to fit the template generator (cached after the first run)",
    )
    bench_search.add_argument(
        "--no-store",
        action="store_true",
        help="skip the encrypted gallery store (its open is part of the open goal)",
    )
    bench_search.set_defaults(handler=search)
