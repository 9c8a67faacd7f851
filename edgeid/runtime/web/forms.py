"""Request bodies read into memory with hard limits; uploaded photos never touch the disk.

Starlette's own form parser spools file parts over 1 MiB to a temporary file; a probe photo
must never be written to disk, so bodies are read here, bounded by ``max_bytes``, and parsed
in memory. A body over the limit is refused (413) as soon as it is known to be over: from
``Content-Length`` before a byte is read, or while it streams.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from edgeid.runtime.errors import BadInputError

# Forms without a file (login, search start, user edits) are small.
MAX_FORM_BYTES = 64 * 1024
MAX_PARTS = 32  # the largest form has about a dozen fields
MAX_FIELD_CHARS = 20_000  # a subject's notes (edgeid/runtime/gallery/records.py MAX_TEXT_CHARS)
# Room for the fields and multipart framing that come with the photo.
MULTIPART_OVERHEAD_BYTES = 256 * 1024


class BodyTooLargeError(BadInputError):
    """The request body is over the limit (HTTP 413)."""


class UnsupportedBodyError(BadInputError):
    """The request body is not a form this endpoint reads (HTTP 415)."""


@dataclass(frozen=True)
class UploadedFile:
    filename: str
    content_type: str
    data: bytes


@dataclass
class FormData:
    fields: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, UploadedFile] = field(default_factory=dict)

    def get(self, name: str, default: str = "") -> str:
        values = self.fields.get(name)
        return values[0] if values else default

    def all(self, name: str) -> list[str]:
        return list(self.fields.get(name, []))


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, or ``BodyTooLargeError`` once it is known to exceed ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadInputError("Content-Length is not a number") from None
        if size > max_bytes:
            raise BodyTooLargeError(
                f"the upload is {size} bytes, over the {max_bytes}-byte limit; send a smaller photo"
            )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise BodyTooLargeError(
                f"the upload is over the {max_bytes}-byte limit; send a smaller photo"
            )
    return bytes(body)


async def read_form(request: Request, *, max_file_bytes: int) -> FormData:
    """A urlencoded or multipart form; multipart may carry files up to ``max_file_bytes``."""
    kind, params = parse_options_header(request.headers.get("content-type"))
    if kind == b"application/x-www-form-urlencoded":
        body = await read_body(request, MAX_FORM_BYTES)
        return _parse_urlencoded(body)
    if kind == b"multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise BadInputError("multipart form without a boundary")
        body = await read_body(request, max_file_bytes + MULTIPART_OVERHEAD_BYTES)
        return parse_multipart(body, boundary, max_file_bytes=max_file_bytes)
    if not kind and not await read_body(request, 0):
        return FormData()
    raise UnsupportedBodyError("send the form as application/x-www-form-urlencoded or multipart")


def _parse_urlencoded(body: bytes) -> FormData:
    try:
        pairs = parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            max_num_fields=MAX_PARTS,
            strict_parsing=False,
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadInputError("the form is malformed or has too many fields") from exc
    form = FormData()
    for name, value in pairs:
        add_field(form, name, value)
    return form


def add_field(form: FormData, name: str, value: str) -> None:
    if len(value) > MAX_FIELD_CHARS:
        raise BadInputError(f"form field {name!r} is longer than {MAX_FIELD_CHARS} characters")
    form.fields.setdefault(name, []).append(value)


@dataclass
class _Part:
    headers: dict[str, bytes] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)


def parse_multipart(body: bytes, boundary: bytes, *, max_file_bytes: int) -> FormData:
    parts: list[_Part] = []
    header_name = bytearray()
    header_value = bytearray()

    def on_part_begin() -> None:
        if len(parts) >= MAX_PARTS:
            raise BadInputError(f"the form has more than {MAX_PARTS} parts")
        parts.append(_Part())

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].data += data[start:end]

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        parts[-1].headers[header_name.decode("latin-1").lower()] = bytes(header_value)
        header_name.clear()
        header_value.clear()

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise BadInputError("the upload is malformed (broken multipart form)") from exc
    form = FormData()
    for part in parts:
        _, options = parse_options_header(part.headers.get("content-disposition"))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in options:
            if len(part.data) > max_file_bytes:
                raise BodyTooLargeError(
                    f"the photo is {len(part.data)} bytes, over the {max_file_bytes}-byte limit"
                )
            if name in form.files:
                raise BadInputError(f"send one file in field {name!r}, not several")
            kind, _ = parse_options_header(part.headers.get("content-type"))
            form.files[name] = UploadedFile(
                filename=options[b"filename"].decode("utf-8", "replace"),
                content_type=kind.decode("latin-1"),
                data=bytes(part.data),
            )
        else:
            try:
                value = part.data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadInputError(f"form field {name!r} is not UTF-8 text") from exc
            add_field(form, name, value)
    return form
