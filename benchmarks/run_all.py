"""`make bench`: every benchmark, each against its baseline in the same process."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import face_recognition_models

from benchmarks import detectors, lfw_vs_dlib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()
    if not (args.data / "lfw-dev").is_dir():
        print(f"benchmark data not found at {args.data}", file=sys.stderr)
        return 2
    home = Path(os.environ.get("EDGEID_HOME", "var"))
    weights = Path(face_recognition_models.__file__).parent / "models"
    results = {
        "detectors": detectors.run(home / "models", args.data),
        "lfw_vs_dlib": lfw_vs_dlib.run(args.data, home / "models", weights),
    }
    json.dump(results, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
