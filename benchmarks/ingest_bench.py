"""Case ingest throughput on this machine, beside the bare face pipeline on the same media.

Media, built in a temporary folder from the shared data: the first ``--limit`` LFW dev images
(250x250, one face near the centre, sometimes more at the edges), the 16 scene images (up to
1366x768, several faces each) and one video made here from LFW photos (248x248, 25 fps, one
photo a second, ``VIDEO_SECONDS`` long; sampled at the default one frame a second). The box
holds one gallery of ``ENROLLED`` LFW subjects, so every cluster is really searched (and
audited).

Ingest: ``CaseService.ingest`` end to end (hashing, safe decoding, detection, quality,
embedding, encrypted durable writes, clustering, searches, audit records). Baseline, in the
same process on the same files: decode and the same pipeline calls only, nothing stored,
run before and after the ingests and averaged (other jobs' load drifts; the 1-minute load
average is reported beside the figures).
``ratio_vs_baseline`` is ingest images/s over baseline images/s (1.0: the case machinery
costs nothing). ``store_only`` times the case store alone (``STORE_FILES`` files of two faces
each, sealed and written durably) to show what of any gap is storage.

    python -m benchmarks.ingest_bench --data ../shared/data --models var/models
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import av
import numpy as np
from PIL import Image

from edgeid.runtime.audit import AuditLog
from edgeid.runtime.cases.analysis import analyse_pixels
from edgeid.runtime.cases.farmed import ImageFarm
from edgeid.runtime.cases.ingest import IngestProgress, IngestRequest, Requester
from edgeid.runtime.cases.records import SourceFile
from edgeid.runtime.cases.service import CaseService
from edgeid.runtime.cases.store import CaseStore, NewFace
from edgeid.runtime.cases.video import DEFAULT_FRAME_INTERVAL_S, sample_frames
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.gallery.service import GalleryService
from edgeid.runtime.gallery.store import GalleryStore
from edgeid.runtime.inference.activity import InferenceLimits
from edgeid.runtime.inference.image_decode import decode_image
from edgeid.runtime.inference.pipeline import DEFAULT_DETECTOR, EMBEDDER_MODEL, FacePipeline
from edgeid.runtime.vault.keys import KeyFileProvider

logger = logging.getLogger(__name__)

LFW_LIMIT = 200  # LFW images ingested: ~20 s at the pipeline's speed on 2 cores
VIDEO_SECONDS = 30
VIDEO_FPS = 25
ENROLLED = 50  # subjects in the searched gallery
STORE_FILES = 200  # files written to a case with no pipeline: the store's own cost
REASON = "ingest benchmark on public research images"


def _video(path: Path, photos: list[Path]) -> Path:
    frames = [np.asarray(Image.open(p).convert("RGB"))[:248, :248].copy() for p in photos]
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=VIDEO_FPS)
        assert isinstance(stream, av.VideoStream)
        stream.width = stream.height = 248
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for _ in range(VIDEO_FPS):
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def build_media(data: Path, root: Path, limit: int) -> tuple[Path, Path, list[Path]]:
    """(images folder, video folder, photos to enrol)."""
    lfw = sorted((data / "lfw-dev" / "images").glob("*/*.jpg"))
    images = root / "images"
    images.mkdir()
    for photo in lfw[:limit]:
        shutil.copy(photo, images / f"{photo.parent.name}-{photo.name}")
    for scene in sorted((data / "scenes").glob("*/*.jpg")):
        shutil.copy(scene, images / f"scene-{scene.name}")
    videos = root / "videos"
    videos.mkdir()
    _video(videos / "clip.mp4", lfw[limit : limit + VIDEO_SECONDS])
    return images, videos, lfw[limit + VIDEO_SECONDS :]


class Phases:
    """Seconds spent in each ingest phase, from the progress callback's phase changes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._phase: str | None = None
        self._since = time.perf_counter()
        self.last = IngestProgress()

    def __call__(self, progress: IngestProgress) -> None:
        now = time.perf_counter()
        if progress.phase != self._phase:
            if self._phase is not None:
                self.seconds[self._phase] = self.seconds.get(self._phase, 0.0) + now - self._since
            self._phase, self._since = progress.phase, now
        self.last = IngestProgress(**vars(progress))


@contextmanager
def _service(home: Path, pipeline: FacePipeline) -> Iterator[CaseService]:
    with (
        GalleryService.open(home, pipeline=pipeline) as galleries,
        AuditLog.open(home, galleries.store.keyring) as audit,
        CaseService(home, galleries, audit, detector=DEFAULT_DETECTOR) as cases,
    ):
        yield cases


def _ingest(
    cases: CaseService, folder: Path, number: str, farm: ImageFarm | None = None
) -> dict[str, object]:
    phases = Phases()
    started = time.perf_counter()
    request = IngestRequest(
        folder, number, REASON, Requester("bench"), galleries=("bench",), children=False
    )  # LFW: adults
    outcome = cases.ingest(request, progress=phases, farm=farm)
    total = time.perf_counter() - started
    p = outcome.progress
    reading = phases.seconds.get("reading", 0.0)
    return {
        "files": p.files_total,
        "faces": p.faces_new,
        "video_frames": p.video_frames,
        "clusters": p.clusters,
        "clusters_searched": p.clusters_searched,
        "seconds": {k: round(v, 2) for k, v in phases.seconds.items()} | {"total": round(total, 2)},
        "files_per_s": round(p.files_total / reading, 2) if reading else None,
        "faces_per_s": round(p.faces_new / reading, 2) if reading else None,
        "video_frames_per_s": round(p.video_frames / reading, 2) if reading else None,
    } | ({"nodes": p.nodes} if farm is not None else {})


def _baseline(pipeline: FacePipeline, images: Path, videos: Path) -> dict[str, object]:
    started = time.perf_counter()
    faces = 0
    paths = sorted(images.iterdir())
    for path in paths:
        faces += len(analyse_pixels(pipeline, decode_image(path.read_bytes())))
    image_s = time.perf_counter() - started
    started = time.perf_counter()
    frames = 0
    with open(videos / "clip.mp4", "rb") as stream:
        for frame in sample_frames(stream, DEFAULT_FRAME_INTERVAL_S):
            analyse_pixels(pipeline, frame.pixels)
            frames += 1
    video_s = time.perf_counter() - started
    return {
        "images": len(paths),
        "faces": faces,
        "images_per_s": round(len(paths) / image_s, 2),
        "faces_per_s": round(faces / image_s, 2),
        "video_frames_per_s": round(frames / video_s, 2),
    }


def _store_cost(home: Path, chip: bytes) -> dict[str, object]:
    """The case store alone: ms to write one file with two faces (seal, frame, fsync)."""
    rng = np.random.default_rng(0)
    with (
        GalleryStore(home, KeyFileProvider(home / "keys")) as galleries,
        CaseStore(home, galleries.keyring) as store,
    ):
        case = store.create("BENCH-STORE", created_by="bench", model_id=EMBEDDER_MODEL)
        started = time.perf_counter()
        for i in range(STORE_FILES):
            faces = []
            for _ in range(2):
                vector = rng.normal(size=128).astype(np.float32)
                unit = vector / np.linalg.norm(vector)
                faces.append(NewFace(unit, (0, 0, 100, 100), 1.0, 0.9, "pose", chip))
            sha = f"{i:064x}"
            case.add_file(SourceFile("", sha, (f"f{i}.jpg",), "image", "done", None, 0, 1), faces)
        seconds = time.perf_counter() - started
    return {"files": STORE_FILES, "ms_per_file": round(1000 * seconds / STORE_FILES, 2)}


@contextmanager
def _farm(
    cluster: str, tls_dir: Path, pipeline: FacePipeline, limits: InferenceLimits
) -> Iterator[ImageFarm]:
    from edgeid.runtime.cluster.farm import RayFarm
    from edgeid.runtime.cluster.tls import CA_FILE, CERT_FILE, KEY_FILE, ClusterTls

    assert pipeline.embedder is not None
    tls = ClusterTls(tls_dir / CA_FILE, tls_dir / CERT_FILE, tls_dir / KEY_FILE)
    with RayFarm(
        cluster, tls, detector=DEFAULT_DETECTOR, model_id=pipeline.embedder.model_id,
        max_working_pixels=limits.max_working_pixels, max_faces=limits.max_faces,
    ) as farm:  # fmt: skip
        yield farm


def run(
    data: Path,
    models: Path,
    *,
    limit: int = LFW_LIMIT,
    cluster: str | None = None,
    cluster_tls: Path | None = None,
) -> dict[str, object]:
    pipeline = FacePipeline.load(models, DEFAULT_DETECTOR)
    with tempfile.TemporaryDirectory(prefix="edgeid-ingest-bench-") as tmp:
        root = Path(tmp)
        images, videos, enrol = build_media(data, root, limit)
        home = root / "home"
        home.mkdir()
        (home / "models").symlink_to(models.resolve())
        with _service(home, pipeline) as cases:
            cases.galleries.create_gallery("bench")
            enrolled = 0
            for photo in enrol:
                if enrolled == ENROLLED:
                    break
                try:
                    cases.galleries.enroll(
                        "bench", display_name=f"subject {enrolled}", legal_basis="benchmark",
                        enrolled_by="bench", image_bytes=photo.read_bytes(), face_index=0,
                        allow_duplicate=True,
                    )  # fmt: skip
                except BadInputError:
                    continue  # below the enrolment quality gate: take the next photo
                enrolled += 1
            analyse_pixels(pipeline, decode_image(next(images.iterdir()).read_bytes()))  # warm-up
            load_before = os.getloadavg()[0]
            # Baseline before and after the ingests, averaged: other jobs' load drifts.
            before = _baseline(pipeline, images, videos)
            ingest_images = _ingest(cases, images, "BENCH-IMAGES")
            ingest_video = _ingest(cases, videos, "BENCH-VIDEO")
            on_cluster = None
            if cluster is not None:
                tls_dir = cluster_tls or models.parent / "tls"
                limits = cases.galleries.activity.limits  # the local ingest's, for the same faces
                with _farm(cluster, tls_dir, pipeline, limits) as farm:
                    on_cluster = _ingest(cases, images, "BENCH-CLUSTER", farm)
            after = _baseline(pipeline, images, videos)
            load_after = os.getloadavg()[0]
        chip = analyse_pixels(pipeline, decode_image(next(images.iterdir()).read_bytes()))
        store_cost = _store_cost(root / "store-only", chip[0].chip_jpeg)
    baseline = {
        key: round((float(before[key]) + float(after[key])) / 2, 2)  # type: ignore[arg-type]
        for key in before
    }
    images_per_s = ingest_images["files_per_s"]
    return {
        "detector": DEFAULT_DETECTOR,
        "load_average_1min": [round(load_before, 2), round(load_after, 2)],
        "images": {**ingest_images, "images_per_s": images_per_s},
        "video": ingest_video,
        "baseline": baseline,
        "baseline_note": "decode + the same pipeline calls on the same files, nothing stored",
        "store_only": store_cost,
        **(
            {
                "cluster": on_cluster,
                "cluster_ratio_vs_local": (
                    round(float(on_cluster["files_per_s"]) / float(images_per_s), 3)  # type: ignore[arg-type]
                    if images_per_s and on_cluster["files_per_s"]
                    else None
                ),
            }
            if on_cluster is not None
            else {}
        ),
        "ratio_vs_baseline": (
            round(float(images_per_s) / float(baseline["images_per_s"]), 3)  # type: ignore[arg-type]
            if images_per_s
            else None
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", type=Path, default=Path("var/models"))
    parser.add_argument("--limit", type=int, default=LFW_LIMIT, help="LFW images to ingest")
    parser.add_argument(
        "--cluster", metavar="HOST:PORT", help="also ingest the images on this Ray cluster"
    )
    parser.add_argument(
        "--cluster-tls", type=Path, help="folder with cluster-ca.crt, cluster.crt, cluster.key"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = run(
        args.data, args.models, limit=args.limit, cluster=args.cluster, cluster_tls=args.cluster_tls
    )
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
