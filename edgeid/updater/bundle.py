"""Update bundles: one uncompressed tar file whose members come in this order

    manifest.json     the manifest (the exact bytes that are signed)
    manifest.sig      64 raw bytes of ed25519 signature (absent in an unsigned bundle)
    payload/<path>    each file the manifest lists, regular files only, nothing else

Nothing is ever extracted by tarfile: members are read as byte streams, their names checked
against the signed manifest and their bytes against its hashes, so links, devices, absolute or
``..`` names and extra or missing files are refused, not interpreted. Reading stops at the
first surprise, so a hostile bundle costs at most the sizes its manifest declares. Payloads are
usually wheels or images that are compressed already; the bundle itself is not.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from edgeid.runtime.compat import UTC
from edgeid.runtime.errors import BadInputError, EdgeidError
from edgeid.runtime.storage.durable import fsync_directory, write_error
from edgeid.updater.errors import BundleRejectedError, UpdateError
from edgeid.updater.manifest import Manifest, PayloadFile
from edgeid.updater.signing import TrustedKey, sign_manifest, verify_signature

MANIFEST_MEMBER = "manifest.json"
SIGNATURE_MEMBER = "manifest.sig"
PAYLOAD_PREFIX = "payload/"
SIGNATURE_BYTES = 64
# A manifest lists paths and hashes, about 150 bytes a file: 4 MiB is ~25,000 files.
MAX_MANIFEST_BYTES = 4 << 20
COPY_CHUNK = 1 << 20  # bounded memory whatever the payload's size
SOURCE_DATE_EPOCH_ENV = "SOURCE_DATE_EPOCH"  # reproducible builds: the time stamped in bundles


@dataclass(frozen=True)
class BundleHeader:
    manifest_bytes: bytes
    signature: bytes | None
    mtime: int  # of the manifest member: kept when the bundle is re-written by signing


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature and every payload hash have been checked."""

    path: Path
    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes
    signer: TrustedKey

    def payload(self) -> Iterator[tuple[PayloadFile, Iterator[bytes]]]:
        """Each payload file with its bytes, read again from the bundle and hashed again.

        The file was checked once already; this second read guards against the bundle being
        replaced in between, so the bytes written to a slot are the bytes that were verified.
        Each chunk iterator raises ``UpdateError`` at its end if the hash differs.
        """
        with _open(self.path) as tar:
            header, first = _read_header(tar, self.path)
            if (header.manifest_bytes, header.signature) != (self.manifest_bytes, self.signature):
                raise UpdateError(f"{self.path} changed while it was being installed; retry")
            for entry, member in _payload_members(tar, self.manifest, first, self.path):
                chunks = _verified_chunks(tar, member, entry, self.path, changed=True)
                yield entry, chunks
                for _ in chunks:  # drain, so a consumer that stopped early is still checked
                    pass


def _open(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r:")
    except FileNotFoundError:
        raise BadInputError(f"bundle {path} not found; check the path") from None
    except IsADirectoryError:
        raise BadInputError(f"{path} is a folder; give the bundle file") from None
    except (tarfile.TarError, OSError) as exc:
        raise BundleRejectedError(
            f"{path} is not an edgeid update bundle (an uncompressed tar): {exc}"
        ) from None


def _next(tar: tarfile.TarFile, where: Path) -> tarfile.TarInfo | None:
    try:
        return tar.next()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleRejectedError(f"{where} is damaged ({exc}); get the bundle again") from None


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, where: Path) -> bytes:
    stream = tar.extractfile(member)
    assert stream is not None  # regular files only reach here
    try:
        data = stream.read(member.size)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleRejectedError(f"{where} is damaged ({exc}); get the bundle again") from None
    if len(data) != member.size:
        raise BundleRejectedError(f"{where} is truncated; get the bundle again")
    return data


def _read_header(tar: tarfile.TarFile, where: Path) -> tuple[BundleHeader, tarfile.TarInfo | None]:
    """The manifest and signature, and the first payload member after them."""
    first = _next(tar, where)
    if first is None or first.name != MANIFEST_MEMBER or not first.isreg():
        raise BundleRejectedError(
            f"{where} is not an edgeid update bundle: it must start with {MANIFEST_MEMBER}"
        )
    if first.size > MAX_MANIFEST_BYTES:
        raise BundleRejectedError(f"{where}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
    manifest_bytes = _read_member(tar, first, where)
    member = _next(tar, where)
    signature = None
    if member is not None and member.name == SIGNATURE_MEMBER:
        if not member.isreg() or member.size != SIGNATURE_BYTES:
            raise BundleRejectedError(f"{where}: {SIGNATURE_MEMBER} is not a 64-byte signature")
        signature = _read_member(tar, member, where)
        member = _next(tar, where)
    return BundleHeader(manifest_bytes, signature, int(first.mtime)), member


def _payload_members(
    tar: tarfile.TarFile, manifest: Manifest, first: tarfile.TarInfo | None, where: Path
) -> Iterator[tuple[PayloadFile, tarfile.TarInfo]]:
    """Each payload member, after checking it is exactly what the manifest announces."""
    expected = {entry.path: entry for entry in manifest.files}
    seen: set[str] = set()
    member = first
    while member is not None:
        name = member.name
        path = name[len(PAYLOAD_PREFIX) :] if name.startswith(PAYLOAD_PREFIX) else None
        entry = expected.get(path) if path is not None else None
        if path is None or entry is None:
            raise BundleRejectedError(f"{where}: member {name!r} is not in the manifest")
        if path in seen:
            raise BundleRejectedError(f"{where}: payload file {path} appears twice")
        if not member.isreg() or member.issparse():
            raise BundleRejectedError(f"{where}: payload member {path} is not a regular file")
        if member.size != entry.size:
            raise BundleRejectedError(
                f"{where}: payload file {path} is {member.size} bytes, the manifest says "
                f"{entry.size}; the bundle was altered"
            )
        seen.add(path)
        yield entry, member
        member = _next(tar, where)
    missing = sorted(expected.keys() - seen)
    if missing:
        raise BundleRejectedError(
            f"{where}: {len(missing)} payload file(s) of the manifest are missing, e.g. "
            f"{missing[0]}; the bundle is incomplete"
        )


def _verified_chunks(
    tar: tarfile.TarFile, member: tarfile.TarInfo, entry: PayloadFile, where: Path, changed: bool
) -> Iterator[bytes]:
    stream = tar.extractfile(member)
    assert stream is not None
    digest = hashlib.sha256()
    remaining = entry.size
    try:
        while remaining:
            chunk = stream.read(min(COPY_CHUNK, remaining))
            if not chunk:
                raise BundleRejectedError(f"{where} is truncated in {entry.path}")
            digest.update(chunk)
            remaining -= len(chunk)
            yield chunk
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleRejectedError(f"{where} is damaged ({exc}); get the bundle again") from None
    if digest.hexdigest() != entry.sha256:
        if changed:
            raise UpdateError(f"{where} changed while it was being installed ({entry.path}); retry")
        raise BundleRejectedError(
            f"{where}: payload file {entry.path} does not match its manifest hash; "
            "the bundle was altered, get it again"
        )


def read_unsigned(path: Path) -> tuple[BundleHeader, Manifest]:
    """Header and manifest after checking every payload hash; the signature is not checked
    (the vendor's side: signing, and checking a freshly built bundle)."""
    with _open(path) as tar:
        header, first = _read_header(tar, path)
        manifest = Manifest.from_bytes(header.manifest_bytes, str(path))
        for entry, member in _payload_members(tar, manifest, first, path):
            for _ in _verified_chunks(tar, member, entry, path, changed=False):
                pass
    return header, manifest


def verify_bundle(path: Path, keys: list[TrustedKey]) -> VerifiedBundle:
    """Signature first, then the manifest, then every payload hash; refuses on the first fault.

    Read-only: nothing on the box is touched, whatever the outcome.
    """
    with _open(path) as tar:
        header, first = _read_header(tar, path)
        if header.signature is None:
            raise BundleRejectedError(
                f"{path} is not signed; sign it with edgeid update sign before installing"
            )
        signer = verify_signature(header.manifest_bytes, header.signature, keys)
        manifest = Manifest.from_bytes(header.manifest_bytes, str(path))
        for entry, member in _payload_members(tar, manifest, first, path):
            for _ in _verified_chunks(tar, member, entry, path, changed=False):
                pass
    return VerifiedBundle(path, manifest, header.manifest_bytes, header.signature, signer)


# Building and signing (the vendor's side).


def _tar_info(name: str, size: int, executable: bool, mtime: int) -> tarfile.TarInfo:
    """Deterministic member metadata: the same payload gives the same bundle bytes."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o755 if executable else 0o644
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _HashingReader(io.RawIOBase):
    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.digest.update(data)
        return data


def _scan_payload(root: Path) -> list[PayloadFile]:
    entries: list[PayloadFile] = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in [*sorted(files), *(d for d in dirs if (Path(folder) / d).is_symlink())]:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            info = path.lstat()
            if not stat.S_ISREG(info.st_mode):
                raise BadInputError(
                    f"payload {rel} is not a regular file (a link or device); bundles carry "
                    "regular files only: replace it with the file itself"
                )
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                while chunk := handle.read(COPY_CHUNK):
                    digest.update(chunk)
            entries.append(
                PayloadFile(
                    path=rel,
                    size=info.st_size,
                    sha256=digest.hexdigest(),
                    executable=bool(info.st_mode & stat.S_IXUSR),
                )
            )
    if not entries:
        raise BadInputError(f"payload folder {root} is empty; give the folder to ship")
    return entries


def _created(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_new_file(out: Path, fill: Callable[[IO[bytes]], None], action: str) -> None:
    """Write a bundle through a temporary file, fsync and rename: never a half bundle."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.chmod(0o644)
        os.replace(tmp, out)
        fsync_directory(out.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(action, str(out.parent), exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build_bundle(
    payload_dir: Path,
    version: str,
    hardware: list[str],
    out: Path,
    *,
    epoch: int | None = None,
) -> Manifest:
    """An unsigned bundle of every file under ``payload_dir``.

    ``epoch`` (default: $SOURCE_DATE_EPOCH, else now) is stamped as ``created`` and on every
    member, so a rebuild of the same payload gives the same bytes.
    """
    if not payload_dir.is_dir():
        raise BadInputError(f"payload folder {payload_dir} not found; give the folder to ship")
    if out.resolve().is_relative_to(payload_dir.resolve()):
        raise BadInputError(f"{out} is inside the payload folder; write the bundle elsewhere")
    if epoch is None:
        epoch = int(os.environ.get(SOURCE_DATE_EPOCH_ENV) or datetime.now(UTC).timestamp())
    files = _scan_payload(payload_dir)
    try:
        manifest = Manifest(
            version=version, hardware=hardware, created=_created(epoch), files=files
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise BadInputError(f"bundle {key}: {first['msg']}") from None
    manifest_bytes = manifest.to_bytes()

    def fill(handle: IO[bytes]) -> None:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = _tar_info(MANIFEST_MEMBER, len(manifest_bytes), False, epoch)
            tar.addfile(info, io.BytesIO(manifest_bytes))
            for entry in manifest.files:
                with (payload_dir / entry.path).open("rb") as source:
                    reader = _HashingReader(source)
                    name = PAYLOAD_PREFIX + entry.path
                    tar.addfile(_tar_info(name, entry.size, entry.executable, epoch), reader)
                if reader.digest.hexdigest() != entry.sha256:
                    raise EdgeidError(
                        f"payload file {entry.path} changed while the bundle was built; build again"
                    )

    _write_new_file(out, fill, "writing the bundle")
    return manifest


def sign_bundle(bundle: Path, key: Ed25519PrivateKey, out: Path | None = None) -> Manifest:
    """Write ``out`` (default: ``bundle`` itself) with a signature over the bundle's manifest.

    The payload is checked against the manifest while it is copied: a bundle altered after it
    was built is refused, never signed.
    """
    header, manifest = read_unsigned(bundle)
    signature = sign_manifest(header.manifest_bytes, key)

    def fill(handle: IO[bytes]) -> None:
        with (
            _open(bundle) as source,
            tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            again, first = _read_header(source, bundle)
            if again.manifest_bytes != header.manifest_bytes:
                raise UpdateError(f"{bundle} changed while it was being signed; sign again")
            mtime = header.mtime
            info = _tar_info(MANIFEST_MEMBER, len(header.manifest_bytes), False, mtime)
            tar.addfile(info, io.BytesIO(header.manifest_bytes))
            info = _tar_info(SIGNATURE_MEMBER, len(signature), False, mtime)
            tar.addfile(info, io.BytesIO(signature))
            for entry, member in _payload_members(source, manifest, first, bundle):
                chunks = _verified_chunks(source, member, entry, bundle, changed=False)
                info = _tar_info(member.name, entry.size, entry.executable, mtime)
                tar.addfile(info, _ChunkReader(chunks))
                for _ in chunks:  # runs the hash check, which follows the last chunk
                    pass

    _write_new_file(out or bundle, fill, "writing the signed bundle")
    return manifest


class _ChunkReader(io.RawIOBase):
    """A file-like view of a chunk iterator, for tarfile.addfile."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        if size < 0:
            size = len(self._buffer)
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data
