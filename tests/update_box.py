"""Helpers for the update tests: test-only signing keys, payloads, a box's state directory.

The keys are derived from fixed seeds so the test vectors in tests/vectors/update are
reproducible; they sign nothing but test bundles.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeid.updater.bundle import build_bundle, sign_bundle
from edgeid.updater.signing import public_pem

REPO_ROOT = Path(__file__).resolve().parent.parent
VECTORS_DIR = Path(__file__).resolve().parent / "vectors" / "update"
HARDWARE = "generic-test"
EPOCH = 1_700_000_000  # stamped in every test bundle, so rebuilding gives the same bytes
HEALTHY = "#!/bin/sh\nexit 0\n"
UNHEALTHY = "#!/bin/sh\necho 'selftest: embedder output differs from the reference' >&2\nexit 1\n"
CLI_TIMEOUT_S = 60


def signing_key(name: str) -> Ed25519PrivateKey:
    """A deterministic key for tests ("vendor", "other"); never for a real bundle."""
    seed = hashlib.sha256(f"edgeid update test key: {name}".encode()).digest()
    return Ed25519PrivateKey.from_private_bytes(seed)


def write_payload(folder: Path, version: str, *, healthy: bool = True, extra: int = 1) -> Path:
    """A payload tree: an executable health check, a version file and ``extra`` data files."""
    (folder / "bin").mkdir(parents=True, exist_ok=True)
    check = folder / "bin" / "healthcheck"
    check.write_text(HEALTHY if healthy else UNHEALTHY)
    check.chmod(0o755)
    (folder / "VERSION").write_text(f"{version}\n")
    for index in range(extra):
        data = folder / "share" / f"model-{index}.bin"
        data.parent.mkdir(exist_ok=True)
        data.write_bytes(hashlib.sha256(f"{version}:{index}".encode()).digest() * 64)
    return folder


def make_bundle(
    work: Path,
    version: str,
    *,
    healthy: bool = True,
    hardware: str = HARDWARE,
    key: str | None = "vendor",
    extra: int = 1,
) -> tuple[Path, Path]:
    """(bundle, payload folder) for ``version``, signed by the named test key (None: unsigned)."""
    tag = f"{version}-{key}-{'ok' if healthy else 'bad'}-{hardware}-{extra}"
    payload = write_payload(work / f"payload-{tag}", version, healthy=healthy, extra=extra)
    bundle = work / f"edgeid-{tag}.bundle"
    build_bundle(payload, version, [hardware], bundle, epoch=EPOCH)
    if key is not None:
        sign_bundle(bundle, signing_key(key))
    return bundle, payload


def write_public_key(path: Path, name: str = "vendor") -> Path:
    path.write_bytes(public_pem(signing_key(name)))
    return path


class Box:
    """A box's state directory: settings for tests, the vendor key trusted."""

    def __init__(self, home: Path, *, restart_command: list[str] | None = None) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        (home / "edgeid.toml").write_text(
            "[updates]\n"
            f'hardware_id = "{HARDWARE}"\n'
            'health_command = ["{slot}/bin/healthcheck"]\n'
            f"restart_command = {json.dumps(restart_command or [])}\n"
        )
        keys = home / "update-keys"
        keys.mkdir(exist_ok=True)
        write_public_key(keys / "vendor.pem")

    @property
    def slots(self) -> Path:
        return self.home / "slots"

    def cli(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edgeid", *args, "--home", str(self.home)],
            cwd=REPO_ROOT,
            env=os.environ | (env or {}),
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
        )

    def active_tree(self) -> dict[str, tuple[bytes, bool]]:
        return tree(self.slots / "current")


def tree(folder: Path) -> dict[str, tuple[bytes, bool]]:
    """Every file under ``folder``: its bytes and whether it is executable; links are errors."""
    found: dict[str, tuple[bytes, bool]] = {}
    for path in sorted(folder.resolve().rglob("*")):
        info = path.lstat()
        assert not stat.S_ISLNK(info.st_mode), f"unexpected link {path}"
        if stat.S_ISREG(info.st_mode):
            rel = path.relative_to(folder.resolve()).as_posix()
            found[rel] = (path.read_bytes(), bool(info.st_mode & stat.S_IXUSR))
    return found


def snapshot(folder: Path) -> dict[str, tuple[str, bytes | str, int]]:
    """Everything under ``folder`` byte for byte: files, links (targets) and folders, with modes."""
    found: dict[str, tuple[str, bytes | str, int]] = {}
    if not folder.exists():
        return found
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        rel = path.relative_to(folder).as_posix()
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISLNK(info.st_mode):
            found[rel] = ("link", os.readlink(path), mode)
        elif stat.S_ISREG(info.st_mode):
            found[rel] = ("file", path.read_bytes(), mode)
        else:
            found[rel] = ("dir", b"", mode)
    return found
