"""Test vectors for the update bundle format: one valid bundle and the ways one can be wrong.

    .venv/bin/python tests/update_vectors.py tests/vectors/update

writes every vector and ``expected.json`` (for each bundle: the exit status of
``edgeid update verify BUNDLE --key vendor.pub`` and a piece of its one-line error).
Everything is deterministic (fixed keys, time stamps and payload), and
``tests/test_update_bundle.py`` regenerates the set and compares it byte for byte with the
committed copy, so the files and this script cannot drift apart.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from update_box import EPOCH, HARDWARE, signing_key, write_payload, write_public_key

from edgeid.updater.bundle import MANIFEST_MEMBER, PAYLOAD_PREFIX, SIGNATURE_MEMBER, build_bundle
from edgeid.updater.manifest import Manifest
from edgeid.updater.signing import sign_manifest

Member = tuple[tarfile.TarInfo, bytes]


def _members(bundle: Path) -> list[Member]:
    with tarfile.open(bundle, "r:") as tar:
        out = []
        for info in tar.getmembers():
            stream = tar.extractfile(info)
            out.append((info, stream.read() if stream else b""))
        return out


def _write(path: Path, members: list[Member]) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    path.write_bytes(buffer.getvalue())


def _info(name: str, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = EPOCH, mode, 0, 0, "", ""
    return info


def _resign(members: list[Member], manifest_bytes: bytes, key: str = "vendor") -> list[Member]:
    """Replace the manifest and sign it properly: the fault then lies elsewhere."""
    signature = sign_manifest(manifest_bytes, signing_key(key))
    rest = [m for m in members if m[0].name not in (MANIFEST_MEMBER, SIGNATURE_MEMBER)]
    return [(_info(MANIFEST_MEMBER), manifest_bytes), (_info(SIGNATURE_MEMBER), signature), *rest]


def _with_manifest(members: list[Member], edit: Callable[[dict[str, object]], None]) -> bytes:
    data = json.loads(members[0][1])
    edit(data)
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def generate(out: Path) -> dict[str, dict[str, object]]:
    out.mkdir(parents=True, exist_ok=True)
    write_public_key(out / "vendor.pub", "vendor")
    with tempfile.TemporaryDirectory() as tmp:
        payload = write_payload(Path(tmp) / "payload", "1.0.0")
        unsigned = Path(tmp) / "unsigned.bundle"
        build_bundle(payload, "1.0.0", [HARDWARE], unsigned, epoch=EPOCH)
        base = _members(unsigned)
    manifest_bytes = base[0][1]
    signed = _resign(base, manifest_bytes)
    payload_at = {info.name: i for i, (info, _) in enumerate(signed)}
    version_at = payload_at[PAYLOAD_PREFIX + "VERSION"]

    expected: dict[str, dict[str, object]] = {}

    def vector(name: str, members: list[Member] | bytes, status: int, error: str) -> None:
        path = out / f"{name}.bundle"
        if isinstance(members, bytes):
            path.write_bytes(members)
        else:
            _write(path, members)
        expected[name] = {"exit": status, "error": error}

    vector("valid", signed, 0, "")
    vector("unsigned", base, 2, "is not signed")
    vector("wrong-key", _resign(base, manifest_bytes, key="other"), 2, "any trusted update key")
    tampered = list(signed)
    info, data = tampered[version_at]
    tampered[version_at] = (info, b"9" + data[1:])  # same size, other bytes
    vector("tampered-payload", tampered, 2, "does not match its manifest hash")
    bumped = _with_manifest(signed, lambda m: m.update(version="9.9.9"))
    vector("tampered-manifest", [(_info(MANIFEST_MEMBER), bumped), *signed[1:]], 2, "trusted")
    vector("truncated", _cut_in_last_member(_tar_bytes(signed)), 2, "damaged")
    vector("not-a-tar", b"PK\x03\x04 a zip file, not a bundle\n", 2, "not an edgeid update bundle")
    vector("manifest-not-first", [signed[2], *signed[:2], *signed[3:]], 2, "must start with")
    short_sig = [signed[0], (_info(SIGNATURE_MEMBER), b"\0" * 63), *signed[2:]]
    vector("short-signature", short_sig, 2, "64-byte signature")
    extra = [*signed, (_info(PAYLOAD_PREFIX + "bin/backdoor", 0o755), b"#!/bin/sh\n")]
    vector("extra-member", extra, 2, "is not in the manifest")
    outside = [*signed, (_info("../../etc/cron.d/x"), b"* * * * * root sh\n")]
    vector("member-outside-payload", outside, 2, "is not in the manifest")
    vector("missing-member", signed[:version_at] + signed[version_at + 1 :], 2, "are missing")
    vector("duplicate-member", [*signed, signed[version_at]], 2, "appears twice")
    link = _info(PAYLOAD_PREFIX + "VERSION")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
    linked = list(signed)
    linked[version_at] = (link, b"")
    vector("symlink-member", linked, 2, "not a regular file")

    def traverse(m: dict[str, object]) -> None:
        files = m["files"]
        assert isinstance(files, list)
        files[0]["path"] = "../../etc/cron.d/edgeid"

    vector("path-traversal", _resign(base, _with_manifest(base, traverse)), 2, "plain relative")
    future = _resign(base, _with_manifest(base, lambda m: m.update(format="edgeid-update/2")))
    vector("unknown-format", future, 2, "manifest format")
    no_hw = _resign(base, _with_manifest(base, lambda m: m.update(hardware=[])))
    vector("no-hardware", no_hw, 2, "manifest hardware")
    Manifest.from_bytes(manifest_bytes, "check")  # the base really is a valid manifest
    (out / "expected.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")
    return expected


def _cut_in_last_member(data: bytes) -> bytes:
    """The bundle cut off halfway through its last payload file's bytes."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        last = tar.getmembers()[-1]
    return data[: last.offset_data + last.size // 2]


def _tar_bytes(members: list[Member]) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "b"
        _write(path, members)
        return path.read_bytes()


if __name__ == "__main__":
    generate(Path(sys.argv[1]))
