"""How long copying into freshly allocated memory takes on this machine, repeated in one process.

A control for the 1M-face open figures (``index_open_steps``, ``edgeid bench search``): their
largest step copies about 780 MB into memory hnswlib has just allocated, so each page is
touched for the first time during the copy. On a virtual machine whose host backs guest
memory lazily, that first touch can cost several times more on one run than the next. This
copies ``--mb`` megabytes from one buffer into a newly allocated one ``--repeat`` times and
prints each time, so an open's outlier can be told apart from the machine's.

    python -m benchmarks.fresh_memory --mb 780 --repeat 12
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=780)
    parser.add_argument("--repeat", type=int, default=12)
    args = parser.parse_args()
    source = np.ones(args.mb * 1_000_000, dtype=np.uint8)
    seconds = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        target = np.empty_like(source)
        np.copyto(target, source)
        seconds.append(round(time.perf_counter() - started, 3))
        del target
    ordered = sorted(seconds)
    print(json.dumps({"mb": args.mb, "copy_s": seconds, "median_s": ordered[len(ordered) // 2]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
