"""Update bundles: build, sign, verify, and the committed test vectors of bad bundles."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from update_box import EPOCH, HARDWARE, VECTORS_DIR, make_bundle, signing_key, write_payload
from update_vectors import generate

from edgeid.cli import main
from edgeid.runtime.errors import BadInputError
from edgeid.updater.bundle import (
    MANIFEST_MEMBER,
    SIGNATURE_MEMBER,
    build_bundle,
    read_unsigned,
    sign_bundle,
    verify_bundle,
)
from edgeid.updater.errors import BundleRejectedError, UpdateError
from edgeid.updater.signing import TrustedKey, trust_key, trusted_keys

EXPECTED = json.loads((VECTORS_DIR / "expected.json").read_text())


def _vendor() -> list[TrustedKey]:
    return [TrustedKey("vendor", signing_key("vendor").public_key())]


def test_vectors_match_their_generator(tmp_path: Path) -> None:
    """The committed vectors are exactly what tests/update_vectors.py writes."""
    generate(tmp_path)
    committed = sorted(p.name for p in VECTORS_DIR.iterdir() if p.is_file())
    assert sorted(p.name for p in tmp_path.iterdir()) == committed
    for name in committed:
        assert (tmp_path / name).read_bytes() == (VECTORS_DIR / name).read_bytes(), name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_verify_vector(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each bad vector is refused with exit 2 and a one-line error naming its fault."""
    bundle = VECTORS_DIR / f"{name}.bundle"
    key = VECTORS_DIR / "vendor.pub"
    status = main(["update", "verify", str(bundle), "--key", str(key), "--home", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == EXPECTED[name]["exit"], err
    if status:
        assert err.count("\n") == 1 and err.startswith("edgeid: error: "), err
        assert EXPECTED[name]["error"] in err
    else:
        assert err == ""


def test_build_sign_verify_round_trip(tmp_path: Path) -> None:
    payload = write_payload(tmp_path / "payload", "2.1.0", extra=3)
    bundle = tmp_path / "b.bundle"
    manifest = build_bundle(payload, "2.1.0", [HARDWARE, "jetson-orin-nx"], bundle, epoch=EPOCH)
    assert [f.path for f in manifest.files] == [
        "VERSION",
        "bin/healthcheck",
        "share/model-0.bin",
        "share/model-1.bin",
        "share/model-2.bin",
    ]
    assert [f.executable for f in manifest.files] == [False, True, False, False, False]
    with pytest.raises(BundleRejectedError, match="is not signed"):
        verify_bundle(bundle, _vendor())
    sign_bundle(bundle, signing_key("vendor"))
    verified = verify_bundle(bundle, _vendor())
    assert verified.manifest == manifest
    assert verified.signer.name == "vendor"
    files = {entry.path: b"".join(chunks) for entry, chunks in verified.payload()}
    assert files == {f.path: (payload / f.path).read_bytes() for f in manifest.files}


def test_build_is_reproducible(tmp_path: Path) -> None:
    payload = write_payload(tmp_path / "payload", "1.0.0")
    first, second = tmp_path / "1.bundle", tmp_path / "2.bundle"
    build_bundle(payload, "1.0.0", [HARDWARE], first, epoch=EPOCH)
    build_bundle(payload, "1.0.0", [HARDWARE], second, epoch=EPOCH)
    assert first.read_bytes() == second.read_bytes()
    sign_bundle(first, signing_key("vendor"))
    sign_bundle(second, signing_key("vendor"))
    assert first.read_bytes() == second.read_bytes()


def test_build_refuses_links_in_the_payload(tmp_path: Path) -> None:
    payload = write_payload(tmp_path / "payload", "1.0.0")
    (payload / "bin" / "python").symlink_to("/usr/bin/python3")
    with pytest.raises(BadInputError, match=r"bin/python is not a regular file"):
        build_bundle(payload, "1.0.0", [HARDWARE], tmp_path / "b.bundle", epoch=EPOCH)
    assert not (tmp_path / "b.bundle").exists()


def test_build_refuses_bad_version_and_hardware(tmp_path: Path) -> None:
    payload = write_payload(tmp_path / "payload", "1.0.0")
    with pytest.raises(BadInputError, match="not a version"):
        build_bundle(payload, "one", [HARDWARE], tmp_path / "b.bundle", epoch=EPOCH)
    with pytest.raises(BadInputError, match=r"bundle hardware\.0"):
        build_bundle(payload, "1.0.0", ["Jetson Orin"], tmp_path / "b.bundle", epoch=EPOCH)


def _flip_payload_byte(bundle: Path, member: str) -> None:
    with tarfile.open(bundle, "r:") as tar:
        offset = tar.getmember(member).offset_data
    data = bytearray(bundle.read_bytes())
    data[offset] ^= 0x01
    bundle.write_bytes(bytes(data))


def test_sign_refuses_a_bundle_altered_after_build(tmp_path: Path) -> None:
    """The vendor never signs a payload that no longer matches its manifest."""
    bundle, _ = make_bundle(tmp_path, "1.0.0", key=None)
    _flip_payload_byte(bundle, "payload/VERSION")
    before = bundle.read_bytes()
    with pytest.raises(BundleRejectedError, match="does not match its manifest hash"):
        sign_bundle(bundle, signing_key("vendor"))
    assert bundle.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_signature_is_bound_to_the_update_domain(tmp_path: Path) -> None:
    """An ed25519 signature by the vendor key over the bare manifest (what another protocol
    might sign) does not pass as an update signature."""
    bundle, _ = make_bundle(tmp_path, "1.0.0", key=None)
    header, _ = read_unsigned(bundle)
    with tarfile.open(bundle, "r:") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    sig = tarfile.TarInfo(SIGNATURE_MEMBER)
    raw = signing_key("vendor").sign(header.manifest_bytes)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        tar.addfile(members[0][0], io.BytesIO(members[0][1]))
        sig.size = len(raw)
        tar.addfile(sig, io.BytesIO(raw))
        for info, data in members[1:]:
            tar.addfile(info, io.BytesIO(data))
    bundle.write_bytes(out.getvalue())
    assert members[0][0].name == MANIFEST_MEMBER
    with pytest.raises(BundleRejectedError, match="any trusted update key"):
        verify_bundle(bundle, _vendor())


def test_bundle_replaced_after_verification_is_caught_while_writing(tmp_path: Path) -> None:
    """The bytes written to a slot are re-hashed: swapping the file after the check fails."""
    bundle, _ = make_bundle(tmp_path, "1.0.0")
    verified = verify_bundle(bundle, _vendor())
    _flip_payload_byte(bundle, "payload/VERSION")
    with pytest.raises(UpdateError, match="changed while it was being installed"):
        for _entry, chunks in verified.payload():
            for _ in chunks:
                pass


def test_trusted_keys_are_installed_and_checked(tmp_path: Path) -> None:
    home = tmp_path / "box"
    with pytest.raises(UpdateError, match="no trusted update keys"):
        trusted_keys(home)
    (tmp_path / "vendor.pub").write_bytes((VECTORS_DIR / "vendor.pub").read_bytes())
    installed = trust_key(home, tmp_path / "vendor.pub")
    assert [k.fingerprint for k in trusted_keys(home)] == [installed.stem]
    private = tmp_path / "vendor.pem"
    assert main(["update", "keygen", str(private), "--home", str(home)]) == 0
    with pytest.raises(BadInputError, match="holds a private key"):
        trust_key(home, private)
    (home / "update-keys" / "stray.pem").write_bytes(private.read_bytes())
    with pytest.raises(UpdateError, match="holds a private key"):
        trusted_keys(home)


def test_vendor_to_box_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """keygen, build, sign, verify on the vendor's side; trust, verify, install on the box."""
    home = tmp_path / "box"
    home.mkdir()
    (home / "edgeid.toml").write_text(
        f'[updates]\nhardware_id = "{HARDWARE}"\nhealth_command = ["{{slot}}/bin/healthcheck"]\n'
        "restart_command = []\n"
    )
    key, bundle = tmp_path / "vendor.pem", tmp_path / "edgeid-1.0.0.bundle"
    payload = write_payload(tmp_path / "payload", "1.0.0")

    def run(*args: str) -> tuple[int, str]:
        status = main([*args, "--home", str(home)])
        out, err = capsys.readouterr()
        return status, out + err

    assert run("update", "keygen", str(key))[0] == 0
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    status, out = run("update", "build", str(payload), "--version", "1.0.0", "--hardware", HARDWARE,
                      "--out", str(bundle))  # fmt: skip
    assert status == 0 and "unsigned" in out
    assert run("update", "sign", str(bundle), "--key", str(key))[0] == 0
    status, out = run("update", "verify", str(bundle), "--key", f"{key}.pub", "--json")
    assert status == 0 and json.loads(out)["valid"] is True
    status, out = run("update", "verify", str(bundle))  # the box trusts no key yet
    assert status == 1 and "edgeid update trust KEY.pub" in out
    assert run("update", "trust", f"{key}.pub")[0] == 0
    status, out = run("update", "verify", str(bundle))
    assert status == 0 and out.endswith("installable here\n")
    status, out = run("update", "install", str(bundle))
    assert status == 0 and "1.0.0 committed on slot a (health check passed)" in out
    status, out = run("update", "verify", str(bundle))  # valid, but a reinstall: not a pass
    assert status == 2 and "not newer than the installed 1.0.0" in out
    status, out = run("update", "status")
    assert "active:   a (1.0.0)" in out and "inactive: b (empty)" in out
