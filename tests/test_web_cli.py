"""`edgeid init` and `edgeid users`, run as the technician runs them, and the server's refusal
of plain HTTP off loopback. No face models needed."""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
from pathlib import Path

import pytest
from cryptography import x509
from fastapi import FastAPI
from test_provision_init import STEPS as PROVISION_STEPS

from edgeid.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, main
from edgeid.cli.commands.users_cmd import reading_key
from edgeid.runtime.accounts.roles import Role
from edgeid.runtime.accounts.tokens import TokenStore
from edgeid.runtime.accounts.users import UserStore
from edgeid.runtime.audit import AuditAction
from edgeid.runtime.audit.actor import os_actor
from edgeid.runtime.config.settings import Settings, WebSettings, load_settings
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.gallery.store import GalleryStore
from edgeid.runtime.vault.key_choice import provider_for
from edgeid.runtime.web.server import make_server


def run(*argv: str) -> tuple[int, dict[str, object] | list[object], str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    text = out.getvalue()
    return code, (json.loads(text) if text.strip().startswith(("{", "[")) else {}), err.getvalue()


def audit_actions(home: Path) -> list[str]:
    """The actions recorded before this export (whose own record, the last, is checked)."""
    code, _, _ = run("audit", "export", "--home", str(home), "--output", str(home / "x.jsonl"))
    assert code == EXIT_OK
    lines = [json.loads(line) for line in (home / "x.jsonl").read_text().splitlines()]
    (home / "x.jsonl").unlink()
    *before, own = [line for line in lines if line["type"] == "record"]
    assert own["action"] == AuditAction.AUDIT_EXPORTED.value
    assert own["user"] == os_actor().user and own["role"] == "operator"
    return [str(line["action"]) for line in before]


def test_init_makes_the_first_admin_a_certificate_and_the_audit_log_once(tmp_path: Path) -> None:
    home = tmp_path / "box"
    code, report, _ = run("init", "--home", str(home), "--address", "10.1.2.3", "--json")
    assert code == EXIT_OK and isinstance(report, dict)
    once = str(report["one_time_password"])
    admin = UserStore(home, reading_key(home)).require("admin")
    assert admin.role is Role.ADMIN and admin.must_change_password
    assert UserStore(home, reading_key(home)).authenticate("admin", once) is not None
    settings = load_settings(home)
    assert settings.web.tls_cert and settings.web.tls_key
    cert = x509.load_pem_x509_certificate(Path(settings.web.tls_cert).read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.1.2.3") in names.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    assert (Path(settings.web.tls_key).stat().st_mode & 0o777) == 0o600
    assert report["tls_cert_sha256"] == cert.fingerprint(cert.signature_hash_algorithm).hex()  # type: ignore[arg-type]

    again, second, _ = run("init", "--home", str(home), "--json")
    assert again == EXIT_OK and isinstance(second, dict)
    assert second["one_time_password"] is None and second["tls_cert_created"] is False
    assert second["tls_cert_sha256"] == report["tls_cert_sha256"]
    assert UserStore(home, reading_key(home)).authenticate("admin", once) is not None  # untouched
    assert audit_actions(home) == [AuditAction.USER_CREATED.value]


def test_users_command_changes_users_and_tokens_and_records_each_change(tmp_path: Path) -> None:
    home = tmp_path / "box"
    assert run("init", "--home", str(home))[0] == EXIT_OK
    with GalleryStore(home, provider_for(home, load_settings(home).keys)) as store:
        store.create_gallery("office")
    code, made, _ = run(
        "users",
        "add",
        "ivy",
        "--role",
        "investigator",
        "--gallery",
        "office",
        "--reason",
        "new investigator in the office unit",
        "--home",
        str(home),
        "--json",
    )
    assert code == EXIT_OK and isinstance(made, dict)
    assert (
        UserStore(home, reading_key(home)).authenticate("ivy", str(made["one_time_password"]))
        is not None
    )
    # The gallery waits for a second person (two-person rule, tests/test_approvals.py).
    assert UserStore(home, reading_key(home)).require("ivy").galleries == ()
    assert [p["summary"] for p in made["waiting"]] == ["give ivy access to office"]  # type: ignore[index,union-attr]
    code, _, err = run("users", "set", "ivy", "--gallery", "office", "--home", str(home))
    assert code == EXIT_BAD_INPUT and "give the reason" in err
    code, _, err = run(
        "users", "add", "eve", "--role", "investigator", "--gallery", "nope", "--home", str(home)
    )
    assert code == EXIT_BAD_INPUT and "no gallery named 'nope'" in err
    assert UserStore(home, reading_key(home)).get("eve") is None
    code, token, _ = run(
        "users",
        "token-add",
        "ivy",
        "--token-name",
        "script",
        "--scope",
        "search",
        "--home",
        str(home),
        "--json",
    )
    assert code == EXIT_OK and isinstance(token, dict)
    assert TokenStore(home, reading_key(home)).authenticate(str(token["secret"])) is not None
    code, _, err = run(
        "users", "token-add", "ivy", "--token-name", "x", "--scope", "users", "--home", str(home)
    )
    assert code == EXIT_BAD_INPUT and "does not allow" in err
    token_id = str(token["token"]["token_id"])  # type: ignore[index]
    assert run("users", "token-revoke", token_id, "--home", str(home))[0] == EXIT_OK
    assert TokenStore(home, reading_key(home)).authenticate(str(token["secret"])) is None
    assert (
        run("users", "set", "ivy", "--role", "supervisor", "--no-galleries", "--home", str(home))[0]
        == 0
    )
    assert run("users", "set", "ivy", "--disable", "--home", str(home))[0] == EXIT_OK
    code, listed, _ = run("users", "list", "--home", str(home), "--json")
    assert isinstance(listed, list)
    ivy = next(u for u in listed if isinstance(u, dict) and u["username"] == "ivy")
    assert ivy["role"] == "supervisor" and ivy["disabled"] and "password_hash" not in ivy
    code, _, err = run("users", "set", "admin", "--disable", "--home", str(home))
    assert code == EXIT_BAD_INPUT and "no enabled admin" in err
    assert audit_actions(home) == [
        "user_created",  # admin, by init
        "user_created",
        "change_proposed",  # ivy's gallery
        "token_created",
        "token_revoked",
        "role_changed",
        "user_disabled",
    ]


def test_users_command_waits_for_the_service_to_stop(tmp_path: Path) -> None:
    home = tmp_path / "box"
    assert run("init", "--home", str(home))[0] == EXIT_OK
    with GalleryStore(home, provider_for(home, load_settings(home).keys)):  # as edgeid serve does
        code, _, err = run("users", "add", "bob", "--role", "technician", "--home", str(home))
    assert code == EXIT_FAILED and "stop it first" in err
    assert UserStore(home, reading_key(home)).get("bob") is None


def test_plain_http_is_refused_off_loopback(tmp_path: Path) -> None:
    app = FastAPI()
    plain = Settings(web=WebSettings(host="0.0.0.0"))
    with pytest.raises(BadInputError, match=r"refusing plain HTTP on 0\.0\.0\.0"):
        make_server(app, plain)
    assert make_server(app, plain, host="127.0.0.1").config.host == "127.0.0.1"
    half = Settings(web=WebSettings(host="0.0.0.0", tls_cert=str(tmp_path / "c.pem")))
    with pytest.raises(BadInputError, match=r"both web\.tls_cert and web\.tls_key"):
        make_server(app, half)
    missing = Settings(
        web=WebSettings(
            host="0.0.0.0", tls_cert=str(tmp_path / "c.pem"), tls_key=str(tmp_path / "k.pem")
        )
    )
    with pytest.raises(BadInputError, match="does not exist"):
        make_server(app, missing)


SERVE_SCRIPT = """
import sys
from pathlib import Path
from edgeid.runtime.config.settings import load_settings
from edgeid.runtime.web.bootstrap import open_web_app
from edgeid.runtime.web.server import run_web
home = Path(sys.argv[1])
settings = load_settings(home)
with open_web_app(home, settings, version="test") as app:
    run_web(app, settings)
"""


def test_sigterm_stops_the_web_service_cleanly(tmp_path: Path, models_dir: Path) -> None:
    """Regression: uvicorn raises SIGTERM again after its shutdown, which killed the process
    before the audit log's final checkpoint and the index flush; now run_web returns."""
    import re
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    home = tmp_path / "box"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert run("init", "--home", str(home), "--port", str(port))[0] == EXIT_OK
    (home / "models").symlink_to(models_dir)
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT, str(home)], stderr=subprocess.PIPE, text=True
    )
    url = f"https://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, verify=False, timeout=10) as browser:
            deadline = time.monotonic() + 120
            while True:  # the models load first
                assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
                try:
                    page = browser.get("/login")
                    break
                except httpx.TransportError:
                    time.sleep(0.2)
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
            assert csrf is not None
            reply = browser.post(
                "/login", data={"username": "admin", "password": "wrong", "csrf_token": csrf[1]}
            )
            assert reply.status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    code, report, _ = run("audit", "verify", "--home", str(home), "--json")
    assert code == EXIT_OK and isinstance(report, dict)
    assert report["records"] == 2  # init's user_created, the failed sign-in
    assert report["checkpoints"] == 2  # init's close, and the service's close on SIGTERM


def test_init_is_provision_inits_steps_with_lab_defaults(tmp_path: Path, models_dir: Path) -> None:
    """One set-up path: `edgeid init` runs provision init's steps (self-signed, key file, no
    self-test); models found are verified, not converted; host, port and a renewed certificate
    are kept in edgeid.toml; a later `provision init` on the same box finds everything done."""
    import shutil

    bare = tmp_path / "bare"
    code, report, _ = run("init", "--home", str(bare), "--json")
    assert code == EXIT_OK and isinstance(report, dict)
    steps = {str(s["step"]): str(s["status"]) for s in report["steps"]}  # type: ignore[attr-defined, union-attr]
    assert tuple(steps) == PROVISION_STEPS  # the same steps, in the same order
    assert steps["models"] == "skipped" and not (bare / "models").exists()  # never converted

    home = tmp_path / "box"
    shutil.copytree(models_dir, home / "models")
    code, report, _ = run(
        "init", "--home", str(home), "--host", "0.0.0.0", "--port", "8443", "--json"
    )
    assert code == EXIT_OK and isinstance(report, dict)
    models = next(s for s in report["steps"] if s["step"] == "models")  # type: ignore[attr-defined, union-attr]
    assert models["status"] == "already done" and "verified" in models["detail"]
    settings = load_settings(home)
    assert (settings.web.host, settings.web.port, settings.keys.provider) == (
        "0.0.0.0",
        8443,
        "keyfile",
    )
    first = report["tls_cert_sha256"]

    again, renewed, _ = run("init", "--home", str(home), "--renew-cert", "--json")
    assert again == EXIT_OK and isinstance(renewed, dict)
    assert renewed["tls_cert_created"] is True and renewed["tls_cert_sha256"] != first
    assert load_settings(home).web.port == 8443  # kept

    code, provisioned, _ = run("provision", "init", "--home", str(home), "--no-selftest", "--json")
    assert code == EXIT_OK and isinstance(provisioned, dict)
    statuses = {s["step"]: s["status"] for s in provisioned["steps"]}  # type: ignore[index, union-attr]
    assert statuses["device identity"] == statuses["gallery keys"] == "already done"
    assert statuses["first admin"] == "already done"  # the lab's admin is the box's admin


def test_provision_init_too_refuses_a_box_whose_audit_signing_key_is_gone(tmp_path: Path) -> None:
    """The refusal lives in the shared steps, so both set-up commands keep a lost key lost."""
    from edgeid.runtime.identity.device_key import device_key_path

    home = tmp_path / "box"
    assert run("init", "--home", str(home))[0] == EXIT_OK
    device_key_path(home).unlink()
    code, _, err = run("provision", "init", "--home", str(home), "--no-selftest")
    assert code != EXIT_OK and "signing key" in err and "restore" in err
    assert not device_key_path(home).exists()  # nothing was written
