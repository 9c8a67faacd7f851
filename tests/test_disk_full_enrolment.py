"""Finding 2 of issue 13: a full disk during enrolment is all-or-nothing at every free-space
size, a retry never duplicates, and a read-only search never needs to write.

Real LFW photos, the real pipeline, store, index and crypto; the only fake is a FileWriter
that behaves like a disk with N bytes free (a short write, then ENOSPC), swept over byte
ranges: a stride across everything an enrolment writes, and every byte around each write's
boundary.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_case_ingest import cast as cast
from test_case_ingest import pipeline as pipeline

from edgeid.runtime.config.settings import load_settings
from edgeid.runtime.errors import StorageWriteError
from edgeid.runtime.gallery.service import INDEX_FILE, DuplicateSubjectError, GalleryService, Probe
from edgeid.runtime.gallery.store import GalleryStore
from edgeid.runtime.gallery.thresholds import load_calibration
from edgeid.runtime.inference.pipeline import EMBEDDER_MODEL, FacePipeline
from edgeid.runtime.vault.key_choice import provider_for

GALLERY = "g"
Cast = tuple[dict[str, list[Path]], list[Path]]


class FreeSpace:
    """A disk with ``free`` bytes left: a write beyond it is short, the next one ENOSPC.
    ``ends`` keeps where each write ended (to sweep every byte around them)."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.used = 0
        self.ends: list[int] = []

    def write(self, fd: int, data: bytes) -> int:
        if self.free <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = os.write(fd, data[: min(len(data), self.free)])
        self.free -= n
        self.used += n
        self.ends.append(self.used)
        return n

    def fsync(self, fd: int) -> None:
        os.fsync(fd)


@dataclass
class Base:
    home: Path
    first: str  # the subject enrolled before the disk fills
    photo: bytes  # the second person's photo
    probe: Probe  # its analysis (the sweep does not run the models again each time)


def snapshot(home: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(home)): p.read_bytes()
        for p in home.rglob("*")
        if p.is_file() and "models" not in p.relative_to(home).parts and p.name != ".lock"
    }


def service(home: Path, pipeline: FacePipeline, writer: FreeSpace | None) -> GalleryService:
    store = GalleryStore(home, provider_for(home, load_settings(home).keys), writer=writer)
    return GalleryService(store, pipeline, load_calibration(EMBEDDER_MODEL), writer=writer)


@pytest.fixture(scope="module")
def base(
    tmp_path_factory: pytest.TempPathFactory,
    models_dir: Path,
    pipeline: FacePipeline,
    cast: Cast,
) -> Base:
    pairs, _ = cast
    (_, first_photos), (_, second_photos) = list(pairs.items())[:2]
    home = tmp_path_factory.mktemp("disk") / "home"
    home.mkdir()
    (home / "models").symlink_to(models_dir)
    photo = second_photos[0].read_bytes()
    with service(home, pipeline, None) as galleries:
        galleries.create_gallery(GALLERY)
        first = galleries.enroll(
            GALLERY,
            display_name="First Person",
            legal_basis="W-1",
            enrolled_by="officer",
            image_bytes=first_photos[0].read_bytes(),
        )
        probe = galleries.analyse(photo)
    return Base(home, first.subject.subject_id, photo, probe)


def try_enrol(home: Path, pipeline: FacePipeline, base: Base, free: int) -> tuple[bool, FreeSpace]:
    """Enrol the second person with ``free`` bytes left; True when it was acknowledged."""
    disk = FreeSpace(free)
    galleries = service(home, pipeline, disk)
    galleries.analyse = lambda image_bytes, name="photo": base.probe  # type: ignore[method-assign]
    try:
        with galleries:
            galleries.enroll(GALLERY, display_name="Second Person", legal_basis="W-2",
                             enrolled_by="officer", image_bytes=base.photo)  # fmt: skip
    except StorageWriteError as exc:
        assert "disk full" in str(exc)
        return False, disk
    return True, disk


def names(home: Path, pipeline: FacePipeline) -> list[str]:
    with service(home, pipeline, None) as galleries:
        return sorted(s.display_name for s in galleries.subjects(GALLERY))


def test_finding_2_enrolment_on_a_full_disk_is_all_or_nothing_at_every_free_space_size(
    tmp_path: Path,
    pipeline: FacePipeline,
    base: Base,
) -> None:
    acknowledged, whole = try_enrol(_copy(base.home, tmp_path / "measure"), pipeline, base, 1 << 30)
    assert acknowledged and whole.used > 1000
    sizes = set(range(0, whole.used + 64, max(1, whole.used // 120)))
    for end in [0, *whole.ends]:  # every byte around each write's end
        sizes.update(range(max(0, end - 3), end + 4))
    outcomes = {True: 0, False: 0}
    for free in sorted(sizes):
        home = _copy(base.home, tmp_path / f"free-{free}")
        before = snapshot(home)
        acknowledged, _ = try_enrol(home, pipeline, base, free)
        outcomes[acknowledged] += 1
        if acknowledged:
            assert names(home, pipeline) == ["First Person", "Second Person"], free
        else:
            assert snapshot(home) == before, f"{free} bytes free: a failed enrolment left bytes"
        # Space freed, the operator retries: never a duplicate.
        retry = service(home, pipeline, None)
        retry.analyse = lambda image_bytes, name="photo": base.probe  # type: ignore[method-assign]
        with retry:
            if acknowledged:
                with pytest.raises(DuplicateSubjectError):
                    retry.enroll(GALLERY, display_name="Second Person", legal_basis="W-2",
                                 enrolled_by="officer", image_bytes=base.photo)  # fmt: skip
            else:
                retry.enroll(GALLERY, display_name="Second Person", legal_basis="W-2",
                             enrolled_by="officer", image_bytes=base.photo)  # fmt: skip
        assert names(home, pipeline) == ["First Person", "Second Person"], free
        shutil.rmtree(home)
    assert outcomes[True] and outcomes[False], outcomes


def test_finding_2_a_search_on_a_full_disk_answers_and_writes_nothing(
    tmp_path: Path,
    pipeline: FacePipeline,
    base: Base,
) -> None:
    home = _copy(base.home, tmp_path / "full")
    index = next((home / "galleries").rglob(INDEX_FILE.format(model=EMBEDDER_MODEL)))
    index.unlink()  # the index must be rebuilt from the store, which would write it
    before = snapshot(home)
    with service(home, pipeline, FreeSpace(0)) as galleries:
        result = galleries.search(base.probe, 0, [GALLERY])
    assert result.candidates[0].subject_id == base.first
    assert snapshot(home) == before


def _copy(home: Path, to: Path) -> Path:
    shutil.copytree(home, to, symlinks=True)
    return to
