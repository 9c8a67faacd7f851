"""Seized media as a list of entries: a folder, a zip, a tar (plain or compressed), or one file.

Nothing is ever extracted to disk: archive members are read in memory (images, bounded) or
streamed (videos), so a member's path cannot write anywhere. Entries that will not be read
are still listed, each with the reason, and never stop the run:

- paths that are absolute or climb out with ``..`` (path traversal), links and special files
  inside archives, symbolic links leaving the folder, FIFOs and devices in the folder;
- members whose declared size is over the limit, or whose compression ratio is that of a
  decompression bomb, and encrypted zip members.

``MediaEntry.open()`` returns a binary stream; a member whose real size exceeds its declared
size fails the read (zipfile checks sizes and CRCs; ``read_limited`` bounds every read).

A source is a zip only when it begins like one (a member's local header, or the end record of
an empty zip), and its end record must sit exactly at the end of the file and point at a
central directory that ends where the record begins. Python's zipfile alone would take the
last end record it finds and treat everything before it as a prefix: a zip cut off before its
central directory whose last member is a stored zip would be read as that inner zip, the
outer members skipped in silence. A cut or spliced zip is refused whole as damaged (exit 2);
its members are not salvaged from their local headers, because only the central directory
says which of them are current: re-acquire or repair the archive. Archives inside a source are
never opened (``sniff`` refuses them by content), whatever the outer and inner kinds.
"""

from __future__ import annotations

import io
import lzma
import os
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Literal

from edgeid.runtime.errors import BadInputError

SourceKind = Literal["folder", "zip", "tar", "file"]
MediaKind = Literal["image", "video", "archive", "unsupported"]

# An archive holding more entries than this is refused as a whole: a zip's central directory
# of millions of tiny members is a denial of service, not a seizure.
MAX_ARCHIVE_MEMBERS = 500_000
# The largest video read (streamed, never held in memory): a 4 GiB phone recording.
MAX_VIDEO_BYTES = 4 << 30
# Deflate cannot exceed about 1032:1; real media (JPEG, MP4) barely compresses and even a
# plain BMP rarely passes 20:1, so a member above this ratio is refused as a bomb.
MAX_COMPRESSION_RATIO = 100
# Members this small are not checked for ratio: a 1 KB file of zeros is no bomb.
RATIO_CHECK_MIN_BYTES = 1 << 20
SNIFF_BYTES = 512  # enough for every signature below (tar's "ustar" sits at byte 257)

_VIDEO_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".3gp", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".mts",
     ".m2ts", ".wmv", ".flv", ".vob", ".ogv"}
)  # fmt: skip
# Said of an archive found inside a source, to CLI and web users alike.
ARCHIVE_INSIDE = (
    "this is an archive inside the media; archives inside are not opened, so send it to the "
    "case on its own"
)
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif"})


# What a damaged compressed stream raises while it is read.
_STREAM_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)
# What reading an entry's bytes can raise besides BadInputError: a damaged member (bad CRC,
# truncated stream) or an unsupported zip compression method (NotImplementedError).
READ_ERRORS = (*_STREAM_ERRORS, zipfile.BadZipFile, NotImplementedError)


# Said to a web user whose upload is refused: no server path, and no advice to use the CLI.
UPLOAD_REFUSED = "the uploaded file cannot be read as a zip or tar archive; upload it again"


class RefusedSource(BadInputError):
    """The path given is not a folder, archive or media file we can read.

    ``str()`` is for the CLI (it names the path and the fix there); ``for_upload`` is the same
    refusal for an uploaded archive, without the server's path."""

    def __init__(self, message: str, *, for_upload: str = UPLOAD_REFUSED) -> None:
        super().__init__(message)
        self.for_upload = for_upload


@dataclass(frozen=True)
class MediaEntry:
    """One file of the source. ``refused`` says why it will not be read (then ``open`` fails)."""

    name: str  # relative, "/"-separated: a folder's path or an archive's member name
    size: int | None
    refused: str | None = None
    _opener: Callable[[], IO[bytes]] | None = field(default=None, repr=False, compare=False)

    def open(self) -> IO[bytes]:
        if self._opener is None:
            raise BadInputError(self.refused or "this entry cannot be read")
        return self._opener()


def sniff(head: bytes, name: str) -> tuple[MediaKind, str | None]:
    """What the first bytes say the file is; for unsupported ones, why (by content, not name)."""
    if head.startswith(b"\xff\xd8\xff") or head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image", None
    if head[:2] == b"BM" or head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image", None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image", None
    if head[:4] in (b"GIF8",):
        return "unsupported", "GIF images are not accepted; convert them to PNG"
    if head[4:8] == b"ftyp":
        if head[8:12] in _HEIF_BRANDS:
            return "unsupported", "HEIC/AVIF images are not supported; convert them to JPEG"
        return "video", None
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video", None
    if head.startswith((b"\x1a\x45\xdf\xa3", b"FLV", b"\x30\x26\xb2\x75", b"\x00\x00\x01\xba")):
        return "video", None
    if len(head) > 188 and head[0] == 0x47 and head[188] == 0x47:
        return "video", None  # MPEG transport stream: a sync byte every 188 bytes
    if head.startswith((b"PK\x03\x04", b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"7z\xbc\xaf")):
        return "archive", ARCHIVE_INSIDE
    if head.startswith(b"Rar!") or head[257:262] == b"ustar":
        return "archive", ARCHIVE_INSIDE
    if PurePosixPath(name).suffix.lower() in _VIDEO_SUFFIXES and head:
        return "video", None  # containers without a signature at byte 0 (some MPEG-PS, VOB)
    if not head:
        return "unsupported", "empty file"
    return "unsupported", "not an image or video this box reads"


def unsafe_member_name(name: str) -> str | None:
    """Why an archive member's name is unsafe (absolute, drive letter, ``..``), else None."""
    clean = name.replace("\\", "/")
    if clean.startswith("/") or (len(clean) > 1 and clean[1] == ":"):
        return "absolute path in the archive (path traversal); not read"
    if ".." in clean.split("/"):
        return "path climbing out with '..' in the archive (path traversal); not read"
    if "\x00" in clean:
        return "NUL byte in the member name; not read"
    return None


# -- sources -----------------------------------------------------------------------------------


@dataclass
class MediaSource:
    """A listed source; ``entries`` are in a stable order (sorted by name)."""

    kind: SourceKind
    entries: list[MediaEntry]
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def close(self) -> None:
        for close in reversed(self._closers):
            close()
        self._closers.clear()


@contextmanager
def open_source(path: Path) -> Iterator[MediaSource]:
    """List ``path``: a folder, a zip, a tar (.tar, .tar.gz, .tar.bz2, .tar.xz) or one file."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise RefusedSource(
            f"{path}: no such file or folder; give the media folder or archive"
        ) from None
    except OSError as exc:
        raise RefusedSource(f"{path}: cannot be read ({exc.strerror})") from None
    if stat.S_ISLNK(info.st_mode):
        path = path.resolve()
        info = path.stat()
    if stat.S_ISDIR(info.st_mode):
        source = _folder(path)
    elif not stat.S_ISREG(info.st_mode):
        raise RefusedSource(f"{path} is not a regular file or folder")
    else:
        with _open_regular(path) as stream:
            head = stream.read(SNIFF_BYTES)
        # By the first bytes, never by zipfile.is_zipfile: that finds a zip anywhere in the
        # last 64 KiB (a tar or an image whose last bytes are a zip would pass for one).
        if head.startswith((_LOCAL_HEADER, _END_RECORD)):
            source = _zip(path)
        elif _is_tar(path):
            source = _tar(path)
        else:
            kind, _ = sniff(head, path.name)
            if kind == "archive":
                raise RefusedSource(
                    f"{path} looks like an archive but cannot be opened (damaged, or not zip or "
                    "tar); repair it, or extract it and ingest the folder",
                    for_upload="the uploaded file looks like an archive but cannot be opened "
                    "(damaged, or not zip or tar); upload a complete zip or tar archive",
                )
            source = MediaSource("file", [_file_entry(path, path.name, info.st_size)])
    try:
        yield source
    finally:
        source.close()


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, tarfile.TarError, EOFError, ValueError):
        return False


def _open_regular(path: Path) -> IO[bytes]:
    """Open without following a link and without blocking on a FIFO; refuse non-files."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadInputError("not a regular file (it changed since it was listed)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _file_entry(path: Path, name: str, size: int) -> MediaEntry:
    return MediaEntry(name, size, None, lambda: _open_regular(path))


def _folder(root: Path) -> MediaSource:
    root = root.resolve()
    entries: list[MediaEntry] = []
    for current, dirs, files in os.walk(root, followlinks=False):
        here = Path(current)
        dirs.sort()
        for name in sorted(dirs):
            if (here / name).is_symlink():
                rel = (here / name).relative_to(root).as_posix()
                entries.append(MediaEntry(rel, None, "symbolic link to a folder; not followed"))
        for name in sorted(files):
            entries.append(_folder_entry(root, here / name))
    entries.sort(key=lambda e: e.name)
    return MediaSource("folder", entries)


def _folder_entry(root: Path, path: Path) -> MediaEntry:
    rel = path.relative_to(root).as_posix()
    try:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            target = path.resolve()
            if not target.is_relative_to(root):
                return MediaEntry(rel, None, "symbolic link pointing outside the folder; not read")
            info = target.stat()
            if not stat.S_ISREG(info.st_mode):
                return MediaEntry(rel, None, "symbolic link to something not a regular file")
            return _file_entry(target, rel, info.st_size)
    except OSError as exc:
        return MediaEntry(rel, None, f"cannot be read ({exc.strerror})")
    if not stat.S_ISREG(info.st_mode):
        return MediaEntry(rel, None, "not a regular file (FIFO, socket or device); not read")
    return _file_entry(path, rel, info.st_size)


def _zip(path: Path) -> MediaSource:
    upload_fix = "upload the complete archive again (it was cut off or damaged on the way)"
    with _open_regular(path) as stream:
        damage = zip_damage(stream)
    if damage is not None:
        raise RefusedSource(
            f"{path}: damaged zip archive, nothing read: {damage}; copy the complete archive "
            "again from the original media, or repair it (zip -FF) and ingest the result",
            for_upload=f"damaged zip archive, nothing read: {damage}; {upload_fix}",
        )
    try:
        archive = zipfile.ZipFile(path)
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise RefusedSource(
            f"{path}: damaged zip archive ({exc}); repair or re-export it",
            for_upload=f"damaged zip archive ({exc}); {upload_fix}",
        ) from None
    if len(infos) > MAX_ARCHIVE_MEMBERS:
        archive.close()
        raise RefusedSource(
            f"{path}: {len(infos)} members is over the {MAX_ARCHIVE_MEMBERS}-member limit; "
            "split the archive"
        )
    entries = [_zip_entry(archive, info) for info in infos if not info.is_dir()]
    entries.sort(key=lambda e: e.name)
    return MediaSource("zip", entries, [archive.close])


# -- the layout of a zip -----------------------------------------------------------------------

_LOCAL_HEADER = b"PK\x03\x04"
_END_RECORD = b"PK\x05\x06"
_END_RECORD64 = b"PK\x06\x06"
_END_LOCATOR64 = b"PK\x06\x07"
_LOCAL = struct.Struct("<4s5H3L2H")  # signature ... compressed size, size, name and extra lengths
_END = struct.Struct("<4s4H2LH")  # signature, disks, entries, directory size/offset, comment
_LOCATOR64 = struct.Struct("<4sLQL")  # signature, disk, offset of the zip64 end record, disks
_END64 = struct.Struct("<4sQ2H2L4Q")  # signature, size, versions, disks, entries, directory
_MAX_COMMENT = 0xFFFF
_MAX_LISTED = 100_000  # local headers counted for the message about a cut archive


def zip_damage(stream: IO[bytes]) -> str | None:
    """Why this file is not one whole zip starting at its first byte; None when it is.

    The end record must end the file exactly (its comment reaching the last byte), and the
    central directory it points at must end where the (zip64) end record begins, so that no
    byte before the archive is assumed; the file must start with a member when it has any."""
    size = stream.seek(0, os.SEEK_END)
    tail_start = max(0, size - _END.size - _MAX_COMMENT)
    stream.seek(tail_start)
    tail = stream.read()
    at = _end_record_at(tail)
    if at is None:
        return (
            "its central directory (the list of members at its end) is missing: the file is "
            f"cut off after {size} bytes; {_unread(stream, size)}"
        )
    _, disk, directory_disk, here, total, dir_size, dir_offset, _ = _END.unpack_from(tail, at)
    end_at = tail_start + at
    locator_at = end_at - _LOCATOR64.size
    if locator_at >= 0 and _read(stream, locator_at, 4) == _END_LOCATOR64:
        _, _, end64_at, _ = _LOCATOR64.unpack(_read(stream, locator_at, _LOCATOR64.size))
        record = _read(stream, end64_at, _END64.size) if end64_at < locator_at else b""
        if len(record) < _END64.size or record[:4] != _END_RECORD64:
            return "its zip64 end record is missing or damaged"
        _, length, _, _, disk, directory_disk, here, total, dir_size, dir_offset = _END64.unpack(
            record
        )
        if end64_at + 12 + length != locator_at:
            return "its zip64 end record does not lie where the archive's end says"
        end_at = end64_at
    if disk or directory_disk or here != total:
        return "it is one part of a multi-part (spanned) zip; join the parts into one file first"
    if dir_offset + dir_size != end_at:
        return (
            "the end record at the end of the file is not its own (it is cut off before its "
            "central directory and its last member is a zip of its own, or bytes were added "
            f"inside it); {_unread(stream, size)}"
        )
    if total and _read(stream, 0, 4) != _LOCAL_HEADER:
        return "it does not begin with a member (bytes were added before it)"
    return None


def _end_record_at(tail: bytes) -> int | None:
    """Where in ``tail`` the end record that ends it exactly starts, if there is one."""
    at = tail.rfind(_END_RECORD)
    while at >= 0:
        if at + _END.size <= len(tail):
            comment = _END.unpack_from(tail, at)[-1]
            if at + _END.size + comment == len(tail):
                return at
        at = tail.rfind(_END_RECORD, 0, at)
    return None


def _unread(stream: IO[bytes], size: int) -> str:
    """How many members precede the damage, by walking their local headers from byte 0."""
    offset, members = 0, 0
    while members < _MAX_LISTED:
        header = _read(stream, offset, _LOCAL.size)
        if len(header) < _LOCAL.size or header[:4] != _LOCAL_HEADER:
            break
        flags, packed, name_len, extra_len = (_LOCAL.unpack(header)[i] for i in (2, 7, 9, 10))
        end = offset + _LOCAL.size + name_len + extra_len + packed
        members += 1
        if flags & 0x08 or packed == 0xFFFFFFFF or end > size:
            break  # its size follows its data, or it runs past the end: stop counting
        offset = end
    if not members:
        return "no member was read"
    return f"none of the {members} member(s) before the damage was read"


def _read(stream: IO[bytes], offset: int, count: int) -> bytes:
    stream.seek(offset)
    return stream.read(count)


def _zip_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> MediaEntry:
    name = info.filename
    refused = unsafe_member_name(name)
    mode = info.external_attr >> 16
    if refused is None and stat.S_ISLNK(mode):
        refused = "symbolic link in the archive; not followed"
    if refused is None and info.flag_bits & 0x1:
        refused = "encrypted member; decrypt the archive first"
    if refused is None:
        refused = _bomb(info.file_size, info.compress_size)
    if refused is not None:
        return MediaEntry(name, info.file_size, refused)
    return MediaEntry(name, info.file_size, None, lambda: archive.open(info))


def _bomb(size: int, packed: int) -> str | None:
    if size > MAX_VIDEO_BYTES:
        return f"{size} bytes uncompressed is over the {MAX_VIDEO_BYTES}-byte limit; not read"
    if size >= RATIO_CHECK_MIN_BYTES and size > MAX_COMPRESSION_RATIO * max(packed, 1):
        return (
            f"compresses {size // max(packed, 1)}:1, the ratio of a decompression bomb "
            f"(limit {MAX_COMPRESSION_RATIO}:1); not read"
        )
    return None


def _tar(path: Path) -> MediaSource:
    try:
        archive = tarfile.open(path, "r:*")  # noqa: SIM115 - MediaSource.close closes it
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise RefusedSource(
            f"{path}: damaged tar archive ({exc}); repair or re-export it",
            for_upload=f"damaged tar archive ({exc}); upload the complete archive again",
        ) from None
    # Listing a compressed tar decompresses it to reach each header: stop listing where the
    # stream has grown past the bomb ratio of the file on disk.
    expand_limit = max(MAX_COMPRESSION_RATIO * path.stat().st_size, RATIO_CHECK_MIN_BYTES)
    entries: list[MediaEntry] = []
    try:
        for count, member in enumerate(archive, start=1):
            if count > MAX_ARCHIVE_MEMBERS:
                archive.close()
                raise RefusedSource(
                    f"{path}: more than {MAX_ARCHIVE_MEMBERS} members; split the archive"
                )
            if member.offset_data + member.size > expand_limit:
                entries.append(
                    MediaEntry(
                        member.name,
                        member.size,
                        "this member and the rest of the archive expand like a decompression "
                        f"bomb (over {MAX_COMPRESSION_RATIO}:1); not read",
                    )
                )
                break
            if not member.isdir():
                entries.append(_tar_entry(archive, member))
    except _STREAM_ERRORS as exc:
        entries.append(MediaEntry("(rest of the archive)", None, f"damaged tar archive ({exc})"))
    entries.sort(key=lambda e: e.name)
    return MediaSource("tar", entries, [archive.close])


def _tar_entry(archive: tarfile.TarFile, member: tarfile.TarInfo) -> MediaEntry:
    name = member.name
    refused = unsafe_member_name(name)
    if refused is None and (member.issym() or member.islnk()):
        refused = "link in the archive; not followed"
    if refused is None and not member.isfile():
        refused = "not a regular file (device or FIFO) in the archive; not read"
    if refused is None:
        refused = _bomb(member.size, member.size)
    if refused is not None:
        return MediaEntry(name, member.size, refused)

    def opener() -> IO[bytes]:
        stream = archive.extractfile(member)
        if stream is None:
            raise BadInputError("not a regular file in the archive")
        return stream

    return MediaEntry(name, member.size, None, opener)


def read_limited(stream: IO[bytes], limit: int) -> bytes:
    """Read the whole stream, refusing (without reading on) once it passes ``limit`` bytes."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise BadInputError(f"over the {limit}-byte limit for an image; not read")
    return data


def head_of(stream: IO[bytes]) -> bytes:
    """The first bytes of a stream, for ``sniff``; the stream is left at its start."""
    head = stream.read(SNIFF_BYTES)
    try:
        stream.seek(0)
    except (OSError, io.UnsupportedOperation) as exc:
        raise BadInputError("the stream cannot be rewound") from exc
    return head
