"""`python -m benchmarks.gallery_open_bench --size N --json`: opening an encrypted gallery of N
faces, compacted into batch records, beside the same gallery as single records.

**Gallery.** N faces of realistic 128-d unit templates from the search bench's generator
(fitted to LFW dev templates; faces grouped into people as LFW's images are, so about 0.6
subjects per face), each with a real JPEG thumbnail of one constant 150x150 image, enrolled
in bulk through the public API (``Gallery.enroll_many``, as an import would) under a key-file
KEK, in a temporary state directory.

**Figures.** ``baseline``: the gallery as enrolled, one sealed record per subject and face:
opening it decrypts, parses and builds objects record by record (the old path, and still the
path of records enrolled since the last compaction). Then ``compact()`` (timed) rewrites it as
batch records, and ``batched`` is the same gallery opened from those. Each open is
``GalleryStore(...)`` plus ``open_gallery(name)`` in this process, with the files in the page
cache (``open_s``: the median of ``--repeat`` opens); ``cold_open_s`` first evicts the
gallery's files from the page cache (posix_fadvise), so it also reads them from the disk.
``open_cpu_s`` is the CPU time of the same opens: the figure to trust on a busy machine.
``bytes_per_face``: the records log and the thumbnail log over N. After the batched open:
``embeddings_s`` (``Gallery.embeddings``: what an index rebuild reads), ``face_lookup_us``
(``face(id)``, first time) and ``all_faces_cpu_s`` (``faces()``: building every Face
object, the cost moved out of open). The opened gallery is checked against what was
enrolled (counts, every embedding, a thumbnail).

    python -m benchmarks.gallery_open_bench --size 100000 --json
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from benchmarks.search_bench import GENERATOR_CACHE, TemplateModel, template_model
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.gallery.records import NewFace, NewSubject
from edgeid.runtime.gallery.store import RECORDS_LOG, Gallery, GalleryStore, thumbs_log_name
from edgeid.runtime.inference.pipeline import EMBEDDER_MODEL
from edgeid.runtime.vault.framed_log import MAX_ENTRIES_PER_FRAME
from edgeid.runtime.vault.keys import KeyFileProvider

GALLERY_NAME = "bench"
THUMB_SIDE = 150  # the aligned chip's size
# Records per enroll_many call (a subject or a face each): well inside one frame's limit.
ENROLL_CHUNK = 30_000
LOOKUPS = 1000  # face() calls timed after the open
REPEAT = 3  # batched opens timed; the figure is their median


def thumbnail_jpeg() -> bytes:
    """A real JPEG of the size of an aligned chip: one constant colour."""
    out = io.BytesIO()
    Image.new("RGB", (THUMB_SIDE, THUMB_SIDE), (128, 120, 110)).save(out, "JPEG", quality=90)
    return out.getvalue()


def _chunks(people: npt.NDArray[np.int64]) -> Iterator[tuple[int, int]]:
    """Face ranges of whole people, each about ENROLL_CHUNK records."""
    starts = [*np.flatnonzero(np.r_[True, people[1:] != people[:-1]]).tolist(), len(people)]
    first = 0
    for i in range(1, len(starts)):
        subjects, faces = i - first, starts[i] - starts[first]
        if subjects + faces >= ENROLL_CHUNK or i == len(starts) - 1:
            yield starts[first], starts[i]
            first = i


def build(
    gallery: Gallery,
    vectors: npt.NDArray[np.float32],
    people: npt.NDArray[np.int64],
    rng: np.random.Generator,
) -> None:
    jpeg = thumbnail_jpeg()
    for start, end in _chunks(people):
        batch: list[tuple[NewSubject, list[NewFace]]] = []
        for row in range(start, end):
            if row == start or people[row] != people[row - 1]:
                subject = NewSubject(f"person {people[row]}", "benchmark", "bench")
                batch.append((subject, []))
            face = NewFace(
                vectors[row],
                float(rng.uniform(0.5, 1.0)),
                EMBEDDER_MODEL,
                rng.bytes(32).hex(),
                jpeg,
            )
            batch[-1][1].append(face)
        assert sum(1 + len(f) for _, f in batch) <= MAX_ENTRIES_PER_FRAME
        gallery.enroll_many(batch)


def _store(state: Path) -> GalleryStore:
    return GalleryStore(state, KeyFileProvider(state / "keys"))


def _timed_open(state: Path) -> tuple[float, float, GalleryStore, Gallery]:
    """Wall and CPU seconds to open the gallery, and the open store and gallery."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    store = _store(state)
    gallery = store.open_gallery(GALLERY_NAME)
    return time.perf_counter() - wall, time.process_time() - cpu, store, gallery


def _evict(directory: Path) -> bool:
    """Drop a folder's files from the page cache; False where the OS cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


def _sizes(gallery: Gallery, size: int) -> dict[str, float]:
    records = (gallery.directory / RECORDS_LOG).stat().st_size
    thumbs = (gallery.directory / thumbs_log_name(gallery.key_id)).stat().st_size
    return {
        "records_bytes_per_face": round(records / size, 1),
        "thumbnail_bytes_per_face": round(thumbs / size, 1),
        "bytes_per_face": round((records + thumbs) / size, 1),
    }


def _seconds(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _cpu_seconds(action: Callable[[], object]) -> float:
    started = time.process_time()
    action()
    return time.process_time() - started


def run(
    size: int,
    *,
    baseline: bool = True,
    repeat: int = REPEAT,
    cold: bool = True,
    seed: int = 0,
    model: TemplateModel | None = None,
    data: Path | None = None,
    workdir: Path | None = None,
) -> dict[str, object]:
    """Build, compact and open a gallery of ``size`` faces (see the module docstring).

    ``baseline``: also open the gallery as single records before compacting it (at 1M this
    takes a while). ``model``: a fitted TemplateModel, else the search bench's cached one
    (fitted from the LFW dev images under ``data`` when there is no cache yet)."""
    if size < 1:
        raise BadInputError("--size must be at least 1")
    home = Path(os.environ.get("EDGEID_HOME", "var"))
    if model is None:
        model = template_model(data, home / "models", home / "cache" / GENERATOR_CACHE)
    rng = np.random.default_rng(seed)
    vectors, people, _ = model.sample(size, rng)
    result: dict[str, object] = {"size": size, "subjects": len(np.unique(people))}
    with tempfile.TemporaryDirectory(prefix="edgeid-open-bench-", dir=workdir) as folder:
        state = Path(folder)
        with _store(state) as store:
            gallery = store.create_gallery(GALLERY_NAME)
            result["build_s"] = round(_seconds(lambda: build(gallery, vectors, people, rng)), 2)
            del gallery
        if baseline:
            open_s, cpu_s, store, gallery = _timed_open(state)
            result["baseline"] = {
                "format": "one sealed record per subject and face",
                "open_s": round(open_s, 3),
                "open_cpu_s": round(cpu_s, 3),
                "us_per_face": round(1e6 * open_s / size, 2),
                **_sizes(gallery, size),
            }
        else:
            store = _store(state)
            gallery = store.open_gallery(GALLERY_NAME)
        result["compact_s"] = round(_seconds(gallery.compact), 2)
        store.close()
        del store, gallery

        opens, cpus = [], []
        for _ in range(max(1, repeat)):
            open_s, cpu_s, store, gallery = _timed_open(state)
            opens.append(open_s)
            cpus.append(cpu_s)
            if len(opens) < repeat:
                store.close()
                del store, gallery
        open_s = statistics.median(opens)
        batched: dict[str, object] = {
            "format": "batch records (columns + embeddings), written by compaction",
            "open_s": round(open_s, 3),
            "open_cpu_s": round(statistics.median(cpus), 3),
            "open_s_all": [round(s, 3) for s in opens],
            "us_per_face": round(1e6 * open_s / size, 2),
            **_sizes(gallery, size),
        }
        started = time.perf_counter()
        ids, matrix = gallery.embeddings(EMBEDDER_MODEL)
        batched["embeddings_s"] = round(time.perf_counter() - started, 3)
        info = gallery.info()
        if (info.faces, info.subjects) != (size, result["subjects"]) or not np.array_equal(
            matrix, vectors
        ):
            raise AssertionError("the opened gallery differs from what was enrolled")
        probe = ids[:: max(1, size // LOOKUPS)][:LOOKUPS]
        started = time.perf_counter()
        for face_id in probe:
            gallery.face(face_id)
        batched["face_lookup_us"] = round(1e6 * (time.perf_counter() - started) / len(probe), 2)
        if gallery.thumbnail(ids[-1]) != thumbnail_jpeg():
            raise AssertionError("a thumbnail differs from what was enrolled")
        del ids, matrix
        batched["all_faces_cpu_s"] = round(_cpu_seconds(gallery.faces), 3)
        store.close()
        del store, gallery
        if cold and _evict(state):
            cold_s, _, store, gallery = _timed_open(state)
            batched["cold_open_s"] = round(cold_s, 3)
            store.close()
            del store, gallery
        result["batched"] = batched

    if baseline:
        base = result["baseline"]
        assert isinstance(base, dict)
        result["ratio_vs_baseline"] = round(base["open_s"] / open_s, 1)
        result["cpu_ratio_vs_baseline"] = round(base["open_cpu_s"] / statistics.median(cpus), 1)
        result["baseline_note"] = "the same gallery before compaction, opened in this process"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result["cpu_count"] = os.cpu_count()
    result["load_average_1m"] = round(load, 2) if load is not None else None
    result["generator"] = (
        f"identity-cluster Gaussian fitted to LFW dev templates (embedder sha256 "
        f"{model.source_sha256[:12]}…)"
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--no-baseline", action="store_true", help="skip the single-record open")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-cache open")
    parser.add_argument("--repeat", type=int, default=REPEAT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=None, help="LFW dev, if nothing is cached")
    parser.add_argument("--workdir", type=Path, default=None, help="where the gallery is built")
    args = parser.parse_args()
    result = run(
        args.size,
        baseline=not args.no_baseline,
        repeat=args.repeat,
        cold=not args.no_cold,
        seed=args.seed,
        data=args.data,
        workdir=args.workdir,
    )
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
