"""Can the store's and the index's opens overlap in threads? Only if their big calls release
the GIL. One call runs in another thread while the main thread spins a pure-Python loop: the
loop's longest stall is about the call's length when the call holds the GIL, and about
``sys.getswitchinterval()`` (5 ms) when it releases it. Then AES-GCM decrypt and hnswlib's
``load_index`` run one after the other and in two threads.

    python -m benchmarks.open_gil_check --decrypt-mb 400 --faces 100000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import hnswlib
import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def longest_stall(call: Callable[[], object]) -> tuple[float, float]:
    """(seconds the call took in another thread, longest gap of the main thread's loop)."""
    done = threading.Event()
    took: list[float] = []

    def work() -> None:
        started = time.perf_counter()
        call()
        took.append(time.perf_counter() - started)
        done.set()

    thread = threading.Thread(target=work)
    last = time.perf_counter()
    worst = 0.0
    thread.start()
    while not done.is_set():
        now = time.perf_counter()
        worst = max(worst, now - last)
        last = now
    thread.join()
    return round(took[0], 3), round(worst, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--decrypt-mb", type=int, default=400)
    parser.add_argument("--faces", type=int, default=100_000)
    args = parser.parse_args()
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    nonce = os.urandom(12)
    sealed = aead.encrypt(nonce, os.urandom(args.decrypt_mb << 20), b"")

    def decrypt() -> None:
        aead.decrypt(nonce, sealed, b"")

    print("switch interval s", sys.getswitchinterval())
    print("AESGCM.decrypt: call s, longest main-loop stall s", longest_stall(decrypt))
    vectors = np.random.default_rng(0).standard_normal((args.faces, 128)).astype(np.float32)
    graph = hnswlib.Index(space="cosine", dim=128)
    graph.init_index(max_elements=args.faces, M=32, ef_construction=40)
    graph.add_items(vectors)
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "index.bin")
        graph.save_index(path)

        def load() -> None:
            hnswlib.Index(space="cosine", dim=128).load_index(path)

        print("hnswlib load_index: call s, longest main-loop stall s", longest_stall(load))
        started = time.perf_counter()
        decrypt()
        load()
        sequential = time.perf_counter() - started
        threads = [threading.Thread(target=decrypt), threading.Thread(target=load)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(
            f"decrypt + load: one after the other {sequential:.3f} s, "
            f"in two threads {time.perf_counter() - started:.3f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
