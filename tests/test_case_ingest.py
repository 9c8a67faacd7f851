"""`edgeid case ...` end to end on real LFW photos and real videos made from them: folders,
zips and tars in; damaged and hostile files listed; duplicates; clusters that are people;
leads from a gallery, each search audited; resume after SIGKILL; report; purge."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_case_video import FPS, write_video

from edgeid.cli import main
from edgeid.runtime.audit import AuditAction, AuditLog
from edgeid.runtime.cases.ingest import (
    CLUSTER_BANDS,
    CLUSTER_FMR,
    IngestProgress,
    IngestRequest,
    Requester,
)
from edgeid.runtime.cases.jobs import IngestJob
from edgeid.runtime.cases.service import CaseService
from edgeid.runtime.cases.store import CASES_DIR, RECORDS_LOG, CaseStore
from edgeid.runtime.gallery.service import GalleryService
from edgeid.runtime.gallery.store import GalleryStore
from edgeid.runtime.gallery.thresholds import load_calibration
from edgeid.runtime.inference.activity import InferenceActivity, InferenceLimits
from edgeid.runtime.inference.image_decode import load_image
from edgeid.runtime.inference.pipeline import EMBEDDER_MODEL, FacePipeline
from edgeid.runtime.vault.framed_log import HEADER_BYTES
from edgeid.runtime.vault.keys import KeyFileProvider

CASE = "VID-2024/0173"
REASON = "seized phone of suspect, warrant W-17/2024"
PURGE_REASON = "case closed, retention period over"
HOSTILE = "<img src=x onerror=alert(1)>.jpg"
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Media:
    folder: Path
    people: dict[str, list[Path]]  # person -> photo files inside ``folder``
    singles: dict[str, Path]  # people with one photo in the folder
    failures: dict[str, str]  # file name -> a word its reason must contain


@pytest.fixture(scope="module")
def pipeline(models_dir: Path) -> FacePipeline:
    return FacePipeline.load(models_dir)


@pytest.fixture(scope="module")
def cast(lfw_dir: Path, pipeline: FacePipeline) -> tuple[dict[str, list[Path]], list[Path]]:
    """Four LFW people with two single-face photos that match well (so a correct engine must
    put them together, at the adult threshold and at the stricter one a case that may include
    children is clustered with), and two more people with one photo each, all far from each
    other."""
    calibration = load_calibration(EMBEDDER_MODEL)
    strict = max(
        calibration.band("adult").threshold(1e-5),
        calibration.for_age(CLUSTER_BANDS[True]).threshold(CLUSTER_FMR),
    )
    loose = calibration.band("adult").threshold(1e-2)
    pairs: dict[str, list[Path]] = {}
    singles: list[Path] = []
    chosen: list[np.ndarray] = []

    def template(path: Path) -> np.ndarray | None:
        faces = pipeline.embed(load_image(path))
        return faces[0].embedding if len(faces) == 1 else None

    def far(vectors: list[np.ndarray]) -> bool:
        return all(float(v @ c) < loose for v in vectors for c in chosen)

    for folder in sorted((lfw_dir / "images").iterdir()):
        photos = sorted(folder.glob("*.jpg"))
        if len(pairs) < 4 and len(photos) >= 2:
            vectors = [template(p) for p in photos[:2]]
            if all(v is not None for v in vectors) and float(vectors[0] @ vectors[1]) > strict:
                kept = [v for v in vectors if v is not None]
                if far(kept):
                    pairs[folder.name] = photos[:2]
                    chosen.extend(kept)
        elif len(singles) < 2 and len(photos) == 1:
            vector = template(photos[0])
            if vector is not None and far([vector]):
                singles.append(photos[0])
                chosen.append(vector)
        if len(pairs) == 4 and len(singles) == 2:
            return pairs, singles
    pytest.fail("LFW dev lacks the four well-matched pairs and two singles this test needs")


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def build_media(root: Path, cast: tuple[dict[str, list[Path]], list[Path]]) -> Media:
    pairs, singles = cast
    folder = root / "media"
    people: dict[str, list[Path]] = {}
    for person, photos in pairs.items():
        (folder / person).mkdir(parents=True)
        people[person] = [Path(shutil.copy(p, folder / person / p.name)) for p in photos]
    one = {singles[0].parent.name: Path(shutil.copy(singles[0], folder / singles[0].name))}
    one[singles[1].parent.name] = Path(shutil.copy(singles[1], folder / HOSTILE))
    (folder / "dup").mkdir()
    first = next(iter(people.values()))[0]
    shutil.copy(first, folder / "dup" / "copy_of_first.jpg")
    (folder / "broken.jpg").write_bytes(first.read_bytes()[: first.stat().st_size * 2 // 5])
    (folder / "notes.txt").write_text("shopping list\n")
    (folder / "huge.png").write_bytes(png_header(100_000, 100_000))
    failures = {"broken.jpg": "incomplete", "notes.txt": "not an image", "huge.png": "limit"}
    return Media(folder, people, one, failures)


def make_home(root: Path, models_dir: Path) -> Path:
    home = root / "home"
    home.mkdir()
    (home / "models").symlink_to(models_dir)
    return home


def cli(home: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, object, str]:
    capsys.readouterr()
    code = main(["case", argv[0], "--home", str(home), "--json", *argv[1:]])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


@contextmanager
def service(
    home: Path, pipeline: FacePipeline, *, streams: int | None = None
) -> Iterator[CaseService]:
    """``streams``: photos the ingest analyses at once (default: the box's setting, 2)."""
    activity = (
        None
        if streams is None
        else InferenceActivity(limits=InferenceLimits(ingest_streams=streams))
    )
    with (
        GalleryService.open(home, pipeline=pipeline, activity=activity) as galleries,
        AuditLog.open(home, galleries.store.keyring) as audit,
        CaseService(home, galleries, audit, detector="mtcnn") as cases,
    ):
        yield cases


def request(source: Path, case: str = CASE, **kwargs: object) -> IngestRequest:
    return IngestRequest(source, case, REASON, Requester("investigator1"), **kwargs)  # type: ignore[arg-type]


def faces_by_sha(home: Path, pipeline: FacePipeline, case: str) -> dict[str, int]:
    with service(home, pipeline) as cases:
        found = cases.store.find(case)
        counted: dict[str, int] = {}
        for face in found.faces():
            counted[face.file_sha256] = counted.get(face.file_sha256, 0) + 1
        assert sum(f.faces for f in found.files()) == len(found.faces())
        return counted


# -- one CLI ingest shared by the read-only tests ---------------------------------------------

Ingested = tuple[Path, Media, list[logging.LogRecord]]


@pytest.fixture(scope="module")
def ingested(
    tmp_path_factory: pytest.TempPathFactory,
    models_dir: Path,
    cast: tuple[dict[str, list[Path]], list[Path]],
) -> Ingested:
    root = tmp_path_factory.mktemp("ingested")
    media = build_media(root, cast)
    home = make_home(root, models_dir)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keeper = Keep(level=logging.DEBUG)
    logging.getLogger().addHandler(keeper)
    previous = logging.getLogger().level
    logging.getLogger().setLevel(logging.DEBUG)
    try:
        code = main(["case", "ingest", str(media.folder), "--home", str(home), "--json",
                     "--case", CASE, "--reason", REASON, "--no-progress"])  # fmt: skip
    finally:
        logging.getLogger().removeHandler(keeper)
        logging.getLogger().setLevel(previous)
    assert code == 0
    return home, media, records


def show(home: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    code, out, err = cli(home, capsys, "show", CASE, "--reason", REASON)
    assert code == 0, err
    assert isinstance(out, dict)
    return out


def test_folder_ingest_lists_failures_dedupes_and_clusters_people(
    ingested: Ingested,
    capsys: pytest.CaptureFixture[str],
) -> None:
    home, media, _ = ingested
    view = show(home, capsys)
    files = {name: f for f in view["source_files"] for name in f["names"]}  # type: ignore[attr-defined]
    assert len(view["source_files"]) == 13  # type: ignore[arg-type]  # 14 names, one duplicate
    first = next(iter(media.people.values()))[0].relative_to(media.folder).as_posix()
    assert files["dup/copy_of_first.jpg"]["names"] == [first, "dup/copy_of_first.jpg"]
    failed = {f["names"][0]: f["reason"] for f in view["failed_files"]}  # type: ignore[attr-defined]
    assert set(failed) == set(media.failures)
    for name, word in media.failures.items():
        assert word in failed[name], (name, failed[name])
    assert view["faces"] == 10  # 4 people x 2 photos + 2 singles, one face each

    # Every cluster is one person, and each person's two photos are one cluster.
    person_of = {p.relative_to(media.folder).as_posix(): person
                 for person, photos in media.people.items() for p in photos}  # fmt: skip
    person_of.update({p.name: person for person, p in media.singles.items()})
    clusters = view["clusters"]
    assert isinstance(clusters, list) and len(clusters) == 6
    for item in clusters:
        people = {
            person_of[name] for f in item["files"] for name in f["names"] if name in person_of
        }
        assert len(people) == 1, item["files"]
    sizes = sorted(item["faces"] for item in clusters)
    assert sizes == [1, 1, 2, 2, 2, 2]
    assert view["clustering"]["method"] == "average_linkage"  # type: ignore[index]
    assert view["clustering"]["stale"] is False  # type: ignore[index]


def test_children_setting_is_on_for_a_new_case_and_chooses_the_cluster_threshold(
    tmp_path: Path,
    models_dir: Path,
    pipeline: FacePipeline,
    cast: tuple[dict[str, list[Path]], list[Path]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A case that may include children is clustered with the child band's threshold and says
    what it costs; --no-children switches the whole case to the adult one, and a run that
    does not say keeps the case's setting."""
    pairs, singles = cast
    home = make_home(tmp_path, models_dir)
    folder = tmp_path / "media"
    folder.mkdir()
    for photo in [*next(iter(pairs.values())), singles[0]]:
        shutil.copy(photo, folder / photo.name)
    calibration = load_calibration(EMBEDDER_MODEL)
    child = calibration.for_age("child").threshold(CLUSTER_FMR)
    adult = calibration.band("adult").threshold(CLUSTER_FMR)
    assert child > adult

    with service(home, pipeline) as cases:
        first = cases.ingest(request(folder))
        meta = cases.store.find(CASE).meta
    assert meta.may_include_children is True and first.run.children is True
    assert first.results is not None
    assert (first.results.age_band, first.results.threshold) == ("child", child)
    assert "children" in first.results.threshold_note
    assert "more, smaller clusters" in first.results.threshold_note
    assert "0.375" in first.results.threshold_note  # what the adult threshold did to children
    assert len(first.results.clusters) == 2  # the pair matches above even the child threshold

    code, out, err = cli(home, capsys, "ingest", str(folder), "--case", CASE, "--reason",
                         REASON, "--no-progress", "--no-children")  # fmt: skip
    assert code == 0, err
    assert isinstance(out, dict) and out["run"]["children"] is False
    view = show(home, capsys)
    assert view["may_include_children"] is False
    clustering = view["clustering"]
    assert isinstance(clustering, dict)
    assert (clustering["age_band"], clustering["threshold"]) == ("adult", round(adult, 4))
    assert "adults only" in clustering["threshold_note"]

    with service(home, pipeline) as cases:
        third = cases.ingest(request(folder))  # says nothing: the case's setting stays
    assert third.run.children is False and third.case.meta.may_include_children is False
    assert third.results is not None and third.results.age_band == "adult"


def test_a_second_run_reads_nothing_again(
    ingested: Ingested,
    capsys: pytest.CaptureFixture[str],
) -> None:
    home, media, _ = ingested
    code, out, err = cli(home, capsys, "ingest", str(media.folder), "--case", CASE,
                         "--reason", REASON, "--no-progress")  # fmt: skip
    assert code == 0, err
    assert isinstance(out, dict)
    progress = out["progress"]
    assert progress["files_new"] == 0 and progress["faces_new"] == 0
    assert progress["files_already_done"] == progress["files_total"] == 14
    assert out["faces"] == 10 and out["run"]["number"] == 2


def test_nothing_identifying_in_case_files_or_logs(
    ingested: Ingested,
) -> None:
    home, media, records = ingested
    secrets = [CASE, REASON, HOSTILE, "copy_of_first", "broken.jpg", "notes.txt"]
    secrets += list(media.people) + list(media.singles)
    stored = b"".join(p.read_bytes() for p in (home / CASES_DIR).rglob("*") if p.is_file())
    names = " ".join(str(p) for p in (home / CASES_DIR).rglob("*"))
    logged = "\n".join(r.getMessage() for r in records)
    assert records, "the ingest logged nothing at DEBUG: this check would be vacuous"
    for secret in secrets:
        assert secret.encode() not in stored, secret
        assert secret not in names, secret
        assert secret not in logged, secret
    assert b"\xff\xd8\xff" not in stored  # no thumbnail in the clear


def test_report_is_one_private_self_contained_html_file(
    ingested: Ingested,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    home, media, _ = ingested
    out = tmp_path / "report.html"
    code, _, err = cli(home, capsys, "report", CASE, "--out", str(out), "--reason", REASON)
    assert code == 0, err
    html = out.read_text(encoding="utf-8")
    assert (out.stat().st_mode & 0o777) == 0o600
    assert html.startswith("<!DOCTYPE html>") and "@media print" in html
    assert html.count('src="data:image/jpeg;base64,') == 10  # every face of every cluster
    assert "http://" not in html and "https://" not in html and 'src="/' not in html
    assert HOSTILE not in html and "&lt;img src=x onerror=alert(1)&gt;.jpg" in html
    assert CASE in html and REASON in html and "Leads, not identifications" in html
    # The clustering threshold is stated with its age band, its cost and its provenance.
    assert "children aged 0-12" in html and "more, smaller clusters" in html
    assert "cannot ship" in html
    for name in media.failures:
        assert name in html
    code, _, err = cli(home, capsys, "report", CASE, "--out", str(out), "--reason", REASON)
    assert code == 2 and "exists" in err
    again = ("report", CASE, "--out", str(out), "--force", "--reason", REASON)
    assert cli(home, capsys, *again)[0] == 0


def test_bad_input_is_one_line_with_exit_2(
    ingested: Ingested,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    home, media, _ = ingested
    damaged = tmp_path / "cut.zip"
    with zipfile.ZipFile(tmp_path / "whole.zip", "w") as archive:
        archive.writestr("a.jpg", b"\xff\xd8\xff" + bytes(50_000))
    damaged.write_bytes((tmp_path / "whole.zip").read_bytes()[:20_000])
    cases = (
        (["ingest", str(tmp_path / "nowhere"), "--case", CASE, "--reason", REASON], "no such"),
        (["ingest", str(damaged), "--case", CASE, "--reason", REASON], "damaged zip archive"),
        (["ingest", str(media.folder), "--case", CASE, "--reason", "  "], "reason"),
        (["ingest", str(media.folder), "--case", CASE, "--reason", REASON, "--galleries", "x"],
         "no gallery"),
        (["show", "NO-SUCH-CASE"], "no case"),
        (["purge", CASE], "--yes"),
    )  # fmt: skip
    for argv, words in cases:
        code, _, err = cli(home, capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and words in lines[0], (argv, err)


# -- archives, video, leads, stop and resume: through the API with one shared pipeline --------


def test_zip_and_tar_give_the_same_files_and_faces_as_the_folder(
    tmp_path: Path,
    models_dir: Path,
    pipeline: FacePipeline,
    cast: tuple[dict[str, list[Path]], list[Path]],
    ingested: Ingested,
) -> None:
    media = build_media(tmp_path, cast)
    home = make_home(tmp_path, models_dir)
    with zipfile.ZipFile(tmp_path / "m.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(media.folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(media.folder).as_posix())
    with tarfile.open(tmp_path / "m.tar.gz", "w:gz") as archive:
        archive.add(media.folder, arcname="media")
    with service(home, pipeline) as cases:
        outcomes = {
            source: cases.ingest(request(tmp_path / source, case=source))
            for source in ("m.zip", "m.tar.gz")
        }
    folder = faces_by_sha(ingested[0], pipeline, CASE)  # the same media as a folder
    assert len(folder) == 10
    for source, outcome in outcomes.items():
        assert faces_by_sha(home, pipeline, source) == folder, source
        assert outcome.run.status == "complete"
        assert {f.names[0].rsplit("/", 1)[-1] for f in outcome.failed} == set(media.failures)


def test_video_faces_carry_timestamps_and_a_cut_short_video_is_kept_in_part(
    tmp_path: Path,
    models_dir: Path,
    pipeline: FacePipeline,
    cast: tuple[dict[str, list[Path]], list[Path]],
) -> None:
    pairs, _ = cast
    person, photos = next(iter(pairs.items()))
    frames = [np.asarray(Image.open(p).convert("RGB"))[:248, :248].copy() for p in photos]
    clip = write_video(tmp_path / "clip.mp4", [f for f in frames for _ in range(FPS)])
    long_clip = write_video(tmp_path / "long.mkv", [f for f in frames * 3 for _ in range(FPS)],
                            container="matroska")  # fmt: skip
    with zipfile.ZipFile(tmp_path / "phone.zip", "w") as archive:
        archive.write(clip, "DCIM/clip.mp4")
        archive.writestr("DCIM/cut.mkv", long_clip.read_bytes()[: long_clip.stat().st_size // 2])
        archive.write(photos[0], "DCIM/photo.jpg")
        archive.write(photos[0], "../../outside.jpg")  # path traversal: listed, never read
        archive.writestr("DCIM/bomb.bmp", bytes(32 << 20), zipfile.ZIP_DEFLATED)
    home = make_home(tmp_path, models_dir)
    with service(home, pipeline) as cases:
        outcome = cases.ingest(request(tmp_path / "phone.zip", frame_interval_s=1.0))
        view = cases.view(CASE)
    assert outcome.run.status == "complete" and outcome.progress.video_frames >= 3
    refused = {f.names[0]: f.reason or "" for f in outcome.failed}
    assert set(refused) == {"../../outside.jpg", "DCIM/bomb.bmp"}
    assert "path traversal" in refused["../../outside.jpg"]
    assert "decompression bomb" in refused["DCIM/bomb.bmp"]
    files = {f.names[0]: f for f in view.files}
    assert files["DCIM/clip.mp4"].media == "video" and files["DCIM/clip.mp4"].frames == 2
    assert files["DCIM/clip.mp4"].status == "done" and files["DCIM/clip.mp4"].faces == 2
    cut = files["DCIM/cut.mkv"]
    assert cut.status == "partial" and "cut short" in (cut.reason or "") and cut.faces >= 1
    # The person's photo and the video's two frames (and the cut one's) are one cluster.
    (biggest, *_) = view.clusters
    names = {a.file.names[0]: a.times_s for a in biggest.appearances}
    assert names["DCIM/clip.mp4"] == (0.0, 1.0) and "DCIM/photo.jpg" in names, person


def test_clusters_get_ranked_leads_and_every_search_is_audited(
    tmp_path: Path,
    models_dir: Path,
    pipeline: FacePipeline,
    cast: tuple[dict[str, list[Path]], list[Path]],
) -> None:
    pairs, singles = cast
    (wanted, photos), (other, other_photos) = list(pairs.items())[:2]
    home = make_home(tmp_path, models_dir)
    folder = tmp_path / "media"
    folder.mkdir()
    shutil.copy(photos[1], folder / "seen.jpg")  # the enrolled person, another photo
    shutil.copy(singles[0], folder / "stranger.jpg")
    with GalleryService.open(home, pipeline=pipeline) as galleries:
        galleries.create_gallery("missing")
        for name, photo in ((wanted, photos[0]), (other, other_photos[0])):
            galleries.enroll("missing", display_name=name, legal_basis="W-1",
                             enrolled_by="officer", image_bytes=photo.read_bytes())  # fmt: skip
    with service(home, pipeline) as cases:
        outcome = cases.ingest(request(folder, galleries=("missing",)))
        view = cases.view(CASE)
    assert outcome.progress.clusters == outcome.progress.clusters_searched == 2
    seen = next(c for c in view.clusters if c.appearances[0].file.names == ("seen.jpg",))
    stranger = next(c for c in view.clusters if c is not seen)
    assert seen.search is not None and stranger.search is not None
    top = seen.search.leads[0]
    assert (top.rank, top.display_name, top.above_threshold) == (1, wanted, True)
    assert top.band in ("strong", "moderate") and top.probe_face_id == seen.faces[0].face_id
    assert [lead.rank for lead in seen.search.leads] == [1, 2]
    assert seen.search.leads[1].score <= top.score
    assert not stranger.search.matches  # open-set: "no match" is an answer
    with (
        GalleryService.open(home, pipeline=pipeline) as galleries,
        AuditLog.open(home, galleries.store.keyring) as audit,
    ):
        records = audit.query(case=CASE, action=AuditAction.SEARCH)
    assert len(records) == 2
    shas = {f.sha256 for f in view.files}
    for record in records:
        event = record.event
        assert event.reason == REASON and event.user == "investigator1"
        assert event.gallery == "missing" and event.probe_sha256 in shas
        assert "cluster" in (event.detail or "")
        assert event.age_band == "unknown"  # a new case may include children: strictest band
    audited = {r.event.probe_sha256: r.event.candidates for r in records}
    assert audited[seen.faces[0].file_sha256][0].subject_id == top.subject_id


def test_stop_mid_run_then_resume_finishes_without_duplicates(
    tmp_path: Path,
    models_dir: Path,
    pipeline: FacePipeline,
    cast: tuple[dict[str, list[Path]], list[Path]],
    ingested: Ingested,
) -> None:
    media = build_media(tmp_path, cast)
    home = make_home(tmp_path, models_dir)
    stop = threading.Event()

    def stop_after_three(progress: IngestProgress) -> None:
        if progress.files_seen >= 3:
            stop.set()

    with service(home, pipeline) as cases:
        first = cases.ingest(request(media.folder), progress=stop_after_three, stop=stop)
        second = cases.ingest(request(media.folder))
    assert first.run.status == "stopped" and first.progress.phase == "stopped"
    # Stopped between files; with two streams a file's neighbour may be back and written too.
    assert 3 <= first.progress.files_seen < first.progress.files_total
    assert second.run.status == "complete"
    assert second.progress.files_already_done == first.progress.files_seen
    # The same media ingested in one go (the CLI run of the shared fixture): same faces.
    assert faces_by_sha(home, pipeline, CASE) == faces_by_sha(ingested[0], pipeline, CASE)


def test_resume_after_sigkill_redoes_nothing_and_duplicates_nothing(
    tmp_path: Path,
    models_dir: Path,
    lfw_dir: Path,
    pipeline: FacePipeline,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "media"
    folder.mkdir()
    for photo in sorted((lfw_dir / "images").glob("*/*.jpg"))[:20]:
        shutil.copy(photo, folder / photo.name)
    home = make_home(tmp_path, models_dir)
    argv = [sys.executable, "-m", "edgeid", "case", "ingest", str(folder), "--home", str(home),
            "--case", CASE, "--reason", REASON, "--no-progress", "--json"]  # fmt: skip
    child = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300  # a hang guard, not a speed check
        log = None
        sizes: set[int] = set()
        while child.poll() is None and time.monotonic() < deadline:
            logs = list((home / CASES_DIR).glob(f"*/{RECORDS_LOG}"))
            if logs and logs[0].stat().st_size > HEADER_BYTES:
                sizes.add(logs[0].stat().st_size)
            # Three appends seen: the first file's frame is complete and fsynced (frames are
            # written one after another), so a file is durable when the kill comes.
            if len(sizes) >= 3:
                log = logs[0]
                break
            time.sleep(0.02)
        assert child.poll() is None, "the ingest ended before it could be killed"
        assert log is not None
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        _, err = child.communicate()
    assert child.returncode == -signal.SIGKILL, err

    with (
        GalleryStore(home, KeyFileProvider(home / "keys")) as galleries,
        CaseStore(home, galleries.keyring) as store,
    ):
        done_before = len(store.find(CASE).files())  # durable when the kill came
    assert 1 <= done_before < 20

    code, out, err = cli(home, capsys, "ingest", str(folder), "--case", CASE,
                         "--reason", REASON, "--no-progress")  # fmt: skip
    assert code == 0, err
    progress = out["progress"]  # type: ignore[index]
    assert progress["files_already_done"] == done_before  # nothing finished is read again
    assert progress["files_new"] == 20 - done_before and progress["files_failed"] == 0
    with service(home, pipeline) as cases:
        meta = cases.store.find(CASE).meta
        reference = cases.ingest(request(folder, case="REFERENCE"))
        assert reference.run.status == "complete"
    assert [r.status for r in meta.runs] == ["running", "complete"]  # the killed run says so
    assert faces_by_sha(home, pipeline, CASE) == faces_by_sha(home, pipeline, "REFERENCE")


def test_purge_erases_one_case_and_keeps_the_rest(
    tmp_path: Path,
    models_dir: Path,
    pipeline: FacePipeline,
    cast: tuple[dict[str, list[Path]], list[Path]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, singles = cast
    home = make_home(tmp_path, models_dir)
    for number, photo in (("KEEP-1", singles[0]), ("GONE-2", singles[1])):
        folder = tmp_path / number
        folder.mkdir()
        shutil.copy(photo, folder / "p.jpg")
        with service(home, pipeline) as cases:
            cases.ingest(request(folder, case=number, retention_until=None))
    before = {p.name for p in (home / CASES_DIR).iterdir() if p.is_dir()}
    # No retention date: an early purge, which two people decide (tests/test_approvals.py);
    # this test is about the erasure, so the box runs with dual control off.
    (home / "edgeid.toml").write_text("[security]\ndual_control = false\n")
    code, out, err = cli(home, capsys, "purge", "GONE-2", "--yes", "--reason", PURGE_REASON)
    assert code == 0 and out == {"purged": ["GONE-2"]}, err
    after = {p.name for p in (home / CASES_DIR).iterdir() if p.is_dir()}
    assert len(after) == 1 and after < before
    code, out, _ = cli(home, capsys, "list")
    assert [c["case"] for c in out] == ["KEEP-1"]  # type: ignore[union-attr]
    assert cli(home, capsys, "show", "GONE-2", "--reason", REASON)[0] == 2


def test_expired_cases_are_listed_and_purged_together(
    tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = make_home(tmp_path, models_dir)
    with (
        GalleryStore(home, KeyFileProvider(home / "keys")) as galleries,
        CaseStore(home, galleries.keyring) as store,
    ):
        store.create(
            "OLD-1", created_by="a", model_id=EMBEDDER_MODEL, retention_until=date(2001, 1, 1)
        )
        store.create(
            "NOW-2", created_by="a", model_id=EMBEDDER_MODEL, retention_until=date(2999, 1, 1)
        )
    code, out, _ = cli(home, capsys, "list")
    assert {c["case"]: c["expired"] for c in out} == {"OLD-1": True, "NOW-2": False}  # type: ignore[union-attr]
    code, out, _ = cli(home, capsys, "purge", "--expired", "--yes", "--reason", PURGE_REASON)
    assert code == 0 and out == {"purged": ["OLD-1"]}


def test_web_job_runs_in_a_thread_reports_counts_and_stops(
    tmp_path: Path,
    models_dir: Path,
    pipeline: FacePipeline,
    cast: tuple[dict[str, list[Path]], list[Path]],
) -> None:
    media = build_media(tmp_path, cast)
    home = make_home(tmp_path, models_dir)
    with service(home, pipeline) as cases:
        stopped = IngestJob(cases, request(media.folder))
        stopped.stop()  # before it starts: it ends at the first file, resumable
        stopped.start()
        assert stopped.wait(300)
        finished = IngestJob(cases, request(media.folder)).start()
        assert finished.wait(300)
        busy = IngestJob(cases, request(media.folder))
        with cases.store.find(CASE).ingest_exclusively():
            busy.start()
            assert busy.wait(300)
    assert stopped.state == "stopped" and stopped.snapshot()["files_seen"] == 0
    snapshot = finished.snapshot()
    assert snapshot["state"] == "complete" and snapshot["phase"] == "done"
    assert snapshot["files_seen"] == snapshot["files_total"] == 14
    assert snapshot["faces_new"] == 10 and finished.outcome is not None
    assert set(snapshot) >= {"files_failed", "files_duplicate", "clusters"}
    assert busy.state == "failed" and "running" in (busy.error or "")
