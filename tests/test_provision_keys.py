"""`edgeid provision rotate-keys` and `factory-reset`, with key files, a passphrase and a
software TPM (swtpm), on real galleries; the canary enrolled from a real LFW photo."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from test_gallery_store import (
    _embedding_needles,
    _hits,
    _text_needles,
    swtpm,  # noqa: F401 (fixture: a software TPM on loopback)
)
from test_provision_init import snapshot

from edgeid.cli import main
from edgeid.runtime.audit import AuditAction, AuditLog
from edgeid.runtime.audit.actor import os_actor
from edgeid.runtime.config.settings import load_settings
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.gallery.errors import DecryptionError, KeyProviderError
from edgeid.runtime.gallery.records import NewFace, NewSubject
from edgeid.runtime.gallery.service import GalleryService
from edgeid.runtime.gallery.store import GalleryStore
from edgeid.runtime.vault.crypto import unwrap_key
from edgeid.runtime.vault.key_choice import GALLERIES_DIR, keyring_path, provider_for
from edgeid.runtime.vault.keys import KeyFileProvider, read_keyring

CANARY_NAME = "Quillon Marrowbyte-Canary"
CANARY_NOTES = "canary note: periwinkle lantern 5521"
PASSPHRASE = "correct horse battery staple"


@pytest.fixture
def home(tmp_path: Path, models_dir: Path) -> Path:
    state = tmp_path / "home"
    shutil.copytree(models_dir, state / "models")
    return state


def cli(home: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, object, str]:
    capsys.readouterr()
    code = main(["provision", argv[0], "--home", str(home), "--json", *argv[1:]])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def provision(home: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> None:
    wheels = str(home.parent.parent / "unused-wheelhouse")  # the copied models are up to date
    code, _, err = cli(
        home, capsys, "init", "--device-id", "box-07", "--site", "lab-a",
        "--no-selftest", "--wheelhouse", wheels, *extra,
    )  # fmt: skip
    assert code == 0, err


def checks(payload: object) -> dict[str, str]:
    assert isinstance(payload, dict)
    return {c["check"]: c["result"] for c in payload["checks"]}


def plain_data_keys(home: Path) -> dict[tuple[str, str], bytes]:
    """Every data key in the keyring, unwrapped with the box's own provider."""
    settings = load_settings(home)
    with GalleryStore(home, provider_for(home, settings.keys)) as store:
        ring = store.keyring
        return {
            (scope, kid): ring.data_key(scope, kid)
            for scope, keys in ring.wrapped_keys().items()
            for kid in keys
        }


def _new_face(seed: int) -> NewFace:
    vector = np.random.default_rng(seed).standard_normal(128).astype(np.float32)
    return NewFace(
        embedding=vector / np.linalg.norm(vector),
        quality=0.9,
        model_id="dlib_resnet_v1",
        source_sha256="ab" * 32,
        thumbnail_jpeg=b"\xff\xd8\xff\xe0" + bytes(200),
    )


# -- rotate-keys -----------------------------------------------------------------------------


def test_rotate_keys_rewraps_galleries_and_the_audit_scope_and_the_old_kek_opens_nothing(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    provision(home, capsys, "--key-provider", "keyfile")
    with GalleryStore(home, KeyFileProvider(home / "keys")) as store:
        made = store.create_gallery("g").enroll(
            NewSubject("Ana Lima", "case 2024/117", "officer-7"), [_new_face(1)]
        )
        old_id = store.keyring.kek_id
    (old_file,) = (home / "keys").iterdir()
    old_kek = old_file.read_bytes()
    before = plain_data_keys(home)
    # A gallery, and the audit log and accounts files that init's first-admin step made.
    assert sorted(scope for scope, _ in before if scope in ("audit", "accounts")) == [
        "accounts",
        "audit",
    ]
    assert len(before) == 3

    code, done, err = cli(home, capsys, "rotate-keys")
    assert code == 0, err
    assert isinstance(done, dict)
    assert done["provider"] == "keyfile" and done["old_kek_id"] == old_id != done["kek_id"]
    assert done["data_keys_rewrapped"] == len(before) == 3
    assert not old_file.exists()  # zero-filled and unlinked by the provider
    (new_file,) = (home / "keys").iterdir()
    assert stat.S_IMODE(new_file.stat().st_mode) == 0o600
    assert plain_data_keys(home) == before  # the same data keys, wrapped anew

    info, wrapped = read_keyring(keyring_path(home))
    assert info["kek_id"] == done["kek_id"]
    for scope, keys in wrapped.items():
        for kid, blob in keys.items():
            context = f"edgeid/keyring/v1/{info['kek_id']}/{scope}/{kid}".encode()
            with pytest.raises(DecryptionError):
                unwrap_key(old_kek, bytes.fromhex(blob), context)
    with GalleryStore(home, KeyFileProvider(home / "keys")) as store:
        assert store.open_gallery("g").subject(made.subject.subject_id).display_name == "Ana Lima"


def test_passphrase_keys_rotate_to_a_new_passphrase(
    home: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("EDGEID_GALLERY_PASSPHRASE", raising=False)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no TPM tools, no systemd-creds: a passphrase
    old, new = tmp_path / "old.txt", tmp_path / "new.txt"
    old.write_text(PASSPHRASE + "\n")
    new.write_text("a different long passphrase\n")
    provision(home, capsys, "--passphrase-file", str(old))
    assert load_settings(home).keys.provider == "passphrase"
    assert not (home / "keys").exists()  # a passphrase KEK stores nothing

    code, result, _ = cli(home, capsys, "selftest")
    assert code == 1 and checks(result)["gallery keys"] == "FAIL"
    assert "EDGEID_GALLERY_PASSPHRASE" in json.dumps(result)
    code, result, _ = cli(home, capsys, "selftest", "--passphrase-file", str(old))
    assert checks(result)["gallery keys"] == "PASS"

    code, _, err = cli(home, capsys, "rotate-keys", "--passphrase-file", str(old))
    assert code == 2 and "--new-passphrase-file" in err
    args = ("rotate-keys", "--passphrase-file", str(old), "--new-passphrase-file", str(new))
    code, _, err = cli(home, capsys, *args)
    assert code == 0, err
    code, result, _ = cli(home, capsys, "selftest", "--passphrase-file", str(old))
    assert checks(result)["gallery keys"] == "FAIL"
    code, result, _ = cli(home, capsys, "selftest", "--passphrase-file", str(new))
    assert checks(result)["gallery keys"] == "PASS"


def test_tpm_sealed_keys_from_init_through_rotation_to_reset(
    home: Path,
    capsys: pytest.CaptureFixture[str],
    swtpm: str,  # noqa: F811
) -> None:
    provision(home, capsys, "--tpm-tcti", swtpm)  # auto: the TPM answers, so it seals the KEK
    keys = load_settings(home).keys
    assert (keys.provider, keys.tpm_tcti) == ("tpm2", swtpm)
    first = sorted(p.name for p in (home / "keys").iterdir())
    assert [Path(n).suffix for n in first] == [".priv", ".pub"]
    code, result, _ = cli(home, capsys, "selftest")
    assert checks(result)["gallery keys"] == "PASS"

    code, done, err = cli(home, capsys, "rotate-keys")
    assert code == 0, err
    assert isinstance(done, dict) and done["provider"] == done["old_provider"] == "tpm2"
    second = sorted(p.name for p in (home / "keys").iterdir())
    assert len(second) == 2 and not set(first) & set(second)

    code, report, err = cli(home, capsys, "factory-reset", "--yes")
    assert code == 0, err
    assert isinstance(report, dict) and report["kek"].startswith("tpm2 key-encryption key")
    assert not (home / "keys").exists() and sorted(os.listdir(home)) == ["models"]


# -- factory-reset ---------------------------------------------------------------------------


def enrol_canary(home: Path, lfw_dir: Path) -> tuple[dict[str, bytes], bytes]:
    """A canary subject from a real photo; returns what must not survive, and its KEK."""
    with GalleryService.open(home) as service:
        service.create_gallery("canaries")
        for photo in sorted((lfw_dir / "images").rglob("*.jpg")):
            try:
                done = service.enroll(
                    "canaries",
                    display_name=CANARY_NAME,
                    legal_basis="case 2025/001",
                    enrolled_by="technician",
                    image_bytes=photo.read_bytes(),
                    notes=CANARY_NOTES,
                )
                break
            except BadInputError:
                continue  # several faces, or below the quality gate: the next photo
        face = done.faces[0]
        thumbnail = service.thumbnail("canaries", face.face_id)
    needles = _text_needles(CANARY_NAME) | {
        f"notes {k}": v for k, v in _text_needles(CANARY_NOTES).items()
    }
    needles |= {f"embedding {k}": v for k, v in _embedding_needles(face.embedding).items()}
    needles["thumbnail"] = thumbnail[100:140]
    (kek_file,) = (home / "keys").iterdir()
    kek = kek_file.read_bytes()
    needles["kek"] = kek
    needles["kek hex"] = kek.hex().encode()
    for scope, keys in read_keyring(keyring_path(home))[1].items():
        needles |= {f"wrapped {scope[:6]}": w.encode() for w in keys.values()}
    for pem in [home / "identity" / "device-ed25519.pem", *(home / "tls").glob("*.pem")]:
        needles[f"pem {pem.name}"] = pem.read_bytes()[40:90]
    return needles, kek


def test_factory_reset_leaves_nothing_that_decrypts_and_no_canary_byte(
    home: Path, tmp_path: Path, lfw_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    provision(home, capsys, "--key-provider", "keyfile", "--self-signed")
    needles, kek = enrol_canary(home, lfw_dir)
    assert _hits(home, {"kek": kek}), "the test must find the KEK before the reset"
    # What survives a reset on flash (old blocks): the galleries' ciphertext and keyring.
    salvage = tmp_path / "salvage"
    shutil.copytree(home / GALLERIES_DIR, salvage / GALLERIES_DIR)
    (salvage / GALLERIES_DIR / ".lock").unlink()
    kek_id = str(read_keyring(keyring_path(home))[0]["kek_id"])

    before = snapshot(home)
    code, _, err = cli(home, capsys, "factory-reset")
    assert code == 2 and "add --yes" in err and snapshot(home) == before
    with GalleryStore(home, KeyFileProvider(home / "keys")):
        code, _, err = cli(home, capsys, "factory-reset", "--yes")
    assert code == 1 and "stop the service" in err and snapshot(home) == before

    code, report, err = cli(home, capsys, "factory-reset", "--yes")
    assert code == 0, err
    assert isinstance(report, dict) and report["kept"] == ["models"]
    assert report["files_erased"] >= 8
    assert sorted(os.listdir(home)) == ["models"]
    assert not _hits(home, needles)

    # The salvaged ciphertext opens with the KEK (so the copy is real) and with nothing else.
    elsewhere = tmp_path / "kek-kept-by-the-test"
    elsewhere.mkdir(mode=0o700)
    (elsewhere / f"kek-{kek_id}.key").write_bytes(kek)
    os.chmod(elsewhere / f"kek-{kek_id}.key", 0o600)
    with GalleryStore(salvage, KeyFileProvider(elsewhere)) as store:
        assert store.open_gallery("canaries").subjects()[0].display_name == CANARY_NAME
    shutil.rmtree(elsewhere)
    with pytest.raises(KeyProviderError, match="not found"):
        GalleryStore(salvage, KeyFileProvider(home / "keys"))


def test_factory_reset_refuses_a_folder_that_is_not_a_state_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    precious = tmp_path / "documents"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    code, _, err = cli(precious, capsys, "factory-reset", "--yes")
    assert code == 2 and "does not look like an edgeid state directory" in err
    assert (precious / "thesis.txt").read_text() == "years of work"


def test_factory_reset_unlinks_links_without_following_them(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    provision(home, capsys, "--key-provider", "keyfile")
    outside = tmp_path / "outside.txt"
    outside.write_text("not the box's")
    (home / "link-to-outside").symlink_to(outside)
    code, _, err = cli(home, capsys, "factory-reset", "--yes", "--all")
    assert code == 0, err
    assert os.listdir(home) == [] and outside.read_text() == "not the box's"


def test_rotate_keys_moves_a_key_file_keyring_into_the_tpm(
    home: Path,
    capsys: pytest.CaptureFixture[str],
    swtpm: str,  # noqa: F811
) -> None:
    code, _, err = cli(home, capsys, "rotate-keys")
    assert code == 2 and "no keyring" in err
    provision(home, capsys, "--key-provider", "keyfile")
    (key_file,) = (home / "keys").iterdir()
    before = plain_data_keys(home)

    dead = "swtpm:host=127.0.0.1,port=1"
    unchanged = snapshot(home)
    code, _, err = cli(home, capsys, "rotate-keys", "--key-provider", "tpm2", "--tpm-tcti", dead)
    assert code == 2 and f"no TPM answers at {dead}" in err
    assert snapshot(home) == unchanged

    args = ("rotate-keys", "--key-provider", "tpm2", "--tpm-tcti", swtpm)
    code, done, err = cli(home, capsys, *args)
    assert code == 0, err
    assert isinstance(done, dict) and (done["old_provider"], done["provider"]) == (
        "keyfile",
        "tpm2",
    )
    keys = load_settings(home).keys
    assert (keys.provider, keys.tpm_tcti) == ("tpm2", swtpm)
    assert not key_file.exists()
    assert plain_data_keys(home) == before
    code, result, _ = cli(home, capsys, "selftest")
    assert checks(result)["gallery keys"] == "PASS"


def test_rotate_keys_is_recorded_in_the_audit_log_as_the_os_user(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The technician's rotation is a door like any other: recorded before it happens."""
    provision(home, capsys, "--key-provider", "keyfile")
    with GalleryStore(home, KeyFileProvider(home / "keys")) as store:
        AuditLog.open(home, store.keyring).close()  # the box's audit log, as `edgeid init` makes
    code, done, err = cli(home, capsys, "rotate-keys")
    assert code == 0, err
    with (
        GalleryStore(home, KeyFileProvider(home / "keys")) as store,
        AuditLog.open(home, store.keyring) as log,
    ):
        (latest,) = log.query(action=AuditAction.KEYS_ROTATED, limit=5)
    assert latest.event.user == os_actor().user and latest.event.role == "operator"
    assert isinstance(done, dict) and str(done["old_kek_id"]) in (latest.event.detail or "")
