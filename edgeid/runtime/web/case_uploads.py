"""A case's seized media uploaded as one zip or tar: streamed to a private temporary file.

This is the one place the web UI writes media to disk. It is the case's seized media, which
the investigator chose to ingest; an archive can be gigabytes, more than the box can hold in
memory, and a zip must be read with seeks. So the body is streamed in chunks, bounded by
``web.max_case_upload_bytes`` (413 as soon as it is over), into
``<home>/case-uploads/<random>/archive`` (folder 0700, file 0600; the file name says nothing
about the upload), ingested from there, and shredded (zero-filled, fsynced, unlinked) when the
ingest ends, when the upload is refused, or at the next start after a crash.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from edgeid.runtime.errors import BadInputError
from edgeid.runtime.storage.durable import (
    PRIVATE_FILE_MODE,
    make_private_dir,
    shred_and_unlink,
    shred_tree,
)
from edgeid.runtime.web.forms import (
    MAX_FORM_BYTES,
    MAX_PARTS,
    BodyTooLargeError,
    FormData,
    UnsupportedBodyError,
    add_field,
    read_form,
)

logger = logging.getLogger(__name__)

UPLOADS_DIR = "case-uploads"
ARCHIVE_NAME = "archive"
ARCHIVE_FIELD = "archive"
MAX_LABEL_CHARS = 120  # the upload's own name, kept (encrypted) as the run's source


@dataclass(frozen=True)
class SavedArchive:
    path: Path
    size: int
    sha256: str  # recorded in the audit log, as a search records its probe's
    filename: str  # as the client named it; never used as a path


class CaseUploads:
    """The private folder for uploads in flight; anything left there at start is a crash's."""

    def __init__(self, home: Path) -> None:
        self.root = home / UPLOADS_DIR
        make_private_dir(self.root)
        for left in sorted(self.root.iterdir()):
            logger.warning("shredding a case upload left by an earlier run")
            self._shred(left)

    def new_path(self) -> Path:
        folder = self.root / secrets.token_hex(16)
        folder.mkdir(mode=0o700)
        return folder / ARCHIVE_NAME

    def discard(self, path: Path) -> None:
        """Shred the archive and remove its folder (idempotent)."""
        self._shred(path.parent)

    def _shred(self, path: Path) -> None:
        try:
            if path.is_dir() and not path.is_symlink():
                shred_tree(path)
            else:
                shred_and_unlink(path)
        except FileNotFoundError:
            pass

    def in_flight(self) -> list[Path]:
        return sorted(self.root.iterdir())


def source_label(filename: str) -> str:
    """``upload: <name>`` for the run's source, without control characters or folders."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable())[:MAX_LABEL_CHARS]
    return f"upload: {name or 'archive'}"


class _Sink:
    """Writes the archive bytes, counting and hashing them, refusing past ``max_bytes``."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        self.file: IO[bytes] = os.fdopen(fd, "wb")
        self.max_bytes = max_bytes
        self.size = 0
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise BodyTooLargeError(f"the archive is over the {self.max_bytes}-byte limit")
        self.digest.update(data)
        self.file.write(data)

    def close(self) -> None:
        self.file.close()


def _check_declared(request: Request, max_bytes: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLargeError(
            f"the upload is {declared} bytes, over the {max_bytes}-byte limit; split the media "
            "into several archives, or ask a technician to run edgeid case ingest on the box"
        )


async def receive_raw(request: Request, path: Path, *, max_bytes: int) -> SavedArchive:
    """The whole body is the archive (the API)."""
    _check_declared(request, max_bytes)
    sink = _Sink(path, max_bytes)
    try:
        async for chunk in request.stream():
            if chunk:
                await run_in_threadpool(sink.write, chunk)
    finally:
        sink.close()
    if not sink.size:
        raise BadInputError("send the archive (zip or tar) as the request body")
    return SavedArchive(path, sink.size, sink.digest.hexdigest(), "archive")


async def receive_form(
    request: Request,
    path: Path,
    *,
    max_bytes: int,
    before_file: Callable[[FormData], None],
) -> tuple[FormData, SavedArchive | None]:
    """A multipart form whose one file part (``archive``) streams to ``path``.

    ``before_file`` sees the fields sent before the file and may refuse (the CSRF token is
    checked there, so not a byte of the archive is written for a forged request). A form that
    is not multipart is read small, and carries no archive.
    """
    kind, params = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data":
        if kind and kind != b"application/x-www-form-urlencoded":
            raise UnsupportedBodyError("send the archive as a multipart form")
        return await read_form(request, max_file_bytes=0), None
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadInputError("multipart form without a boundary")
    _check_declared(request, max_bytes + MAX_FORM_BYTES)
    reader = _StreamedForm(path, max_bytes, before_file)
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": reader.on_part_begin,
            "on_part_data": reader.on_part_data,
            "on_part_end": reader.on_part_end,
            "on_header_field": reader.on_header_field,
            "on_header_value": reader.on_header_value,
            "on_header_end": reader.on_header_end,
            "on_headers_finished": reader.on_headers_finished,
        },
    )
    try:
        async for chunk in request.stream():
            if chunk:
                await run_in_threadpool(parser.write, chunk)
        parser.finalize()
    except FormParserError as exc:
        raise BadInputError("the upload is malformed (broken multipart form)") from exc
    finally:
        reader.close()
    return reader.form, reader.saved()


class _StreamedForm:
    def __init__(self, path: Path, max_bytes: int, before_file: Callable[[FormData], None]) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.before_file = before_file
        self.form = FormData()
        self.parts = 0
        self.field_bytes = 0
        self.headers: dict[str, bytes] = {}
        self.header_name = bytearray()
        self.header_value = bytearray()
        self.field: bytearray | None = None
        self.field_name = ""
        self.sink: _Sink | None = None
        self.filename: str | None = None
        self.finished = False

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise BadInputError(f"the form has more than {MAX_PARTS} parts")
        self.headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name.extend(data[start:end])

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value.extend(data[start:end])

    def on_header_end(self) -> None:
        self.headers[self.header_name.decode("latin-1").lower()] = bytes(self.header_value)
        self.header_name.clear()
        self.header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get("content-disposition"))
        self.field_name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" not in options:
            self.field = bytearray()
            return
        if self.field_name != ARCHIVE_FIELD or self.filename is not None:
            raise BadInputError(f"send one file, in the field {ARCHIVE_FIELD!r}")
        self.before_file(self.form)
        self.filename = options[b"filename"].decode("utf-8", "replace")
        self.sink = _Sink(self.path, self.max_bytes)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.field is None:
            assert self.sink is not None
            self.sink.write(data[start:end])
            return
        self.field_bytes += end - start
        if self.field_bytes > MAX_FORM_BYTES:
            raise BodyTooLargeError("the form's fields are too long")
        self.field += data[start:end]

    def on_part_end(self) -> None:
        if self.field is None:
            self.finished = True
            return
        try:
            value = self.field.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadInputError(f"form field {self.field_name!r} is not UTF-8 text") from exc
        add_field(self.form, self.field_name, value)
        self.field = None

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()

    def saved(self) -> SavedArchive | None:
        if self.sink is None or not self.finished or not self.sink.size:
            return None
        return SavedArchive(
            self.path, self.sink.size, self.sink.digest.hexdigest(), self.filename or ""
        )
