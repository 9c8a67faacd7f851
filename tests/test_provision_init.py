"""`edgeid provision init` and `status`: identity, certificates, keys, config, models, on real
files and real crypto; the certificates signed by a real CA and checked against a real Mosquitto.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from mqtt_broker import (
    Authority,
    Broker,
    Pki,
    broker,  # noqa: F401 (fixture)
    pki,  # noqa: F401 (fixture)
)
from test_gallery_store import swtpm  # noqa: F401 (fixture: a software TPM on loopback)

from edgeid.cli import main
from edgeid.cli.commands.users_cmd import reading_key
from edgeid.provisioning.certificates import CertRequest, provision_service
from edgeid.provisioning.certificates import default_paths as tls_default_paths
from edgeid.provisioning.kek import choose_provider
from edgeid.runtime.accounts.passwords import verify_password
from edgeid.runtime.accounts.roles import Role
from edgeid.runtime.accounts.users import UserStore
from edgeid.runtime.compat import UTC
from edgeid.runtime.config.settings import KeySettings, load_settings
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.vault.keys import SystemdCredsProvider

IDENTITY = ("--device-id", "box-07", "--site", "lab-a")
STEPS = (
    "device identity",
    "web certificate",
    "mqtt certificate",
    "gallery keys",
    "configuration",
    "first admin",
    "models",
    "TensorRT engines",
)


@pytest.fixture
def home(tmp_path: Path, models_dir: Path) -> Path:
    """A fresh state directory holding a copy of the built models (init finds them up to date)."""
    state = tmp_path / "home"
    shutil.copytree(models_dir, state / "models")
    return state


def wheelhouse(models_dir: Path) -> tuple[str, str]:
    return ("--wheelhouse", str(models_dir.parent / "wheelhouse"))


def run(
    home: Path, capsys: pytest.CaptureFixture[str], *argv: str, as_json: bool = True
) -> tuple[int, dict[str, object] | str, str]:
    """One `edgeid provision ...` call: exit code, JSON (or the text) and stderr."""
    capsys.readouterr()
    flags = ["--json"] if as_json else []
    code = main(["provision", argv[0], "--home", str(home), *flags, *argv[1:]])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if as_json and out.strip() else out), err


def statuses(payload: object) -> dict[str, str]:
    assert isinstance(payload, dict)
    return {s["step"]: s["status"] for s in payload["steps"]}


def results(payload: object, key: str = "selftest") -> dict[str, str]:
    assert isinstance(payload, dict)
    return {c["check"]: c["result"] for c in payload[key]}


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every file below ``root``: content hash, mtime and mode."""
    return {
        str(p.relative_to(root)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
            stat.S_IMODE(p.stat().st_mode),
        )
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- idempotence -----------------------------------------------------------------------------


def test_second_init_writes_no_file_and_reports_every_step_already_done(
    home: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = (
        "init", *IDENTITY, "--key-provider", "keyfile", "--self-signed",
        "--web-name", "edgeid-7.office.example", "--web-name", "10.0.0.7", *wheelhouse(models_dir),
    )  # fmt: skip
    code, first, err = run(home, capsys, *args)
    assert code == 0, err
    assert list(statuses(first)) == list(STEPS)
    assert statuses(first)["device identity"] == "done"
    assert statuses(first)["gallery keys"] == "done"
    assert results(first)["pipeline (cpu)"] == "PASS"
    assert "FAIL" not in results(first).values()
    # Everything before the first sign-in: the first admin and its one-time password too.
    assert isinstance(first, dict) and first["admin"] == "admin"
    password = str(first["one_time_password"])
    admin = UserStore(home, reading_key(home)).require("admin")
    assert (admin.role, admin.must_change_password) == (Role.ADMIN, True)
    assert verify_password(admin.password_hash, password)

    settings = load_settings(home)
    assert (settings.device.device_id, settings.device.site) == ("box-07", "lab-a")
    web = x509.load_pem_x509_certificate(Path(str(settings.web.tls_cert)).read_bytes())
    names = web.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "edgeid-7.office.example" in names.get_values_for_type(x509.DNSName)
    mqtt = x509.load_pem_x509_certificate(Path(str(settings.telemetry.cert_file)).read_bytes())
    cn = mqtt.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
    assert cn == "lab-a/box-07"  # the broker's identity scheme (tests/mqtt_broker.py)
    keys = [settings.web.tls_key, settings.telemetry.key_file]
    keys += [str(home / "identity" / "device-ed25519.pem"), *map(str, home.glob("keys/kek-*"))]
    assert len(keys) == 4
    assert all(stat.S_IMODE(Path(str(k)).stat().st_mode) == 0o600 for k in keys)

    before = snapshot(home)
    code, second, err = run(home, capsys, *args)
    assert code == 0, err
    again = statuses(second)
    assert again.pop("TensorRT engines") in ("skipped", "already done")  # skipped: no GPU here
    assert set(again.values()) == {"already done"}
    assert isinstance(second, dict) and second["one_time_password"] is None
    assert snapshot(home) == before

    # Without any option: identity, names and provider come from what is there.
    code, text, err = run(home, capsys, "init", *wheelhouse(models_dir), as_json=False)
    assert code == 0, err
    assert isinstance(text, str)
    for step in STEPS[:-1]:
        assert any(line.startswith(step) and "already done" in line for line in text.splitlines())
    assert text.rstrip().endswith("provisioned")
    assert snapshot(home) == before


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--site", "lab-a"), "give --device-id ID and --site SITE"),
        (("--device-id", "Box 7", "--site", "lab-a"), "--device-id must be a lower-case slug"),
        ((*IDENTITY, "--web-name", "bad_name!"), "neither an IP address nor a DNS name"),
        ((*IDENTITY, "--broker", "mqtt://broker"), "is not HOST or HOST:PORT"),
        ((*IDENTITY, "--mqtt-ca", "/nonexistent/ca.pem"), "cannot read /nonexistent/ca.pem"),
        ((*IDENTITY, "--web-cert", "/nonexistent/web.pem"), "cannot read /nonexistent/web.pem"),
        (
            (*IDENTITY, "--key-provider", "tpm2", "--tpm-tcti", "swtpm:host=127.0.0.1,port=1"),
            "no TPM answers at swtpm:host=127.0.0.1,port=1",
        ),
        ((*IDENTITY, "--key-provider", "passphrase"), "needs a passphrase"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(
    home: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: tuple[str, ...],
    message: str,
) -> None:
    monkeypatch.delenv("EDGEID_GALLERY_PASSPHRASE", raising=False)
    before = snapshot(home)
    code, _, err = run(home, capsys, "init", *argv)
    assert code == 2
    assert err.startswith("edgeid: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert snapshot(home) == before and sorted(p.name for p in home.iterdir()) == ["models"]


def test_a_provisioned_box_refuses_changes_that_would_orphan_its_files(
    home: Path, models_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    base = ("init", *IDENTITY, "--key-provider", "keyfile", "--no-selftest")
    assert run(home, capsys, *base, *wheelhouse(models_dir))[0] == 0
    before = snapshot(home)

    code, _, err = run(home, capsys, "init", "--device-id", "box-08")
    assert code == 2 and "provisioned as lab-a/box-07" in err and "factory-reset" in err

    code, _, err = run(home, capsys, "init", "--key-provider", "passphrase")
    assert code == 2 and "rotate-keys --key-provider passphrase" in err

    # A certificate for another key (here: a self-signed one) is not this box's.
    other = tmp_path / "other"
    stranger = provision_service(
        tls_default_paths(other, "web"),
        CertRequest("edgeid box-07", "server", ("localhost",)),
        self_signed=True,
        install_from=None,
        now=dt.datetime.now(UTC),
    )
    assert stranger.ready
    code, _, err = run(home, capsys, "init", "--web-cert", str(other / "tls" / "cert.pem"))
    assert code == 2 and "was not issued for this box's key" in err
    assert snapshot(home) == before


# -- CSRs, the site CA and the broker ----------------------------------------------------------


def sign(authority: Authority, csr_path: Path, out: Path, *, days: int = 30) -> Path:
    """What the site CA does with a CSR: a certificate for its subject, key and extensions."""
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    now = dt.datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(authority.cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    for extension in csr.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    cert = builder.sign(authority.key, hashes.SHA256())
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + authority.path.read_bytes())
    return out


def test_csrs_signed_by_the_site_ca_are_installed_and_the_broker_is_reached(
    home: Path,
    models_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    pki: Pki,  # noqa: F811
    broker: Broker,  # noqa: F811
) -> None:
    code, first, err = run(
        home, capsys, "init", *IDENTITY, "--key-provider", "keyfile", *wheelhouse(models_dir)
    )
    assert code == 0, err  # waiting for the CA is not a failure
    assert isinstance(first, dict)
    details = {s["step"]: s["detail"] for s in first["steps"]}
    assert "have the site CA sign it" in details["mqtt certificate"]
    assert results(first)["web certificate"] == "SKIP"
    code, status, _ = run(home, capsys, "status")
    assert code == 0 and isinstance(status, dict) and status["complete"] is False
    states = {i["item"]: i["state"] for i in status["items"]}
    assert states["web certificate"] == states["mqtt certificate"] == "pending"

    tls = home / "tls"
    csr = x509.load_pem_x509_csr((tls / "mqtt.csr").read_bytes())
    assert csr.subject.rfc4514_string() == "CN=lab-a/box-07"
    mqtt_cert = sign(pki.ca, tls / "mqtt.csr", tmp_path / "mqtt-signed.pem")
    web_cert = sign(pki.ca, tls / "web.csr", tmp_path / "web-signed.pem")
    code, second, err = run(
        home, capsys, "init",
        "--mqtt-cert", str(mqtt_cert), "--mqtt-ca", str(pki.ca.path), "--web-cert", str(web_cert),
        "--broker", f"127.0.0.1:{broker.port}",
    )  # fmt: skip
    assert code == 0, err
    checks = results(second)
    assert checks["broker"] == checks["mqtt certificate"] == checks["web certificate"] == "PASS"
    telemetry = load_settings(home).telemetry
    assert (telemetry.sink, telemetry.broker_port) == ("mqtt", broker.port)
    code, status, _ = run(home, capsys, "status")
    assert isinstance(status, dict) and status["complete"] is True

    # The same key signed by a CA the broker does not trust: it installs (the key is this
    # box's), and the self-test says the broker refuses it.
    foreign = sign(pki.foreign, tls / "mqtt.csr", tmp_path / "foreign.pem")
    code, third, _ = run(home, capsys, "init", "--mqtt-cert", str(foreign))
    assert code == 1
    assert results(third)["broker"] == "FAIL"
    assert isinstance(third, dict)
    broker_detail = next(c["detail"] for c in third["selftest"] if c["check"] == "broker")
    assert f"127.0.0.1:{broker.port}" in broker_detail

    # Back to the fleet CA's certificate, then the broker goes away.
    assert run(home, capsys, "init", "--mqtt-cert", str(mqtt_cert))[0] == 0
    broker.stop()
    code, checked, _ = run(home, capsys, "selftest")
    assert code == 1 and results(checked, "checks")["broker"] == "FAIL"
    assert "unreachable" in json.dumps(checked)


def test_an_expired_lab_certificate_is_renewed_with_the_same_key(tmp_path: Path) -> None:
    paths = tls_default_paths(tmp_path, "mqtt")
    request = CertRequest("lab-a/box-07", "client")
    long_ago = dt.datetime.now(UTC) - dt.timedelta(days=400)
    first = provision_service(paths, request, self_signed=True, install_from=None, now=long_ago)
    key = paths.key.read_bytes()
    assert first.changed and first.ready
    now = dt.datetime.now(UTC)
    renewed = provision_service(paths, request, self_signed=False, install_from=None, now=now)
    assert renewed.changed and "renewed" in renewed.detail
    cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    assert cert.not_valid_after_utc > now and paths.key.read_bytes() == key
    kept = provision_service(paths, request, self_signed=False, install_from=None, now=now)
    assert not kept.changed


def test_an_expired_ca_certificate_fails_the_step_and_leaves_a_csr(
    tmp_path: Path,
    pki: Pki,  # noqa: F811
) -> None:
    paths = tls_default_paths(tmp_path, "mqtt")
    request = CertRequest("lab-a/box-07", "client")
    now = dt.datetime.now(UTC)
    waiting = provision_service(paths, request, self_signed=False, install_from=None, now=now)
    assert not waiting.ready and paths.csr.is_file()
    signed = sign(pki.ca, paths.csr, tmp_path / "signed.pem", days=30)
    installed = provision_service(paths, request, self_signed=False, install_from=signed, now=now)
    assert installed.ready and paths.cert.is_file()
    later = now + dt.timedelta(days=60)
    expired = provision_service(paths, request, self_signed=True, install_from=None, now=later)
    assert expired.failed and not expired.ready
    assert "expired" in expired.detail and str(paths.csr) in expired.detail
    assert paths.cert.read_bytes() == signed.read_bytes()  # the CA's certificate is not replaced


# -- the key provider order -------------------------------------------------------------------


def test_auto_takes_a_tpm_then_systemd_creds_then_a_passphrase(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    swtpm: str,  # noqa: F811
) -> None:
    assert choose_provider(KeySettings(tpm_tcti=swtpm), "auto", None) == "tpm2"
    no_tpm = KeySettings(tpm_tcti="swtpm:host=127.0.0.1,port=1")
    if SystemdCredsProvider(tmp_path).available():
        assert choose_provider(no_tpm, "auto", None) == "systemd-creds"
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # neither tpm2-tools nor systemd-creds
    assert choose_provider(no_tpm, "auto", "correct horse battery") == "passphrase"
    with pytest.raises(BadInputError, match="give a gallery passphrase"):
        choose_provider(no_tpm, "auto", None)
    with pytest.raises(BadInputError, match="at least 12 characters"):
        choose_provider(no_tpm, "auto", "short")
    assert choose_provider(no_tpm, "keyfile", None) == "keyfile"
