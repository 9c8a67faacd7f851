"""Listing seized media safely: folders, zips and tars with hostile entries (path traversal,
links, special files, decompression bombs), and content sniffing. No models needed."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from edgeid.runtime.cases.media import (
    MAX_COMPRESSION_RATIO,
    MediaEntry,
    RefusedSource,
    open_source,
    sniff,
    unsafe_member_name,
)
from edgeid.runtime.errors import BadInputError


@pytest.fixture(scope="module")
def jpeg(lfw_dir: Path) -> bytes:
    return next((lfw_dir / "images").glob("*/*.jpg")).read_bytes()


def listing(path: Path) -> dict[str, MediaEntry]:
    with open_source(path) as source:
        return {e.name: e for e in source.entries}


def read(path: Path, name: str) -> bytes:
    with open_source(path) as source:
        entry = next(e for e in source.entries if e.name == name)
        with entry.open() as stream:
            return stream.read()


def test_folder_lists_files_and_refuses_links_out_fifos_and_folder_links(
    tmp_path: Path, jpeg: bytes
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(jpeg)
    media = tmp_path / "media"
    (media / "sub" / "deeper").mkdir(parents=True)
    (media / "a.jpg").write_bytes(jpeg)
    (media / "sub" / "deeper" / "b.jpg").write_bytes(jpeg)
    (media / "link-out.jpg").symlink_to(outside / "secret.jpg")
    (media / "link-in.jpg").symlink_to(media / "a.jpg")
    (media / "dir-link").symlink_to(outside)
    os.mkfifo(media / "pipe.jpg")

    entries = listing(media)

    assert sorted(entries) == [
        "a.jpg", "dir-link", "link-in.jpg", "link-out.jpg", "pipe.jpg", "sub/deeper/b.jpg",
    ]  # fmt: skip
    assert entries["a.jpg"].refused is None
    assert entries["sub/deeper/b.jpg"].refused is None
    assert entries["link-in.jpg"].refused is None  # inside the folder: read (and deduplicated)
    assert "outside the folder" in (entries["link-out.jpg"].refused or "")
    assert "folder" in (entries["dir-link"].refused or "")
    assert "not a regular file" in (entries["pipe.jpg"].refused or "")
    assert read(media, "sub/deeper/b.jpg") == jpeg
    with pytest.raises(BadInputError):
        entries["link-out.jpg"].open()


def test_folder_entry_swapped_for_a_fifo_after_listing_is_refused_without_blocking(
    tmp_path: Path, jpeg: bytes
) -> None:
    """Regression guard: opening must not follow a link or block on a FIFO that replaced a
    listed file (O_NOFOLLOW | O_NONBLOCK, then fstat)."""
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.jpg").write_bytes(jpeg)
    with open_source(media) as source:
        (media / "a.jpg").unlink()
        os.mkfifo(media / "a.jpg")
        with pytest.raises(BadInputError, match="not a regular file"):
            source.entries[0].open()


def mark_encrypted(path: Path, name: bytes) -> None:
    """Set the 'encrypted' flag of a member in its local and central headers (zipfile cannot
    write encrypted members)."""
    data = bytearray(path.read_bytes())
    for signature, flags_at, name_at in ((b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)):
        start = 0
        while (start := data.find(signature, start)) != -1:
            if data[start + name_at : start + name_at + len(name)] == name:
                data[start + flags_at] |= 0x1
            start += 4
    path.write_bytes(bytes(data))


def test_zip_refuses_traversal_links_encrypted_and_bombs(tmp_path: Path, jpeg: bytes) -> None:
    path = tmp_path / "seized.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("photos/ok.jpg", jpeg)
        archive.writestr("../../etc/evil.jpg", jpeg)
        archive.writestr("/abs/evil.jpg", jpeg)
        archive.writestr("C:/windows/evil.jpg", jpeg)
        link = zipfile.ZipInfo("photos/link.jpg")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
        archive.writestr("photos/locked.jpg", jpeg)
        archive.writestr("photos/bomb.bmp", bytes(16 << 20))  # 16 MiB of zeros: ~1000:1
        archive.writestr("photos/empty/", b"")
    mark_encrypted(path, b"photos/locked.jpg")

    entries = listing(path)

    assert entries["photos/ok.jpg"].refused is None
    assert read(path, "photos/ok.jpg") == jpeg
    for name in ("../../etc/evil.jpg", "/abs/evil.jpg", "C:/windows/evil.jpg"):
        assert "path traversal" in (entries[name].refused or ""), name
    assert "symbolic link" in (entries["photos/link.jpg"].refused or "")
    assert "encrypted" in (entries["photos/locked.jpg"].refused or "")
    assert "decompression bomb" in (entries["photos/bomb.bmp"].refused or "")
    assert f"{MAX_COMPRESSION_RATIO}:1" in (entries["photos/bomb.bmp"].refused or "")
    assert "photos/empty/" not in entries


def test_tar_refuses_traversal_links_and_devices(tmp_path: Path, jpeg: bytes) -> None:
    path = tmp_path / "seized.tar"
    with tarfile.open(path, "w") as archive:
        for name in ("ok.jpg", "../evil.jpg", "/abs.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(jpeg)
            archive.addfile(info, io.BytesIO(jpeg))
        for name, kind in (("sym.jpg", tarfile.SYMTYPE), ("hard.jpg", tarfile.LNKTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd"
            archive.addfile(info)
        device = tarfile.TarInfo("dev.jpg")
        device.type = tarfile.CHRTYPE
        archive.addfile(device)

    entries = listing(path)

    assert entries["ok.jpg"].refused is None
    assert read(path, "ok.jpg") == jpeg
    assert "path traversal" in (entries["../evil.jpg"].refused or "")
    assert "path traversal" in (entries["/abs.jpg"].refused or "")
    assert "link" in (entries["sym.jpg"].refused or "")
    assert "link" in (entries["hard.jpg"].refused or "")
    assert "not a regular file" in (entries["dev.jpg"].refused or "")


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_compressed_tars_are_read(tmp_path: Path, jpeg: bytes, mode: str) -> None:
    path = tmp_path / f"seized.tar.{mode[2:]}"
    with tarfile.open(path, mode) as archive:
        info = tarfile.TarInfo("dir/photo.jpg")
        info.size = len(jpeg)
        archive.addfile(info, io.BytesIO(jpeg))
    assert read(path, "dir/photo.jpg") == jpeg


def test_tar_gz_that_expands_like_a_bomb_stops_listing(tmp_path: Path, jpeg: bytes) -> None:
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for name, data in (("a.jpg", jpeg), ("zeros.bin", bytes(64 << 20)), ("z.jpg", jpeg)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    assert path.stat().st_size < 200_000  # 64 MiB of zeros compressed: the bomb

    entries = listing(path)

    assert entries["a.jpg"].refused is None
    assert "decompression bomb" in (entries["zeros.bin"].refused or "")
    assert "z.jpg" not in entries  # never reached: the stream is not decompressed further


def test_damaged_archives_are_refused_with_the_fix(tmp_path: Path, jpeg: bytes) -> None:
    whole = tmp_path / "whole.zip"
    with zipfile.ZipFile(whole, "w") as archive:
        archive.writestr("a.jpg", jpeg)
    cut = tmp_path / "cut.zip"
    cut.write_bytes(whole.read_bytes()[: len(jpeg) // 2])
    with pytest.raises(RefusedSource, match=r"damaged zip archive.*central directory"):
        listing(cut)
    gz = tmp_path / "not_a_tar.gz"
    gz.write_bytes(b"\x1f\x8b" + bytes(64))
    with pytest.raises(RefusedSource, match="looks like an archive"):
        listing(gz)
    with pytest.raises(RefusedSource, match="no such file"):
        listing(tmp_path / "missing")


def test_zip_member_with_a_bad_crc_fails_its_read(tmp_path: Path, jpeg: bytes) -> None:
    path = tmp_path / "flipped.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("a.jpg", jpeg)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # inside the stored member's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(zipfile.BadZipFile):
        read(path, "a.jpg")


def test_single_file_is_a_source_of_one(tmp_path: Path, jpeg: bytes) -> None:
    path = tmp_path / "one.jpg"
    path.write_bytes(jpeg)
    with open_source(path) as source:
        assert source.kind == "file"
        assert [e.name for e in source.entries] == ["one.jpg"]


def test_sniff_by_content_not_name(jpeg: bytes, tmp_path: Path) -> None:
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (4, 4)).save(png, format="PNG")
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, format="GIF")
    assert sniff(jpeg, "photo.txt") == ("image", None)
    assert sniff(png.getvalue(), "x") == ("image", None)
    assert sniff(b"\x00\x00\x00\x18ftypisom" + bytes(20), "clip.bin")[0] == "video"
    assert sniff(b"\x1a\x45\xdf\xa3" + bytes(20), "clip")[0] == "video"
    assert sniff(b"RIFF\x00\x00\x00\x00AVI LIST", "clip")[0] == "video"
    kind, why = sniff(b"\x00\x00\x00\x18ftypheic" + bytes(20), "photo.heic")
    assert kind == "unsupported" and "HEIC" in (why or "")
    kind, why = sniff(gif.getvalue(), "anim.gif")
    assert kind == "unsupported" and "GIF" in (why or "")
    assert sniff(b"PK\x03\x04rest", "inner.zip")[0] == "archive"
    assert sniff(b"hello, this is text", "notes.jpg")[0] == "unsupported"
    assert sniff(b"", "empty.jpg") == ("unsupported", "empty file")


@pytest.mark.parametrize(
    ("name", "unsafe"),
    [
        ("a/b.jpg", False),
        ("a/..b.jpg", False),
        ("../b.jpg", True),
        ("a/../../b.jpg", True),
        ("a\\..\\..\\b.jpg", True),
        ("/etc/passwd", True),
        ("D:\\x.jpg", True),
    ],
)
def test_unsafe_member_names(name: str, unsafe: bool) -> None:
    assert (unsafe_member_name(name) is not None) is unsafe


def test_listing_reads_no_member_bytes_of_refused_entries(tmp_path: Path, jpeg: bytes) -> None:
    """A refused entry has no opener at all: nothing can read it by mistake."""
    path = tmp_path / "s.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("../x.jpg", jpeg)
    entry = listing(path)["../x.jpg"]
    with pytest.raises(BadInputError, match="path traversal"):
        entry.open()
