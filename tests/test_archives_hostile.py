"""Finding 1 of issue 13: a zip cut off before its central directory, whose last member is a
stored zip, was read as that inner zip (exit 0, the outer photos skipped in silence, the
nested-archive refusal bypassed). A zip is now read only when its end record ends the file and
its central directory ends where that record begins, so a cut or spliced zip is refused whole
as damaged (exit 2, bad input: nothing is written, the case is not even created), and an
archive inside a source is refused in every combination of kinds, stored or compressed, cut
or whole."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
from web_support import build_box, sign_in, tls_settings

from edgeid.cli import main
from edgeid.runtime.accounts.roles import Role
from edgeid.runtime.cases.media import (
    UPLOAD_REFUSED,
    RefusedSource,
    head_of,
    open_source,
    sniff,
    zip_damage,
)
from edgeid.runtime.web.case_uploads import UPLOADS_DIR

CASE = "ARC-2026/0001"
REASON = "seized laptop, warrant W-13/2026"
HIDDEN = "hidden/inner_photo.jpg"  # the inner archive's member: never to be read


@pytest.fixture(scope="module")
def photos(lfw_dir: Path) -> list[bytes]:
    """Four real LFW photos of four people (three outside, one hidden in the inner archive)."""
    folders = sorted(p for p in (lfw_dir / "images").iterdir() if p.is_dir())
    return [sorted(f.glob("*.jpg"))[0].read_bytes() for f in folders[:4]]


def inner_zip(photo: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(HIDDEN, photo)
    return buffer.getvalue()


def inner_tar(photo: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo(HIDDEN)
        info.size = len(photo)
        archive.addfile(info, io.BytesIO(photo))
    return buffer.getvalue()


def outer_zip(photos: list[bytes], inner: bytes, name: str, method: int) -> tuple[bytes, int]:
    """Three photos then ``inner`` as the last member; returns the bytes and where the
    central directory starts (the cut point of the finding)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for number, photo in enumerate(photos[:3]):
            archive.writestr(f"DCIM/photo{number}.jpg", photo)
        archive.writestr(name, inner, method)
    data = buffer.getvalue()
    return data, zipfile.ZipFile(io.BytesIO(data)).start_dir


def outer_tar(photos: list[bytes], inner: bytes, name: str, mode: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:  # type: ignore[call-overload]
        for number, data in enumerate([*photos[:3], inner]):
            info = tarfile.TarInfo(f"DCIM/photo{number}.jpg" if number < 3 else name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    result: bytes = buffer.getvalue()
    return result


def what_ingest_reads(path: Path) -> dict[str, str]:
    """Each entry and what an ingest makes of it (as ``CaseIngest._entry`` decides): "image",
    or why it is not read. Raises RefusedSource when the source itself is refused."""
    seen: dict[str, str] = {}
    with open_source(path) as source:
        for entry in source.entries:
            if entry.refused is not None:
                seen[entry.name] = entry.refused
                continue
            try:
                with entry.open() as stream:
                    kind, why = sniff(head_of(stream), entry.name)
            except Exception as exc:  # a damaged member: not read
                seen[entry.name] = f"damaged ({type(exc).__name__})"
                continue
            seen[entry.name] = kind if kind == "image" else (why or kind)
    return seen


def cli(home: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["case", argv[0], "--home", str(home), "--json", *argv[1:]])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def home(tmp_path: Path, models_dir: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(models_dir)
    return home


# -- the finding -------------------------------------------------------------------------------


def test_finding_1_zip_cut_before_its_central_directory_is_damaged_not_the_inner_zip(
    photos: list[bytes],
    home: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    whole, directory_at = outer_zip(photos, inner_zip(photos[3]), "backup.zip", zipfile.ZIP_STORED)
    cut = tmp_path / "outer_cut.zip"
    cut.write_bytes(whole[:directory_at])
    # The trap is real: Python's zipfile alone reads the cut file as the inner zip.
    assert zipfile.ZipFile(cut).namelist() == [HIDDEN]

    code, out, err = cli(home, capsys, "ingest", str(cut), "--case", CASE, "--reason", REASON,
                         "--no-progress")  # fmt: skip
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err  # the input is refused: bad input, exit 2
    assert "damaged zip archive, nothing read" in lines[0]
    assert "not its own" in lines[0] and "none of the 4 member(s)" in lines[0]
    assert "copy the complete archive again" in lines[0]
    assert out.strip() == ""
    # Nothing was ingested, so nothing of the inner archive either: the case does not exist.
    code, _, err = cli(home, capsys, "show", CASE, "--reason", REASON)
    assert code == 2 and "no case" in err


def test_finding_1_the_whole_outer_zip_reads_its_photos_and_refuses_the_inner_zip(
    photos: list[bytes],
    home: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    whole, _ = outer_zip(photos, inner_zip(photos[3]), "backup.zip", zipfile.ZIP_STORED)
    path = tmp_path / "outer.zip"
    path.write_bytes(whole)
    code, out, err = cli(home, capsys, "ingest", str(path), "--case", CASE, "--reason", REASON,
                         "--no-progress")  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["progress"]["files_total"] == 4
    assert result["progress"]["files_new"] == 3
    failed = {f["names"][0]: f["reason"] for f in result["failed_files"]}
    assert list(failed) == ["backup.zip"] and "archive inside the media" in failed["backup.zip"]
    code, out, _ = cli(home, capsys, "show", CASE, "--reason", REASON)
    assert code == 0 and HIDDEN not in out and "inner_photo" not in out


def test_finding_1_every_cut_of_the_outer_zip_is_refused_or_reads_no_inner_member(
    photos: list[bytes], tmp_path: Path
) -> None:
    """Every length byte by byte around the central directory (where the inner end record
    sits at the end), and every 97th byte elsewhere."""
    whole, directory_at = outer_zip(photos, inner_zip(photos[3]), "backup.zip", zipfile.ZIP_STORED)
    lengths = {*range(0, len(whole), 97), *range(directory_at - 200, len(whole) + 1)}
    path = tmp_path / "cut.zip"
    refused = 0
    for length in sorted(lengths):
        path.write_bytes(whole[:length])
        try:
            seen = what_ingest_reads(path)
        except RefusedSource as exc:
            refused += 1
            assert "inner_photo" not in str(exc)
            continue
        assert HIDDEN not in seen, length
        assert length in (0, len(whole)) or "image" not in seen.values(), length
    assert refused >= len(lengths) - 2  # all but the empty file and the whole archive


def test_finding_1_damaged_zip_message_for_the_web_has_no_server_path(
    photos: list[bytes], tmp_path: Path
) -> None:
    whole, directory_at = outer_zip(photos, inner_zip(photos[3]), "backup.zip", zipfile.ZIP_STORED)
    upload = tmp_path / "uploads" / "0f3a9c"
    upload.parent.mkdir()
    for data in (whole[:directory_at], whole[: directory_at // 2], b"PK\x03\x04" + bytes(40)):
        upload.write_bytes(data)
        with pytest.raises(RefusedSource) as caught:
            what_ingest_reads(upload)
        assert str(upload) in str(caught.value)  # the CLI names the file it was given
        web = caught.value.for_upload
        assert str(tmp_path) not in web and "0f3a9c" not in web
        assert "folder" not in web and "upload the complete archive again" in web
    upload.write_bytes(b"\x1f\x8b" + bytes(100))  # a gzip that is no tar
    with pytest.raises(RefusedSource) as caught:
        what_ingest_reads(upload)
    assert "0f3a9c" not in caught.value.for_upload and "upload" in caught.value.for_upload
    assert RefusedSource("x").for_upload == UPLOAD_REFUSED  # a refusal never leaks by default


def test_finding_1_a_cut_zip_uploaded_on_the_web_fails_without_the_server_path(
    photos: list[bytes], tmp_path: Path, lfw_dir: Path, models_dir: Path
) -> None:
    """Uploaded through the case pages, the cut zip fails its job with the upload's wording:
    no server path, no advice to ingest a folder; the archive is shredded, no case made."""
    whole, directory_at = outer_zip(photos, inner_zip(photos[3]), "backup.zip", zipfile.ZIP_STORED)
    home = tmp_path / "box"
    home.mkdir()
    box = build_box(home, lfw_dir, models_dir, tls_settings(home))
    try:
        browser, csrf = sign_in(box, Role.INVESTIGATOR)
        planned = browser.post("/cases", data={"case": CASE, "reason": REASON, "csrf_token": csrf})
        assert planned.status_code == 303, planned.text
        entry = str(planned.headers["location"]).rsplit("/", 1)[1]
        reply = browser.post(
            f"/cases/new/{entry}/archive",
            data={"csrf_token": csrf},
            files={"archive": ("outer_cut.zip", whole[:directory_at], "application/zip")},
        )
        assert reply.status_code == 303, reply.text
        job_id = str(reply.headers["location"]).rsplit("/", 1)[1]
        job = box.app.state.web.cases.jobs.get(box.users[Role.INVESTIGATOR], job_id)
        assert job is not None and job.job.wait(timeout=60)
        assert job.job.state == "failed"
        page = browser.get(f"/cases/jobs/{job_id}").text
        assert "damaged zip archive, nothing read" in page
        assert "upload the complete archive again" in page
        assert str(home) not in page and "/uploads" not in page and "folder" not in page
        assert box.cases is not None and not box.cases.store.exists(CASE)
        assert sorted((home / UPLOADS_DIR).rglob("*")) == []
    finally:
        box.close()


# -- nested archives in every path --------------------------------------------------------------


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_finding_1_archive_inside_a_zip_is_refused_whole_or_cut(
    photos: list[bytes], tmp_path: Path, kind: str, method: int
) -> None:
    inner = inner_zip(photos[3]) if kind == "zip" else inner_tar(photos[3])
    whole, directory_at = outer_zip(photos, inner, f"backup.{kind}", method)
    path = tmp_path / "outer.zip"
    path.write_bytes(whole)
    seen = what_ingest_reads(path)
    assert [seen[f"DCIM/photo{n}.jpg"] for n in range(3)] == ["image"] * 3
    assert "archive inside the media" in seen[f"backup.{kind}"]
    assert HIDDEN not in seen
    for length in (directory_at, directory_at + 10, len(whole) - 1, len(whole) // 2):
        path.write_bytes(whole[:length])
        with pytest.raises(RefusedSource, match="damaged zip archive, nothing read"):
            what_ingest_reads(path)


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:xz"])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_finding_1_archive_inside_a_tar_is_refused_whole_or_cut(
    photos: list[bytes], tmp_path: Path, kind: str, mode: str
) -> None:
    """A plain tar ends with its last member and zero padding: a zip as that member once made
    the whole tar pass for the inner zip (zipfile finds an end record in the last 64 KiB)."""
    inner = inner_zip(photos[3]) if kind == "zip" else inner_tar(photos[3])
    whole = outer_tar(photos, inner, f"backup.{kind}", mode)
    path = tmp_path / "outer.tar"
    path.write_bytes(whole)
    if mode == "w" and kind == "zip":
        assert zipfile.is_zipfile(path)  # the trap that once caught this tar
    seen = what_ingest_reads(path)
    assert [seen[f"DCIM/photo{n}.jpg"] for n in range(3)] == ["image"] * 3
    assert "archive inside the media" in seen[f"backup.{kind}"]
    assert HIDDEN not in seen
    for length in (len(whole) - 1024, len(whole) - 1024 - 700, len(whole) * 3 // 4):
        path.write_bytes(whole[:length])
        try:
            seen = what_ingest_reads(path)
        except RefusedSource:
            continue
        assert HIDDEN not in seen and "image" not in seen.get(f"backup.{kind}", "")


def test_finding_1_a_photo_with_a_zip_appended_is_one_photo_not_a_zip(
    photos: list[bytes], tmp_path: Path
) -> None:
    path = tmp_path / "holiday.jpg"
    path.write_bytes(photos[0] + inner_zip(photos[3]))
    assert zipfile.is_zipfile(path)
    assert what_ingest_reads(path) == {"holiday.jpg": "image"}


def test_finding_1_a_zip_with_bytes_before_or_after_it_is_refused(
    photos: list[bytes], tmp_path: Path
) -> None:
    whole = inner_zip(photos[3])
    for data, words in (
        (b"MZ" + bytes(100) + whole, None),  # no PK at byte 0: not taken for a zip at all
        (b"PK\x03\x04" + bytes(26) + whole, "not its own"),  # a bogus member before it
        (whole + b"trailing", "central directory"),  # the end record no longer ends the file
    ):
        path = tmp_path / "odd.zip"
        path.write_bytes(data)
        if words is None:
            assert what_ingest_reads(path) == {"odd.zip": "not an image or video this box reads"}
        else:
            with pytest.raises(RefusedSource, match=words):
                what_ingest_reads(path)


def test_zip_damage_accepts_whole_zips_with_comments_zip64_and_empty(
    photos: list[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commented = io.BytesIO()
    with zipfile.ZipFile(commented, "w") as archive:
        archive.writestr("a.jpg", photos[0])
        archive.comment = b"exported by the phone's backup tool"
    big = io.BytesIO()
    with monkeypatch.context() as patch:
        patch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 1)  # zip64 records without 65,536 files
        with zipfile.ZipFile(big, "w", allowZip64=True) as archive:
            archive.writestr("a.jpg", photos[0])
            archive.writestr("b.jpg", photos[1])
    assert b"PK\x06\x06" in big.getvalue()  # a zip64 end record, really
    empty = io.BytesIO()
    zipfile.ZipFile(empty, "w").close()
    for data in (commented.getvalue(), big.getvalue(), empty.getvalue()):
        assert zip_damage(io.BytesIO(data)) is None
        path = tmp_path / "ok.zip"
        path.write_bytes(data)
        what_ingest_reads(path)  # not refused
