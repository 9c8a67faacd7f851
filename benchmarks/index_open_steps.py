"""Where a sealed index's open goes, step by step, in both formats (issue 17's open goal).

Builds the product's index (``GalleryIndex``, today's parameters, in one graph: ``--shards``
splits it as the product does) over ``--faces`` random unit templates, seals it with AES-256-GCM
as the store does, and writes it to a file twice: in the format the product writes (hnswlib's
state arrays, format 3; printed as 2, the one-graph format whose load it is) and in format 1
(hnswlib's own file bytes, the baseline). Then opens each ``--repeat`` times, alternating,
timing each step of ``GalleryIndex.open_sealed``: read the file, authenticate and decrypt,
parse the header and face ids, and load the graph (state arrays: ``hnsw_state.restore``;
format 1: copy into the scratch file, a memfd on Linux, then hnswlib's ``load_index``). One
JSON line per open, with the minor page faults of each step (``faults``: memory touched for the
first time), then the median totals and, when both formats ran, their ratio. ``--formats 2``
opens only the state arrays, one open after another; ``--ef-construction`` builds a quicker,
rougher graph (the open's work depends on the number of faces and M, not on the graph's
quality).

    python -m benchmarks.index_open_steps --faces 1000000
    python -m benchmarks.index_open_steps --faces 1000000 --formats 2 --repeat 6 \
        --ef-construction 40
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
    (hnsw,) = index_module._load_graphs(header, graph, header["dim"])
    hnsw.save_index(str(scratch))
    old = {k: v for k, v in header.items() if k != "graphs"}
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


def timed_open(path: Path, aead: AESGCM) -> dict[str, object]:
    marks: list[tuple[float, int]] = []

    def mark() -> None:
        marks.append((time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt))

    mark()
    data = path.read_bytes()
    mark()
    view = memoryview(data)
    plaintext = aead.decrypt(bytes(view[:NONCE_BYTES]), view[NONCE_BYTES:], b"")
    mark()
    header, _, graph = index_module._parse(plaintext)
    mark()
    graphs = index_module._load_graphs(header, graph, header["dim"])
    mark()
    steps = ("read_s", "decrypt_s", "parse_s", "load_graph_s")
    pairs = list(zip(steps, marks[:-1], marks[1:], strict=True))
    record: dict[str, object] = {s: round(b[0] - a[0], 3) for s, a, b in pairs}
    record["total_s"] = round(marks[-1][0] - marks[0][0], 3)
    record["faults"] = [b[1] - a[1] for _, a, b in pairs]
    record["format"] = min(header["format"], 2)
    del graphs, graph, plaintext, view, data
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--faces", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--formats", default="1,2", help="formats to open, alternating: 1,2 or 2")
    parser.add_argument("--ef-construction", type=int, default=IndexParams().ef_construction)
    parser.add_argument("--shards", type=int, default=1, help="graphs (format 1 needs one)")
    args = parser.parse_args()
    forms = [int(f) for f in args.formats.split(",")]

    rng = np.random.default_rng(0)
    templates = rng.standard_normal((args.faces, 128)).astype(np.float32)
    templates /= np.linalg.norm(templates, axis=1, keepdims=True)
    started = time.perf_counter()
    index = GalleryIndex.build(
        "bench",
        [f"{i:032x}" for i in range(args.faces)],
        templates,
        IndexParams(ef_construction=args.ef_construction, shards=args.shards),
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
        if 1 in forms:
            paths[1].write_bytes(seal(format_1(plaintext, Path(folder) / "graph.bin")))
            (Path(folder) / "graph.bin").unlink()
        del plaintext
        totals: dict[int, list[float]] = {form: [] for form in forms}
        for _ in range(args.repeat):
            for form in forms:
                record = timed_open(paths[form], aead)
                totals[form].append(float(record["total_s"]))  # type: ignore[arg-type]
                print(json.dumps(record), flush=True)
    summary = {f"median_total_s_format_{f}": statistics.median(t) for f, t in totals.items()}
    if len(totals) == 2:
        summary["speedup"] = round(statistics.median(totals[1]) / statistics.median(totals[2]), 2)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
