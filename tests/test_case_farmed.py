"""A farmed ingest's own logic, without Ray: a farm that analyses in this process with the
cluster node's code (``FaceNode.analyse``) and hands results back late and out of order, as
several nodes do. Images and videos (a whole one and a cut-short one) must come out as the
local ingest writes them: the same files, the same faces with their frame numbers and times,
in the same order within each video, the same clusters. The real Ray cluster is
tests/test_cluster_ingest.py; this one runs in seconds and can be made to reorder at will."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_case_ingest import CASE, make_home, request, service
from test_case_ingest import cast as cast
from test_case_ingest import pipeline as pipeline
from test_case_video import FPS, write_video

from edgeid.runtime.cases import local_farm
from edgeid.runtime.cases.farmed import FrameJob, ImageResult, Job
from edgeid.runtime.cases.ingest import IngestProgress
from edgeid.runtime.cases.store import Case
from edgeid.runtime.cluster.node import FaceNode
from edgeid.runtime.inference.activity import InferenceLimits
from edgeid.runtime.inference.pipeline import FacePipeline


class LateFarm:
    """Holds ``window`` jobs; when full, analyses them and returns them last first."""

    def __init__(self, pipe: FacePipeline, window: int) -> None:
        self.node = FaceNode.__new__(FaceNode)
        self.node.pipeline = pipe  # the node's code over this process's loaded models
        self.node.limits = InferenceLimits()  # the local ingest's, two photos at once
        self.window = window
        self.held: list[Job] = []
        self.frames = 0
        self.images = 0
        self.out_of_order = 0  # results returned before one submitted earlier

    def submit(self, job: Job) -> list[ImageResult]:
        self.held.append(job)
        return self.drain() if len(self.held) >= self.window else []

    def forget(self) -> None:
        self.held = []

    def drain(self) -> list[ImageResult]:
        batch, self.held = self.held, []
        self.frames += sum(1 for j in batch if isinstance(j, FrameJob))
        self.images += sum(1 for j in batch if not isinstance(j, FrameJob))
        self.out_of_order += max(len(batch) - 1, 0)
        return list(reversed(self.node.analyse(batch)))

    def nodes(self) -> list[dict[str, object]]:
        return []


@pytest.fixture(scope="module")
def folder(
    tmp_path_factory: pytest.TempPathFactory, cast: tuple[dict[str, list[Path]], list[Path]]
) -> Path:
    """Photos before and after two videos (sorted by name: the order they are read in), so
    images are in the farm when a video starts and come back while it is being written."""
    root = tmp_path_factory.mktemp("farmed") / "media"
    root.mkdir()
    pairs, singles = cast
    people = list(pairs.values())
    shutil.copy(people[0][0], root / "a1.jpg")
    shutil.copy(people[1][0], root / "a2.jpg")
    shutil.copy(people[2][0], root / "a3.jpg")
    frames = [
        np.asarray(Image.open(p).convert("RGB"))[:248, :248].copy()
        for p in (people[0][1], people[1][1], people[3][0])
    ]
    write_video(root / "b_clip.mp4", [f for f in frames for _ in range(FPS)])
    long_clip = write_video(
        root.parent / "long.mkv", [f for f in frames * 3 for _ in range(FPS)], container="matroska"
    )
    (root / "c_cut.mkv").write_bytes(long_clip.read_bytes()[: long_clip.stat().st_size // 2])
    shutil.copy(people[3][1], root / "d.jpg")
    shutil.copy(people[0][0], root / "e_dup.jpg")
    shutil.copy(singles[0], root / "f.jpg")
    return root


Seen = dict[str, list[tuple[tuple[int, int, int, int], int | None, float | None, float, object]]]


def seen(case: Case) -> tuple[dict[str, object], Seen, set[frozenset[tuple[str, int]]]]:
    """Files by first name; faces by file hash in the case's own order; clusters."""
    files: dict[str, object] = {
        f.names[0]: (f.media, f.status, f.reason, f.frames, f.faces, sorted(f.names))
        for f in case.files()
    }
    faces: Seen = {}
    where: dict[str, tuple[str, int]] = {}
    for f in case.faces():
        found = faces.setdefault(f.file_sha256, [])
        where[f.face_id] = (f.file_sha256, len(found))
        found.append((f.box, f.frame, f.time_s, f.quality, f.embedding))
    results = case.results()
    assert results is not None
    clusters = {frozenset(where[i] for i in c.face_ids) for c in results.clusters}
    return files, faces, clusters


@pytest.fixture(scope="module")
def local(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, pipeline: FacePipeline, folder: Path
) -> tuple[tuple[dict[str, object], Seen, set[frozenset[tuple[str, int]]]], IngestProgress]:
    """The ingest that analyses one photo or frame at a time, on this box."""
    home = make_home(tmp_path_factory.mktemp("local"), models_dir)
    with service(home, pipeline, streams=1) as cases:
        outcome = cases.ingest(request(folder, galleries=(), frame_interval_s=1.0))
        assert outcome.run.status == "complete"
        return seen(outcome.case), outcome.progress


def test_an_ingest_on_two_streams_writes_exactly_what_one_stream_writes(
    tmp_path: Path,
    models_dir: Path,
    pipeline: FacePipeline,
    folder: Path,
    local: tuple[tuple[dict[str, object], Seen, set[frozenset[tuple[str, int]]]], IngestProgress],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The box's default (inference.ingest_streams = 2): photos and frames analysed two at a
    time on the local farm's threads, written in the order of the files, the same case."""
    running, most, threads = [0], [0], set()
    lock = threading.Lock()
    real = local_farm.analyse_job

    def watched(*args: Any, **kwargs: Any) -> ImageResult:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            threads.add(threading.current_thread().name)
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(local_farm, "analyse_job", watched)
    with service(make_home(tmp_path, models_dir), pipeline) as cases:
        assert cases.galleries.activity.limits.ingest_streams == 2
        outcome = cases.ingest(request(folder, galleries=(), frame_interval_s=1.0))
        assert outcome.run.status == "complete"
        got = seen(outcome.case)
    want, local_progress = local
    assert got[0] == want[0] and got[2] == want[2]
    assert got[1].keys() == want[1].keys()
    for sha, expected in want[1].items():
        assert [f[:3] for f in got[1][sha]] == [f[:3] for f in expected]
        for (*_, q1, t1), (*_, q2, t2) in zip(got[1][sha], expected, strict=True):
            assert q1 == q2 and np.array_equal(t1, t2)  # type: ignore[arg-type]
    assert vars(outcome.progress) == vars(local_progress)
    assert threads == {"ingest-stream_0", "ingest-stream_1"} and most[0] == 2


@pytest.mark.parametrize("window", [1, 2, 7])
def test_a_farmed_ingest_writes_images_and_video_frames_as_the_local_one(
    tmp_path: Path,
    models_dir: Path,
    pipeline: FacePipeline,
    folder: Path,
    local: tuple[tuple[dict[str, object], Seen, set[frozenset[tuple[str, int]]]], IngestProgress],
    window: int,
) -> None:
    want, local_progress = local
    farm = LateFarm(pipeline, window)
    with service(make_home(tmp_path, models_dir), pipeline) as cases:
        farmed = cases.ingest(request(folder, galleries=(), frame_interval_s=1.0), farm=farm)
        assert farmed.run.status == "complete"
        got = seen(farmed.case)
    files, faces, clusters = want
    assert files["b_clip.mp4"] == ("video", "done", None, 3, 3, ["b_clip.mp4"])
    assert files["c_cut.mkv"][:2] == ("video", "partial")  # type: ignore[index]
    assert got[0] == files
    assert got[2] == clusters
    assert got[1].keys() == faces.keys()
    for sha, expected in faces.items():
        # In the case's order: a video's faces frame by frame, whatever order they came back in.
        assert [(b, n, t) for b, n, t, *_ in got[1][sha]] == [(b, n, t) for b, n, t, *_ in expected]
        for (*_, q1, t1), (*_, q2, t2) in zip(got[1][sha], expected, strict=True):
            assert abs(q1 - q2) < 1e-6 and float(t1 @ t2) > 0.99999  # type: ignore[operator]
    assert farm.images == 5  # a1-a3, d, f: e_dup is a1's content, never sent
    assert farm.frames == farmed.progress.video_frames == local_progress.video_frames > 3
    assert farmed.progress.faces_new == local_progress.faces_new
    if window > 1:
        assert farm.out_of_order > 0


def test_a_run_stopped_inside_a_farmed_video_drops_it_whole_and_resumes(
    tmp_path: Path,
    models_dir: Path,
    pipeline: FacePipeline,
    folder: Path,
    local: tuple[tuple[dict[str, object], Seen, set[frozenset[tuple[str, int]]]], IngestProgress],
) -> None:
    """Stopped at the video's first frame, with an image back but held (its file would be
    written inside the video's, which the stop rolls back): nothing half-written stays, on
    disk or in memory, and the next run finishes as the local ingest."""
    stop = threading.Event()

    def progress(p: IngestProgress) -> None:
        if p.video_frames >= 1:
            stop.set()

    home = make_home(tmp_path, models_dir)
    farm = LateFarm(pipeline, 2)  # a1, a2 back together; then a3 with the video's first frame
    with service(home, pipeline) as cases:
        first = cases.ingest(
            request(folder, galleries=(), frame_interval_s=1.0), progress=progress, stop=stop,
            farm=farm,
        )  # fmt: skip
        assert first.run.status == "stopped"
        assert {f.names[0] for f in first.case.files()} == {"a1.jpg", "a2.jpg"}
        second = cases.ingest(request(folder, galleries=(), frame_interval_s=1.0), farm=farm)
        assert second.run.status == "complete"
        assert second.progress.files_already_done == 2
    with service(home, pipeline) as cases:  # as written on disk
        got = seen(cases.store.find(CASE))
    want, _ = local
    assert got[0] == want[0] and got[2] == want[2]


def test_a_node_loads_with_its_own_inference_settings(
    tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node's edgeid.toml sets its precision and how many photos it analyses at once; the
    owning box's limits set what is analysed (the same faces wherever a file goes)."""
    if not (models_dir / "dlib_resnet_v1_int8.manifest.json").is_file():
        pytest.skip("the INT8 embedder is not built here (make setup builds it from ../shared)")
    home = make_home(tmp_path, models_dir)
    (home / "edgeid.toml").write_text(
        '[inference]\nprecision = "int8-embedder"\ningest_streams = 3\n'
        "max_large_running_jobs = 1\nmax_working_pixels = 400000\n"
    )
    monkeypatch.setenv("EDGEID_HOME", str(home))
    node = FaceNode("mtcnn", max_working_pixels=1_000_000, max_faces=7)
    try:
        assert node.pipeline.embedder is not None
        assert node.pipeline.embedder.model_id == "dlib_resnet_v1_int8"
        assert node.limits.ingest_streams == 3 and node.limits.max_large_running == 1
        assert (node.limits.max_working_pixels, node.limits.max_faces) == (1_000_000, 7)
    finally:
        node.pipeline.close()
