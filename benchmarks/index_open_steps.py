"""Where a sealed index's open goes, step by step (issue 17's open goal at 1M faces).

Builds the product's index (``GalleryIndex``, today's parameters) over ``--faces`` random unit
templates, seals it with AES-256-GCM as the store does, writes it to a file, then opens it
``--repeat`` times, timing each step of ``GalleryIndex.open_sealed`` on its own: read the file,
authenticate and decrypt, parse the header and face ids, copy the graph into the scratch file
(a memfd on Linux), and hnswlib's ``load_index``. One JSON line per open.

    python -m benchmarks.index_open_steps --faces 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import hnswlib
import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgeid.runtime.gallery.index import (
    SPACE,
    GalleryIndex,
    IndexParams,
    _parse,
    _scratch_file,
    _write_all,
)

NONCE_BYTES = 12


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--faces", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    templates = rng.standard_normal((args.faces, 128)).astype(np.float32)
    templates /= np.linalg.norm(templates, axis=1, keepdims=True)
    started = time.perf_counter()
    index = GalleryIndex.build(
        "bench", [f"{i:032x}" for i in range(args.faces)], templates, IndexParams()
    )
    print(json.dumps({"faces": args.faces, "build_s": round(time.perf_counter() - started, 1)}))
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    nonce = os.urandom(NONCE_BYTES)
    sealed = index.seal_with(lambda data: nonce + aead.encrypt(nonce, bytes(data), b""))
    del index, templates
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "index.sealed"
        path.write_bytes(sealed)
        del sealed
        for _ in range(args.repeat):
            marks = [time.perf_counter()]
            data = path.read_bytes()
            marks.append(time.perf_counter())
            view = memoryview(data)
            plaintext = aead.decrypt(bytes(view[:NONCE_BYTES]), view[NONCE_BYTES:], b"")
            marks.append(time.perf_counter())
            _, _, graph = _parse(plaintext)
            marks.append(time.perf_counter())
            hnsw = hnswlib.Index(space=SPACE, dim=128)
            with _scratch_file() as scratch:
                _write_all(scratch, graph)
                marks.append(time.perf_counter())
                hnsw.load_index(str(scratch))
                marks.append(time.perf_counter())
            steps = ("read_s", "decrypt_s", "parse_s", "scratch_copy_s", "hnswlib_load_s")
            record = {
                s: round(b - a, 3) for s, a, b in zip(steps, marks[:-1], marks[1:], strict=True)
            }
            record["total_s"] = round(marks[-1] - marks[0], 3)
            print(json.dumps(record), flush=True)
            del data, view, plaintext, graph, hnsw
    return 0


if __name__ == "__main__":
    sys.exit(main())
