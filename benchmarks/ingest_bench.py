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

The ingests run as the box runs them, ``inference.ingest_streams`` (2) photos or frames at
once; the baseline analyses one at a time. ``--streams-ab N`` also ingests the same files one
at a time and N at once, alternating ``--repeat`` times, and reports each pair's ratio.

``--cluster [HOST:PORT]``: the same images and video also ingested on a Ray cluster
(``edgeid case ingest --cluster``), alternating with local ingests ``--repeat`` times (other
jobs' load drifts; the pairs are reported one by one and their median ratio). Without an
address the benchmark starts a one-node cluster on this machine (``edgeid cluster head
--work``, TLS under a throwaway site CA) and stops it at the end. Reported for the cluster:
images/s and video frames/s, the ratio to the local ingest of the same run, each node's rate,
and the owning box's own share per file: its CPU time while reading (listing, hashing,
deduplicating, sending batches, receiving faces, writing them into the case: its process
does nothing else then), the case store's part of it (wall time in the store's writes), and
clustering and searching per file. ``owner_limit_files_per_s`` (1000 / that share) is the rate
at which one owning box saturates however many nodes it has.

    python -m benchmarks.ingest_bench --data ../shared/data --models var/models
    python -m benchmarks.ingest_bench --data ../shared/data --limit 60 --cluster --repeat 2
    python -m benchmarks.ingest_bench --data ../shared/data --streams-ab 2 --repeat 4
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from edgeid.runtime.audit import AuditLog
from edgeid.runtime.cases.analysis import analyse_pixels
from edgeid.runtime.cases.farmed import ImageFarm
from edgeid.runtime.cases.ingest import IngestProgress, IngestRequest, Requester
from edgeid.runtime.cases.records import SourceFile
from edgeid.runtime.cases.service import CaseService
from edgeid.runtime.cases.store import Case, CaseStore, FileWrite, NewFace
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
    """Seconds (wall, and this process's CPU) spent in each ingest phase, from the progress
    callback's phase changes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self._phase: str | None = None
        self._since = time.perf_counter()
        self._cpu_since = time.process_time()
        self.last = IngestProgress()

    def __call__(self, progress: IngestProgress) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        if progress.phase != self._phase:
            if self._phase is not None:
                self.seconds[self._phase] = self.seconds.get(self._phase, 0.0) + now - self._since
                self.cpu_seconds[self._phase] = (
                    self.cpu_seconds.get(self._phase, 0.0) + cpu - self._cpu_since
                )
            self._phase, self._since, self._cpu_since = progress.phase, now, cpu
        self.last = IngestProgress(**vars(progress))


class StoreTimer:
    """Wall seconds inside the case store's writes (a file with its faces, a video's faces,
    another name), timed by wrapping those methods for the benchmark's run only."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0

    def _timed(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._depth += 1
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:  # add_file calls add_faces: counted once
                    self.seconds += time.perf_counter() - started

        return timed

    @contextmanager
    def on(self) -> Iterator[StoreTimer]:
        patched = [(Case, "add_file"), (Case, "add_name"), (FileWrite, "add_faces")]
        originals = [(owner, name, getattr(owner, name)) for owner, name in patched]
        try:
            for owner, name, method in originals:
                setattr(owner, name, self._timed(method))
            yield self
        finally:
            for owner, name, method in originals:
                setattr(owner, name, method)


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
) -> dict[str, Any]:
    phases = Phases()
    started = time.perf_counter()
    request = IngestRequest(
        folder, number, REASON, Requester("bench"), galleries=("bench",), children=False
    )  # LFW: adults
    with StoreTimer().on() as store:
        outcome = cases.ingest(request, progress=phases, farm=farm)
    total = time.perf_counter() - started
    p = outcome.progress
    reading = phases.seconds.get("reading", 0.0)
    files = max(p.files_total, 1)
    after_reading = phases.seconds.get("clustering", 0.0) + phases.seconds.get("searching", 0.0)
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
        # This process's share: its CPU while reading (with a farm: no analysis in it), the
        # store's wall time within the run, clustering and searching; all per file.
        "owner_ms_per_file": {
            "reading_cpu": round(1000 * phases.cpu_seconds.get("reading", 0.0) / files, 2),
            "store": round(1000 * store.seconds / files, 2),
            "clustering_and_searching": round(1000 * after_reading / files, 2),
        },
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


def own_address() -> str:
    """The address Ray gives a node of this machine (it never binds one to loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 80))  # a UDP "connect" sends nothing
        return str(probe.getsockname()[0])


def throwaway_site(folder: Path, ip: str) -> Path:
    """A site CA and a node certificate for ``ip`` made by provisioning's key and CSR code,
    as a provisioned box holds them (cluster-ca.crt, cluster.crt, cluster.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from edgeid.provisioning.certificates import CertRequest, ensure_key, make_csr

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "benchmark site CA")])
    valid = (now - dt.timedelta(hours=1), now + dt.timedelta(days=1))
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid[0]).not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key, _ = ensure_key(folder / "cluster.key")
    csr = x509.load_pem_x509_csr(make_csr(key, CertRequest("node", "server", ("localhost",), ())))
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(ip))]
    usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (
        x509.CertificateBuilder().subject_name(csr.subject).issuer_name(ca_name)
        .public_key(csr.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid[0]).not_valid_after(valid[1])
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    (folder / "cluster-ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "cluster.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return folder


@contextmanager
def one_node_cluster(root: Path, models: Path) -> Iterator[tuple[str, Path]]:
    """`edgeid cluster head --work` on this machine: (its address, its TLS folder)."""
    from edgeid.runtime.web.tls import TLS_DIR

    home = root / "node"
    home.mkdir()
    (home / "models").symlink_to(models.resolve())
    ip = own_address()
    tls = throwaway_site(home / TLS_DIR, ip)
    head, port = _start_head(home, ip, root / "head.log")
    try:
        yield f"{ip}:{port}", tls
    finally:
        _stop(head)


def _start_head(home: Path, ip: str, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """The head on a free port; tried anew on another port when it fails to start (another
    process on this shared machine may take the port between choosing and binding it)."""
    for attempt in range(3):
        with socket.socket() as free:
            free.bind((ip, 0))
            port = int(free.getsockname()[1])
        with log.open("wb") as out:
            head = subprocess.Popen(
                [sys.executable, "-m", "edgeid", "cluster", "head", "--home", str(home),
                 "--ip", ip, "--port", str(port), "--work",
                 "--object-store-bytes", str(256 << 20)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 120
        while head.poll() is None:  # the farm waits for the node; Ray's client for the head
            try:
                socket.create_connection((ip, port), timeout=1).close()
                return head, port
            except OSError:
                if time.monotonic() > deadline:
                    _stop(head)
                    raise RuntimeError("the head did not open its port in 120 s") from None
                time.sleep(1)
        logger.warning("the head did not start (try %d): %s", attempt + 1, log.read_text()[-500:])
        _stop(head)
    raise RuntimeError(f"the head did not start: {log.read_text()[-2000:]}")


def _stop(head: subprocess.Popen[bytes]) -> None:
    if head.poll() is None:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)  # what Ray started in its group
    head.wait()


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


class _TimedWait:
    """The farm's ``ray`` with ``wait`` timed: the owning box's time blocked on the nodes."""

    def __init__(self, ray: Any) -> None:
        self._ray = ray
        self.seconds = 0.0

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return self._ray.wait(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ray, name)


def _on_cluster(cases: CaseService, folder: Path, number: str, farm: ImageFarm) -> dict[str, Any]:
    """``_ingest`` on the farm, with the owning box's busy time: the reading phase less the
    time it was blocked waiting for nodes (what is left is its own work, done in order)."""
    ray_farm: Any = farm  # a RayFarm: its ray module is swapped for the timed one
    waits = _TimedWait(ray_farm._ray)
    ray_farm._ray = waits
    try:
        result = _ingest(cases, folder, number, farm)
    finally:
        ray_farm._ray = waits._ray
    files = max(int(result["files"]), 1)
    share = result["owner_ms_per_file"]
    busy = 1000 * (float(result["seconds"].get("reading", 0.0)) - waits.seconds) / files
    share["busy_while_reading"] = round(busy, 2)
    share["waiting_for_nodes"] = round(1000 * waits.seconds / files, 2)
    whole = busy + float(share["clustering_and_searching"])
    share["total"] = round(whole, 2)
    result["owner_limit_files_per_s"] = round(1000 / whole, 1) if whole > 0 else None
    return result


def _ratio(a: object, b: object) -> float | None:
    return round(float(a) / float(b), 3) if a and b else None  # type: ignore[arg-type]


def _pair(
    order: tuple[object, ...],
    names: tuple[str, str],
    base: tuple[dict[str, Any], dict[str, Any]],
    other: tuple[dict[str, Any], dict[str, Any]],
) -> dict[str, Any]:
    """One A/B pair's figures: ``base`` and ``other`` are (photos ingest, video ingest), named
    by ``names``; the ratios are other over base."""
    (a, a_video), (b, b_video) = base, other
    return {
        "order": list(order),
        "load_average_1min": round(os.getloadavg()[0], 2),
        f"{names[0]}_images_per_s": a["files_per_s"],
        f"{names[1]}_images_per_s": b["files_per_s"],
        "ratio": _ratio(b["files_per_s"], a["files_per_s"]),
        f"{names[0]}_video_frames_per_s": a_video["video_frames_per_s"],
        f"{names[1]}_video_frames_per_s": b_video["video_frames_per_s"],
        "video_ratio": _ratio(b_video["video_frames_per_s"], a_video["video_frames_per_s"]),
        "same_faces": (a["faces"], b["faces"]),
        "same_video_faces": (a_video["faces"], b_video["faces"]),
    }


def _medians(pairs: list[dict[str, Any]]) -> dict[str, float | None]:
    ratios = [p["ratio"] for p in pairs if p["ratio"] is not None]
    video = [p["video_ratio"] for p in pairs if p["video_ratio"] is not None]
    return {
        "median_ratio": round(statistics.median(ratios), 3) if ratios else None,
        "median_video_ratio": round(statistics.median(video), 3) if video else None,
    }


def _pairs(
    cases: CaseService,
    images: Path,
    videos: Path,
    farm: ImageFarm,
    repeat: int,
) -> dict[str, Any]:
    """Local and cluster ingests of the same files, alternating which goes first."""
    pairs = []
    done: dict[str, int] = {}  # per node: images done before this pair's cluster ingest
    for i in range(repeat):
        runs: dict[str, dict[str, Any]] = {}
        order = ("local", "cluster") if i % 2 == 0 else ("cluster", "local")
        for where in order:
            if where == "local":
                runs["local"] = _ingest(cases, images, f"BENCH-LOCAL-{i}")
                runs["local_video"] = _ingest(cases, videos, f"BENCH-LOCAL-VIDEO-{i}")
            else:
                runs["cluster"] = _on_cluster(cases, images, f"BENCH-CLUSTER-{i}", farm)
                reading = float(runs["cluster"]["seconds"].get("reading", 0.0))
                now = {str(n["node"]): int(n["files"]) for n in runs["cluster"]["nodes"]}
                runs["node_images_per_s"] = {
                    node: round((files - done.get(node, 0)) / reading, 2) if reading else None
                    for node, files in now.items()
                }
                done = now
                runs["cluster_video"] = _on_cluster(cases, videos, f"BENCH-CLUSTER-VIDEO-{i}", farm)
        remote = runs["cluster"]
        local = (runs["local"], runs["local_video"])
        pairs.append(
            _pair(order, ("local", "cluster"), local, (remote, runs["cluster_video"]))
            | {
                "local_owner_ms_per_file": runs["local"]["owner_ms_per_file"],
                "cluster_owner_ms_per_file": remote["owner_ms_per_file"],
                "owner_limit_files_per_s": remote["owner_limit_files_per_s"],
                "node_images_per_s": runs["node_images_per_s"],
            }
        )
    limits = [p["owner_limit_files_per_s"] for p in pairs if p["owner_limit_files_per_s"]]
    return {
        "pairs": pairs,
        **_medians(pairs),
        "median_owner_limit_files_per_s": round(statistics.median(limits), 1) if limits else None,
    }


def _streams_pairs(
    cases: CaseService, images: Path, videos: Path, streams: int, repeat: int
) -> dict[str, Any]:
    """Ingests of the same files one photo at a time and ``streams`` at once (the local farm),
    alternating which goes first; per pair images/s, video frames/s and their ratios."""
    activity = cases.galleries.activity
    box = activity.limits
    pairs = []
    try:
        for i in range(repeat):
            runs: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
            order = (1, streams) if i % 2 == 0 else (streams, 1)
            for count in order:
                activity.limits = dataclasses.replace(box, ingest_streams=count)
                runs[count] = (
                    _ingest(cases, images, f"BENCH-STREAMS-{count}-{i}"),
                    _ingest(cases, videos, f"BENCH-STREAMS-VIDEO-{count}-{i}"),
                )
            pairs.append(_pair(order, ("one_stream", "streams"), runs[1], runs[streams]))
    finally:
        activity.limits = box
    return {"streams": streams, "pairs": pairs, **_medians(pairs)}


HERE = "here"  # --cluster without an address: a one-node cluster started on this machine


def run(
    data: Path,
    models: Path,
    *,
    limit: int = LFW_LIMIT,
    cluster: str | None = None,
    cluster_tls: Path | None = None,
    repeat: int = 1,
    streams_ab: int | None = None,
) -> dict[str, object]:
    """``streams_ab``: also ingest one photo at a time against that many at once, ``repeat``
    pairs (the main figures are the box's default, ``inference.ingest_streams``)."""
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
            ingest_streams = cases.galleries.activity.limits.ingest_streams
            load_before = os.getloadavg()[0]
            # Baseline before and after the ingests, averaged: other jobs' load drifts.
            before = _baseline(pipeline, images, videos)
            ingest_images = _ingest(cases, images, "BENCH-IMAGES")
            ingest_video = _ingest(cases, videos, "BENCH-VIDEO")
            on_cluster = None
            if cluster is not None:
                limits = cases.galleries.activity.limits  # the local ingest's, for the same faces
                with contextlib.ExitStack() as stack:
                    if cluster == HERE:
                        address, tls_dir = stack.enter_context(one_node_cluster(root, models))
                    else:
                        address, tls_dir = cluster, cluster_tls or models.parent / "tls"
                    farm = stack.enter_context(_farm(address, tls_dir, pipeline, limits))
                    on_cluster = _pairs(cases, images, videos, farm, repeat)
            streams = None
            if streams_ab is not None:
                streams = _streams_pairs(cases, images, videos, streams_ab, repeat)
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
        "ingest_streams": ingest_streams,
        "images": {**ingest_images, "images_per_s": images_per_s},
        "video": ingest_video,
        "baseline": baseline,
        "baseline_note": "decode + the same pipeline calls on the same files, nothing stored",
        "store_only": store_cost,
        **({"cluster": on_cluster} if on_cluster is not None else {}),
        **({"streams": streams} if streams is not None else {}),
        "ratio_vs_baseline": _ratio(images_per_s, baseline["images_per_s"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", type=Path, default=Path("var/models"))
    parser.add_argument("--limit", type=int, default=LFW_LIMIT, help="LFW images to ingest")
    parser.add_argument(
        "--cluster", metavar="HOST:PORT", nargs="?", const=HERE,
        help="also ingest on this Ray cluster (no address: a one-node cluster started here)",
    )  # fmt: skip
    parser.add_argument(
        "--cluster-tls", type=Path, help="folder with cluster-ca.crt, cluster.crt, cluster.key"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="local/cluster pairs, alternating which goes first"
    )
    parser.add_argument(
        "--streams-ab", type=int, metavar="N",
        help="also ingest one photo at a time against N at once, --repeat pairs",
    )  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = run(
        args.data, args.models, limit=args.limit, cluster=args.cluster,
        cluster_tls=args.cluster_tls, repeat=args.repeat, streams_ab=args.streams_ab,
    )  # fmt: skip
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
