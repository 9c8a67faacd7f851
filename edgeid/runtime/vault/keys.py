"""Envelope keys: a random data key per gallery, wrapped by the device's key-encryption key.

The KEK comes from a provider:

- ``PassphraseProvider``: scrypt of a passphrase; the salt and cost are stored in the keyring.
- ``KeyFileProvider``: 32 random bytes in a 0600 file, one file per KEK.
- ``SystemdCredsProvider``: a random KEK sealed by ``systemd-creds`` (host key and/or TPM).
- ``Tpm2Provider``: a random KEK sealed by the TPM with tpm2-tools.

The keyring (``keyring.json``) holds the KEK's provider, id, public parameters and a check
value, and every gallery's wrapped data keys. It is replaced atomically on every change, so a
rotation re-wraps all data keys at once; afterwards the old KEK opens nothing, and the
provider destroys the old KEK's stored material.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from edgeid.runtime.errors import StorageWriteError
from edgeid.runtime.storage.durable import (
    FileWriter,
    make_private_dir,
    shred_and_unlink,
    write_file_atomically,
)
from edgeid.runtime.vault.crypto import (
    KEY_BYTES,
    NONCE_BYTES,
    SCRYPT_DEFAULT_LOG2_N,
    Clock,
    RandomSource,
    ScryptParams,
    derive_key,
    new_scrypt_params,
    open_sealed,
    seal,
    system_random,
    unwrap_key,
    utc_now,
    wrap_key,
)
from edgeid.runtime.vault.errors import (
    DecryptionError,
    KeyProviderError,
    KeyProviderUnavailableError,
    KeyringError,
    UnknownKeyError,
    VaultError,
)

logger = logging.getLogger(__name__)

KEYRING_FORMAT = "edgeid-keyring"
KEYRING_VERSION = 1
ID_HEX_CHARS = 32  # 128-bit random ids for KEKs and data keys
TOOL_TIMEOUT_S = 60.0  # the key tools answer in well under a second; longer is a hang

Params = dict[str, object]


def new_id(random: RandomSource = system_random) -> str:
    return random(ID_HEX_CHARS // 2).hex()


def is_gallery_scope(scope_id: str) -> bool:
    """Galleries have random hex ids; other scopes hold a service's keys (``audit``)."""
    return len(scope_id) == ID_HEX_CHARS and all(c in "0123456789abcdef" for c in scope_id)


class KekProvider(Protocol):
    """Makes, recovers and destroys a key-encryption key; stores nothing secret in the keyring."""

    @property
    def kind(self) -> str: ...

    def create(self, kek_id: str) -> tuple[bytes, Params]:
        """A new KEK, with the public parameters the keyring keeps to recover it."""
        ...

    def load(self, kek_id: str, params: Mapping[str, object]) -> bytes:
        """Recover the KEK; ``DecryptionError`` when this provider cannot open it."""
        ...

    def destroy(self, kek_id: str) -> None:
        """Erase whatever this provider stored for a retired KEK."""
        ...


class PassphraseProvider:
    """KEK = scrypt(passphrase, salt); nothing is stored but the salt and cost."""

    kind = "passphrase"

    def __init__(
        self,
        passphrase: str,
        *,
        log2_n: int = SCRYPT_DEFAULT_LOG2_N,
        random: RandomSource = system_random,
    ) -> None:
        if not passphrase:
            raise KeyProviderError("the passphrase is empty; give the gallery passphrase")
        self._passphrase = passphrase
        self._log2_n = log2_n
        self._random = random

    def create(self, kek_id: str) -> tuple[bytes, Params]:
        params = new_scrypt_params(log2_n=self._log2_n, random=self._random)
        return derive_key(self._passphrase, params), {"scrypt": params.to_json()}

    def load(self, kek_id: str, params: Mapping[str, object]) -> bytes:
        scrypt = params.get("scrypt")
        if not isinstance(scrypt, dict):
            raise KeyringError("keyring: passphrase KEK has no scrypt parameters")
        try:
            return derive_key(self._passphrase, ScryptParams.from_json(scrypt))
        except (VaultError, StorageWriteError) as exc:
            raise KeyringError(f"keyring: {exc}") from exc

    def destroy(self, kek_id: str) -> None:
        """Nothing is stored; the old passphrase opens nothing once its salt is gone."""


class KeyFileProvider:
    """KEK = 32 random bytes in ``<key_dir>/kek-<id>.key``, mode 0600."""

    kind = "keyfile"

    def __init__(self, key_dir: Path, *, random: RandomSource = system_random) -> None:
        self.key_dir = key_dir
        self._random = random

    def path(self, kek_id: str) -> Path:
        return self.key_dir / f"kek-{kek_id}.key"

    def create(self, kek_id: str) -> tuple[bytes, Params]:
        make_private_dir(self.key_dir)
        kek = self._random(KEY_BYTES)
        write_file_atomically(self.path(kek_id), kek, action="writing the key file")
        return kek, {}

    def load(self, kek_id: str, params: Mapping[str, object]) -> bytes:
        path = self.path(kek_id)
        try:
            info = path.stat()
            if info.st_mode & 0o077:
                raise KeyProviderError(
                    f"key file {path} is readable by other users (mode "
                    f"{stat.S_IMODE(info.st_mode):o}); run chmod 600 {path}"
                )
            kek = path.read_bytes()
        except FileNotFoundError:
            raise KeyProviderError(
                f"key file {path} not found; restore it, or use the key provider the keyring "
                "was made with"
            ) from None
        except OSError as exc:
            raise KeyProviderError(f"cannot read key file {path}: {exc.strerror}") from exc
        if len(kek) != KEY_BYTES:
            raise KeyProviderError(f"key file {path} is {len(kek)} bytes, not {KEY_BYTES}")
        return kek

    def destroy(self, kek_id: str) -> None:
        shred_and_unlink(self.path(kek_id))


def _run_tool(
    argv: Sequence[str], *, stdin: bytes = b"", env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run a key tool; secrets go through stdin and stdout, never the command line."""
    try:
        return subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            timeout=TOOL_TIMEOUT_S,
            env=dict(env) if env is not None else None,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KeyProviderUnavailableError(f"{argv[0]} could not run: {exc}") from exc


def _last_line(stderr: bytes) -> str:
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else "no message"


class SystemdCredsProvider:
    """A random KEK sealed with ``systemd-creds encrypt`` into ``<key_dir>/kek-<id>.cred``.

    systemd-creds binds the credential to the host key in /var/lib/systemd and, where the
    machine has one, to its TPM; ``available()`` says whether it works here.
    """

    kind = "systemd-creds"

    def __init__(
        self,
        key_dir: Path,
        *,
        binary: str = "systemd-creds",
        with_key: str | None = None,
        random: RandomSource = system_random,
    ) -> None:
        self.key_dir = key_dir
        self._binary = binary
        self._with_key = with_key
        self._random = random
        self._available: bool | None = None

    def path(self, kek_id: str) -> Path:
        return self.key_dir / f"kek-{kek_id}.cred"

    def _encrypt(self, name: str, secret: bytes) -> subprocess.CompletedProcess[bytes]:
        argv = [self._binary, "encrypt", f"--name={name}"]
        if self._with_key:
            argv.append(f"--with-key={self._with_key}")
        return _run_tool([*argv, "-", "-"], stdin=secret)

    def available(self) -> bool:
        """True when the binary exists and an encrypt/decrypt round trip works."""
        if self._available is None:
            self._available = self._probe()
        return self._available

    def _probe(self) -> bool:
        if shutil.which(self._binary) is None:
            return False
        probe = self._random(16)
        try:
            sealed = self._encrypt("edgeid-probe", probe)
            if sealed.returncode != 0:
                logger.info("systemd-creds unavailable: %s", _last_line(sealed.stderr))
                return False
            with tempfile.TemporaryDirectory() as tmp:
                cred = Path(tmp) / "probe.cred"
                cred.write_bytes(sealed.stdout)
                opened = _run_tool([self._binary, "decrypt", "--name=edgeid-probe", str(cred), "-"])
        except KeyProviderUnavailableError:
            return False
        return opened.returncode == 0 and opened.stdout == probe

    def _require(self) -> None:
        if not self.available():
            raise KeyProviderUnavailableError(
                f"{self._binary} is missing or cannot encrypt on this machine; use a TPM, key "
                "file or passphrase provider"
            )

    def create(self, kek_id: str) -> tuple[bytes, Params]:
        self._require()
        make_private_dir(self.key_dir)
        kek = self._random(KEY_BYTES)
        sealed = self._encrypt(f"edgeid-kek-{kek_id}", kek)
        if sealed.returncode != 0:
            raise KeyProviderError(f"systemd-creds encrypt failed: {_last_line(sealed.stderr)}")
        write_file_atomically(self.path(kek_id), sealed.stdout, action="writing the credential")
        return kek, {"with_key": self._with_key or "default"}

    def load(self, kek_id: str, params: Mapping[str, object]) -> bytes:
        self._require()
        path = self.path(kek_id)
        if not path.exists():
            raise KeyProviderError(f"credential {path} not found; restore it from the box's backup")
        opened = _run_tool([self._binary, "decrypt", f"--name=edgeid-kek-{kek_id}", str(path), "-"])
        if opened.returncode != 0 or len(opened.stdout) != KEY_BYTES:
            logger.warning("systemd-creds could not open the KEK: %s", _last_line(opened.stderr))
            raise DecryptionError()
        return opened.stdout

    def destroy(self, kek_id: str) -> None:
        shred_and_unlink(self.path(kek_id))


class Tpm2Provider:
    """A random KEK sealed to the TPM's owner hierarchy with tpm2-tools.

    The sealed object's public and private blobs live in ``<key_dir>/kek-<id>.tpm.{pub,priv}``;
    only this TPM can load them (the parent is the owner hierarchy's primary key, recreated
    from the TPM's seed each time). ``tcti`` selects the TPM (``device:/dev/tpmrm0``, or
    ``swtpm:host=127.0.0.1,port=N`` in tests); ``None`` uses tpm2-tools' default.
    """

    kind = "tpm2"
    TOOLS = ("tpm2_getcap", "tpm2_createprimary", "tpm2_create", "tpm2_load", "tpm2_unseal")

    def __init__(
        self, key_dir: Path, *, tcti: str | None = None, random: RandomSource = system_random
    ) -> None:
        self.key_dir = key_dir
        self.tcti = tcti
        self._random = random

    def paths(self, kek_id: str) -> tuple[Path, Path]:
        return (
            self.key_dir / f"kek-{kek_id}.tpm.pub",
            self.key_dir / f"kek-{kek_id}.tpm.priv",
        )

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.tcti:
            env["TPM2TOOLS_TCTI"] = self.tcti
        return env

    def _tool(self, *argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return _run_tool(argv, stdin=stdin, env=self._env())

    def available(self) -> bool:
        """True when tpm2-tools are installed and the TPM answers."""
        if any(shutil.which(tool) is None for tool in self.TOOLS):
            return False
        try:
            return self._tool("tpm2_getcap", "properties-fixed").returncode == 0
        except KeyProviderUnavailableError:
            return False

    def _flush(self) -> None:
        """Free transient slots: without a resource manager the TPM holds only a few."""
        self._tool("tpm2_flushcontext", "-t")

    def _primary(self, workdir: Path) -> Path:
        ctx = workdir / "primary.ctx"
        done = self._tool(
            "tpm2_createprimary", "-C", "o", "-g", "sha256", "-G", "ecc", "-c", str(ctx), "-Q"
        )
        self._flush()
        if done.returncode != 0:
            raise KeyProviderUnavailableError(
                f"the TPM did not create its primary key: {_last_line(done.stderr)}"
            )
        return ctx

    def create(self, kek_id: str) -> tuple[bytes, Params]:
        if not self.available():
            raise KeyProviderUnavailableError(
                "no TPM answers (or tpm2-tools are missing); use another key provider"
            )
        make_private_dir(self.key_dir)
        kek = self._random(KEY_BYTES)
        pub, priv = self.paths(kek_id)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            primary = self._primary(work)
            made = self._tool(
                "tpm2_create", "-C", str(primary), "-g", "sha256", "-i", "-",
                "-u", str(work / "pub"), "-r", str(work / "priv"), "-Q",
                stdin=kek,
            )  # fmt: skip
            self._flush()
            if made.returncode != 0:
                raise KeyProviderError(f"the TPM did not seal the KEK: {_last_line(made.stderr)}")
            write_file_atomically(pub, (work / "pub").read_bytes(), action="writing the TPM blob")
            write_file_atomically(priv, (work / "priv").read_bytes(), action="writing the TPM blob")
        return kek, {"hierarchy": "owner", "primary": "ecc-p256-sha256"}

    def load(self, kek_id: str, params: Mapping[str, object]) -> bytes:
        pub, priv = self.paths(kek_id)
        if not (pub.exists() and priv.exists()):
            raise KeyProviderError(f"sealed KEK {pub} not found; restore it from the box's backup")
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            primary = self._primary(work)
            sealed_ctx = work / "seal.ctx"
            loaded = self._tool(
                "tpm2_load", "-C", str(primary), "-u", str(pub), "-r", str(priv),
                "-c", str(sealed_ctx), "-Q",
            )  # fmt: skip
            self._flush()
            opened = None
            if loaded.returncode == 0:
                opened = self._tool("tpm2_unseal", "-c", str(sealed_ctx))
                self._flush()
        if opened is None or opened.returncode != 0 or len(opened.stdout) != KEY_BYTES:
            failed = loaded if opened is None else opened
            logger.warning("the TPM could not unseal the KEK: %s", _last_line(failed.stderr))
            raise DecryptionError()
        return opened.stdout

    def destroy(self, kek_id: str) -> None:
        for path in self.paths(kek_id):
            shred_and_unlink(path)


def _wrap_context(kek_id: str, gallery_id: str, key_id: str) -> bytes:
    return f"edgeid/keyring/v{KEYRING_VERSION}/{kek_id}/{gallery_id}/{key_id}".encode()


def _check_aad(kek_id: str) -> bytes:
    return f"edgeid/keyring/v{KEYRING_VERSION}/kek-check/{kek_id}".encode()


class Keyring:
    """The device's wrapped data keys, one file, replaced atomically on every change."""

    def __init__(
        self,
        path: Path,
        provider: KekProvider,
        kek: bytes,
        kek_info: dict[str, object],
        wrapped: dict[str, dict[str, str]],
        *,
        random: RandomSource,
        clock: Clock,
        writer: FileWriter | None,
    ) -> None:
        self.path = path
        self._provider = provider
        self._kek = kek
        self._kek_info = kek_info
        self._wrapped = wrapped
        self._random = random
        self._clock = clock
        self._writer = writer

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: Path,
        provider: KekProvider,
        *,
        random: RandomSource = system_random,
        clock: Clock = utc_now,
        writer: FileWriter | None = None,
    ) -> Keyring:
        if path.exists():
            raise KeyringError(f"keyring {path} already exists; open it instead")
        kek_id = new_id(random)
        kek, params = provider.create(kek_id)
        info = cls._describe_kek(provider, kek_id, kek, params, random, clock)
        ring = cls(path, provider, kek, info, {}, random=random, clock=clock, writer=writer)
        ring._save()
        logger.info("created keyring %s with a %s KEK", path, provider.kind)
        return ring

    @classmethod
    def open(
        cls,
        path: Path,
        provider: KekProvider,
        *,
        random: RandomSource = system_random,
        clock: Clock = utc_now,
        writer: FileWriter | None = None,
    ) -> Keyring:
        info, wrapped = read_keyring(path)
        if info.get("provider") != provider.kind:
            raise KeyProviderError(
                f"keyring {path} is protected by a {info.get('provider')} KEK, not "
                f"{provider.kind}; use the matching key provider"
            )
        kek_id, params, check = info.get("kek_id"), info.get("params"), info.get("check")
        if not (isinstance(kek_id, str) and isinstance(params, dict) and isinstance(check, str)):
            raise KeyringError(f"keyring {path} has a malformed KEK entry; restore it")
        kek = provider.load(kek_id, params)
        _verify_check(kek, kek_id, check)
        return cls(path, provider, kek, info, wrapped, random=random, clock=clock, writer=writer)

    @staticmethod
    def _describe_kek(
        provider: KekProvider,
        kek_id: str,
        kek: bytes,
        params: Params,
        random: RandomSource,
        clock: Clock,
    ) -> dict[str, object]:
        sealed = seal(kek, b"", _check_aad(kek_id), random=random)
        return {
            "provider": provider.kind,
            "kek_id": kek_id,
            "params": params,
            "check": (sealed.nonce + sealed.ciphertext).hex(),
            "created_at": clock().isoformat(),
        }

    # -- reading -------------------------------------------------------------------------

    @property
    def provider_kind(self) -> str:
        return self._provider.kind

    @property
    def kek_id(self) -> str:
        return str(self._kek_info["kek_id"])

    def gallery_ids(self) -> list[str]:
        """Gallery scopes only: a named scope (the audit log's ``audit``) is not a gallery."""
        return sorted(gid for gid in self._wrapped if is_gallery_scope(gid))

    def key_ids(self, gallery_id: str) -> list[str]:
        return sorted(self._wrapped.get(gallery_id, {}))

    def wrapped_keys(self) -> dict[str, dict[str, bytes]]:
        """Every wrapped data key as stored (for audits and tests: they are useless alone)."""
        return {
            gid: {kid: bytes.fromhex(w) for kid, w in keys.items()}
            for gid, keys in self._wrapped.items()
        }

    def data_key(self, gallery_id: str, key_id: str) -> bytes:
        try:
            wrapped = self._wrapped[gallery_id][key_id]
        except KeyError:
            raise UnknownKeyError(
                f"no data key {key_id} for gallery {gallery_id} in the keyring; the gallery's "
                "key was erased or the keyring is from another box"
            ) from None
        return unwrap_key(
            self._kek, bytes.fromhex(wrapped), _wrap_context(self.kek_id, gallery_id, key_id)
        )

    # -- changing (each change is one atomic replacement of the file) ----------------------

    def new_data_key(self, gallery_id: str) -> tuple[str, bytes]:
        """A fresh random data key for a gallery, durable in the keyring before it is used."""
        key_id = new_id(self._random)
        key = self._random(KEY_BYTES)
        wrapped = wrap_key(
            self._kek, key, _wrap_context(self.kek_id, gallery_id, key_id), random=self._random
        )
        self._wrapped.setdefault(gallery_id, {})[key_id] = wrapped.hex()
        try:
            self._save()
        except (VaultError, StorageWriteError):
            del self._wrapped[gallery_id][key_id]
            if not self._wrapped[gallery_id]:
                del self._wrapped[gallery_id]
            raise
        return key_id, key

    def retain_only(self, gallery_id: str, keep: Sequence[str]) -> None:
        """Forget a gallery's other data keys (crypto-erasing what they sealed)."""
        keys = self._wrapped.get(gallery_id, {})
        dropped = [kid for kid in keys if kid not in keep]
        if not dropped:
            return
        before = dict(keys)
        for kid in dropped:
            del keys[kid]
        if not keys:
            del self._wrapped[gallery_id]
        try:
            self._save()
        except (VaultError, StorageWriteError):
            self._wrapped[gallery_id] = before
            raise

    def rotate(self, new_provider: KekProvider) -> None:
        """Re-wrap every data key under a new KEK in one atomic write, then destroy the old KEK.

        A crash before the write leaves the old keyring (and a stray new KEK file); after it,
        the new keyring (and a stale old KEK file that opens nothing in it).
        """
        plain = {
            gid: {kid: self.data_key(gid, kid) for kid in keys}
            for gid, keys in self._wrapped.items()
        }
        old_provider, old_id = self._provider, self.kek_id
        kek_id = new_id(self._random)
        kek, params = new_provider.create(kek_id)
        info = self._describe_kek(new_provider, kek_id, kek, params, self._random, self._clock)
        wrapped = {
            gid: {
                kid: wrap_key(kek, key, _wrap_context(kek_id, gid, kid), random=self._random).hex()
                for kid, key in keys.items()
            }
            for gid, keys in plain.items()
        }
        previous = (self._provider, self._kek, self._kek_info, self._wrapped)
        self._provider, self._kek, self._kek_info, self._wrapped = new_provider, kek, info, wrapped
        try:
            self._save()
        except (VaultError, StorageWriteError):
            self._provider, self._kek, self._kek_info, self._wrapped = previous
            new_provider.destroy(kek_id)
            raise
        try:
            old_provider.destroy(old_id)
        except (VaultError, StorageWriteError, OSError) as exc:
            logger.warning("rotated the KEK but could not erase the old one's material: %s", exc)
        logger.info("rotated the KEK: %s -> %s", old_provider.kind, new_provider.kind)

    def _save(self) -> None:
        make_private_dir(self.path.parent)
        document = {
            "format": KEYRING_FORMAT,
            "version": KEYRING_VERSION,
            "kek": self._kek_info,
            "galleries": self._wrapped,
        }
        data = json.dumps(document, indent=1, sort_keys=True).encode() + b"\n"
        write_file_atomically(self.path, data, writer=self._writer, action="writing the keyring")


def read_keyring(path: Path) -> tuple[dict[str, object], dict[str, dict[str, str]]]:
    """The keyring's KEK entry and wrapped keys, structurally checked (no key is opened)."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise UnknownKeyError(
            f"no keyring at {path}; create a gallery first, or point --home at the state directory"
        ) from None
    except (OSError, ValueError) as exc:
        raise KeyringError(f"keyring {path} is unreadable: {exc}; restore it") from exc
    malformed = KeyringError(f"keyring {path} is not an edgeid keyring v{KEYRING_VERSION}")
    if not isinstance(data, dict) or (data.get("format"), data.get("version")) != (
        KEYRING_FORMAT,
        KEYRING_VERSION,
    ):
        raise malformed
    info, galleries = data.get("kek"), data.get("galleries")
    if not isinstance(info, dict) or not isinstance(galleries, dict):
        raise malformed
    wrapped: dict[str, dict[str, str]] = {}
    for gid, keys in galleries.items():
        if not isinstance(keys, dict) or not all(isinstance(w, str) for w in keys.values()):
            raise malformed
        wrapped[gid] = {str(kid): str(w) for kid, w in keys.items()}
    return info, wrapped


def _verify_check(kek: bytes, kek_id: str, check_hex: str) -> None:
    try:
        check = bytes.fromhex(check_hex)
    except ValueError:
        raise DecryptionError() from None
    open_sealed(kek, check[:NONCE_BYTES], check[NONCE_BYTES:], _check_aad(kek_id))
