"""Where a sealed index's open goes, step by step, in both formats (issue 17's open goal).

Builds the product's index (``GalleryIndex``, today's parameters) over ``--faces`` random unit
templates, seals it with AES-256-GCM as the store does, and writes it to a file twice: in the
format the product writes (2: hnswlib's state arrays) and in format 1 (hnswlib's own file
bytes, the baseline). Then opens each ``--repeat`` times, alternating, timing each step of
``GalleryIndex.open_sealed``: read the file, authenticate and decrypt, parse the header and
face ids, and load the graph (format 2: ``hnsw_state.restore``; format 1: copy into the
scratch file, a memfd on Linux, then hnswlib's ``load_index``). One JSON line per open, then
the median totals and their ratio.

    python -m benchmarks.index_open_steps --faces 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgeid.runtime.gallery import index as index_module
from edgeid.runtime.gallery.index import GalleryIndex, IndexParams

NONCE_BYTES = 12


def format_1(plaintext: bytes, scratch: Path) -> bytes:
    """The same index's plaintext in format 1: the header without hnswlib's state, then the
    bytes of hnswlib's ``save_index``."""
    header, face_ids, graph = index_module._parse(plaintext)
    hnsw = index_module._load_hnsw(header, graph, header["dim"])
    hnsw.save_index(str(scratch))
    old = {k: v for k, v in header.items() if k not in ("hnsw", "arrays")}
    old["format"] = 1
    head = json.dumps(old, separators=(",", ":")).encode()
    ids = "\n".join(face_ids).encode()
    front = [
        index_module._MAGIC,
        index_module._HEADER_LENGTH.pack(len(head)),
        head,
        index_module._IDS_LENGTH.pack(len(ids)),
        ids,
    ]
    return b"".join([*front, scratch.read_bytes()])


def timed_open(path: Path, aead: AESGCM) -> dict[str, float]:
    marks = [time.perf_counter()]
    data = path.read_bytes()
    marks.append(time.perf_counter())
    view = memoryview(data)
    plaintext = aead.decrypt(bytes(view[:NONCE_BYTES]), view[NONCE_BYTES:], b"")
    marks.append(time.perf_counter())
    header, _, graph = index_module._parse(plaintext)
    marks.append(time.perf_counter())
    hnsw = index_module._load_hnsw(header, graph, header["dim"])
    marks.append(time.perf_counter())
    steps = ("read_s", "decrypt_s", "parse_s", "load_graph_s")
    record: dict[str, float] = {
        s: round(b - a, 3) for s, a, b in zip(steps, marks[:-1], marks[1:], strict=True)
    }
    record["total_s"] = round(marks[-1] - marks[0], 3)
    record["format"] = header["format"]
    del hnsw, graph, plaintext, view, data
    return record


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

    def seal(data: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + aead.encrypt(nonce, data, b"")

    plaintext = index.seal_with(lambda data: data)
    del index, templates
    with tempfile.TemporaryDirectory() as folder:
        paths = {2: Path(folder) / "format-2.sealed", 1: Path(folder) / "format-1.sealed"}
        paths[2].write_bytes(seal(plaintext))
        paths[1].write_bytes(seal(format_1(plaintext, Path(folder) / "graph.bin")))
        (Path(folder) / "graph.bin").unlink()
        del plaintext
        totals: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(args.repeat):
            for form in (1, 2):
                record = timed_open(paths[form], aead)
                totals[form].append(record["total_s"])
                print(json.dumps(record), flush=True)
    median = statistics.median
    summary = {
        "median_total_s_format_1": median(totals[1]),
        "median_total_s_format_2": median(totals[2]),
        "speedup": round(median(totals[1]) / median(totals[2]), 2),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
