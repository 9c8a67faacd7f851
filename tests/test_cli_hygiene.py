"""The CLI as careful as the web (issue 13, findings 8, 9, 13, 14, 15, 16, 17).

One test per finding, named after it, each failing on the code before the fix; and one test
that runs every `edgeid` command with hostile arguments (a FIFO, /dev/zero, a folder, a missing
file, a file that is not UTF-8, a --home that is a regular file, /proc/self) and asserts that
none prints a traceback, none blocks, and each exits 0, 1 or 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeid.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent
CASE, REASON = "HYG-2026/13", "checking the command line with hostile input"
PASSPHRASE = "correct horse battery staple"


def edgeid(
    *argv: str | Path, home: Path | None, timeout: float = 120, stdin: int | None = None
) -> subprocess.CompletedProcess[str]:
    words = [str(a) for a in argv]
    if home is not None:
        words += ["--home", str(home)]
    return subprocess.run(
        [sys.executable, "-m", "edgeid", *words],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        stdin=subprocess.DEVNULL if stdin is None else stdin,
    )


def no_traceback(err: str) -> None:
    assert "Traceback" not in err and "unexpected " not in err, err


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    """An initialised box (device key, audit log, first admin) with one empty gallery."""
    home = tmp_path_factory.mktemp("box") / "home"
    home.mkdir()
    (home / "models").symlink_to(models_dir)
    assert main(["init", "--home", str(home)]) == 0
    assert main(["gallery", "create", "g", "--home", str(home)]) == 0
    return home


@pytest.fixture
def home(built: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "home"
    shutil.copytree(built, copy, symlinks=True)
    return copy


@pytest.fixture
def hostile(tmp_path: Path) -> dict[str, Path]:
    """The odd files: a FIFO, a device, a folder, a missing file, a file not UTF-8, and a
    sparse 2 GB .jpg (no disk used)."""
    folder = tmp_path / "odd"
    folder.mkdir()
    os.mkfifo(folder / "fifo.jpg")
    (folder / "dir.jpg").mkdir()
    (folder / "latin1.txt").write_bytes(b"caf\xe9 \xff\xfe passphrase\n")
    with open(folder / "sparse.jpg", "wb") as f:
        f.truncate(2 << 30)
    return {
        "fifo": folder / "fifo.jpg",
        "zero": Path("/dev/zero"),
        "dir": folder / "dir.jpg",
        "missing": folder / "missing.jpg",
        "latin1": folder / "latin1.txt",
        "sparse": folder / "sparse.jpg",
    }


# -- finding 8 ---------------------------------------------------------------------------------


def test_finding_8_out_never_replaces_a_fifo_symlink_or_device(tmp_path: Path, home: Path) -> None:
    """`case report --out PATH --force` replaced a device node, FIFO or symlink with a regular
    file of case data; now only a new file or a regular file (atomically) is written."""
    from edgeid.runtime.cases.report import write_report
    from edgeid.runtime.errors import BadInputError

    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    target = tmp_path / "elsewhere.txt"
    target.write_text("not yours")
    link = tmp_path / "report-link.html"
    link.symlink_to(target)
    for out in (fifo, link, Path("/dev/null")):
        with pytest.raises(BadInputError, match="the output must be a new or a regular file"):
            write_report("<html>case data</html>", out, overwrite=True)
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and link.is_symlink()
    assert target.read_text() == "not yours"
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)

    regular = tmp_path / "report.html"
    regular.write_text("old")
    before = regular.stat().st_ino
    write_report("<html>new</html>", regular, overwrite=True)
    assert regular.read_text() == "<html>new</html>"
    assert regular.stat().st_ino != before  # a new file renamed over it, not written in place
    assert stat.S_IMODE(regular.stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    # At the command line: refused (exit 2) before the case is even looked up.
    for out in (fifo, link):
        done = edgeid("case", "report", "1", "--out", out, "--force", "--reason", REASON,
                      home=home)  # fmt: skip
        assert done.returncode == 2, done.stderr
        no_traceback(done.stderr)
    dangling = tmp_path / "dangling.bin"
    dangling.symlink_to(tmp_path / "nowhere" / "x.bin")
    env_pass = tmp_path / "pass.txt"
    env_pass.write_text(PASSPHRASE)
    done = edgeid("gallery", "export", "g", "--out", dangling, "--passphrase-file", env_pass,
                  "--case", CASE, "--reason", REASON, home=home)  # fmt: skip
    assert done.returncode == 2 and "symbolic link" in done.stderr, done.stderr


# -- finding 9 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "zero", "sparse"])
def test_finding_9_image_commands_refuse_fifos_devices_and_oversized_files(
    home: Path, hostile: dict[str, Path], kind: str
) -> None:
    """`detect|embed|gallery enroll|gallery search` blocked forever on a FIFO, read /dev/zero
    until memory ran out, and read a 2 GB sparse file before refusing it."""
    path = hostile[kind]
    for argv in (
        ["detect", path],
        ["embed", path],
        ["gallery", "enroll", "g", path, "--name", "N", "--legal-basis", "warrant"],
        ["gallery", "search", path, "--gallery", "g", "--case", CASE, "--reason", REASON],
    ):
        done = edgeid(*argv, home=home, timeout=60)
        assert done.returncode == 2, (argv, done.stderr)
        no_traceback(done.stderr)
        assert str(path) in done.stderr
        assert {"fifo": "FIFO", "zero": "device", "sparse": "limit"}[kind] in done.stderr


def test_finding_9_the_safe_reader_checks_before_reading(hostile: dict[str, Path]) -> None:
    from edgeid.runtime.errors import BadInputError
    from edgeid.runtime.storage.safe_read import read_user_file

    for kind, words in (("fifo", "a FIFO"), ("zero", "a device"), ("dir", "a folder"),
                        ("missing", "no such file"), ("sparse", "over the")):  # fmt: skip
        with pytest.raises(BadInputError, match=words):
            read_user_file(hostile[kind], max_bytes=50 << 20)
    assert read_user_file(hostile["latin1"], max_bytes=100).startswith(b"caf")
    with pytest.raises(BadInputError, match="over the 4-byte limit"):
        read_user_file(hostile["latin1"], max_bytes=4)


# -- finding 13 --------------------------------------------------------------------------------


def test_finding_13_no_tracebacks_for_bad_passphrase_files_homes_and_broken_pipes(
    home: Path, hostile: dict[str, Path], tmp_path: Path
) -> None:
    """Tracebacks on a missing / folder / non-UTF-8 --passphrase-file, on a closed pipe, on
    `init --home <a regular file>` and `gallery list --home /proc/self`."""
    for kind in ("missing", "dir", "latin1"):
        for argv in (
            ["gallery", "export", "g", "--out", tmp_path / "x.bin", "--case", CASE],
            ["gallery", "import", tmp_path / "x.bin"],
        ):
            done = edgeid(*argv, "--reason", REASON, "--passphrase-file", hostile[kind],
                          home=home)  # fmt: skip
            assert done.returncode == 2, done.stderr
            no_traceback(done.stderr)
            assert str(hostile[kind]) in done.stderr

    regular = tmp_path / "a-file"
    regular.write_text("x")
    for argv, bad_home in ((["init"], regular), (["gallery", "list"], Path("/proc/self"))):
        done = edgeid(*argv, home=bad_home)
        assert done.returncode in (1, 2), done.stderr
        no_traceback(done.stderr)
        assert done.stderr.count("\n") == 1, done.stderr  # one line

    # `edgeid ... | head -1`: the reader is gone before we write.
    for argv in (
        ["gallery", "subjects", "g", "--case", CASE, "--reason", REASON],
        ["case", "list"],
        ["gallery", "list", "--json"],
        ["users", "list"],
    ):
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeid", *map(str, argv), "--home", str(home)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=REPO,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 141, err
        assert err == "", err


def leaf_parsers(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(prefix), parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from leaf_parsers(sub, (*prefix, name))


# Never run with a working home: they serve forever, erase the box or rebuild the shared models.
LONG_OR_DESTRUCTIVE = {"serve", "telemetry run", "fleet serve", "models build",
                       "provision factory-reset", "bench pipeline", "bench search"}  # fmt: skip
# Options that name a file or folder, filled with the hostile path where a command has them.
FILE_OPTIONS = ("file", "key", "cert", "ca", "anchor", "wheelhouse", "out", "output", "images",
                "pairs", "data", "roc", "payload", "bundle")  # fmt: skip
JUSTIFIED = {"--case": CASE, "--reason": REASON}


def _argv(name: str, parser: argparse.ArgumentParser, value: str) -> tuple[list[str], bool]:
    """The command's words with every path slot (and required option) set to ``value``; and
    whether it had a slot that names a file."""
    words, slots = name.split(), False
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        choice = str(next(iter(action.choices))) if action.choices else None
        if not action.option_strings:
            words.append(choice or value)
            slots = slots or choice is None
            continue
        flag = action.option_strings[-1]
        if flag in JUSTIFIED:
            words += [flag, JUSTIFIED[flag]]
        elif action.nargs == 0 or flag in ("--home", "--json"):
            continue
        elif action.required or any(part in action.dest.split("_") for part in FILE_OPTIONS):
            words += [flag, choice or value]
            slots = slots or (choice is None and action.dest != "version")
    return words, slots


def test_every_command_survives_hostile_arguments(
    home: Path, hostile: dict[str, Path], tmp_path: Path
) -> None:
    """Every leaf command, with a FIFO, /dev/zero, a folder, a missing file or a non-UTF-8 file
    in each of its path slots, and with --home a regular file or /proc/self: no traceback, no
    hang, exit 0, 1 or 2."""
    regular = tmp_path / "home-is-a-file"
    regular.write_text("x")
    calls_file = tmp_path / "calls.json"
    failures = []
    for name, parser in sorted(leaf_parsers(build_parser([]))):
        calls: list[list[str]] = []
        # A missing home under a missing folder: even init refuses to make that.
        for bad_home in (regular, Path("/proc/self"), tmp_path / "gone" / "home"):
            words, _ = _argv(name, parser, "x")
            calls.append([*words, "--home", str(bad_home)])
        if name not in LONG_OR_DESTRUCTIVE:
            scratch = tmp_path / "homes" / name.replace(" ", "-")
            shutil.copytree(home, scratch, symlinks=True)
            for kind in ("fifo", "zero", "dir", "missing", "latin1"):
                words, slots = _argv(name, parser, str(hostile[kind]))
                if slots:
                    calls.append([*words, "--home", str(scratch)])
        calls_file.write_text(json.dumps(calls))
        done = subprocess.run(
            [sys.executable, str(REPO / "tests" / "hostile_cli_driver.py"), str(calls_file)],
            capture_output=True, text=True, cwd=tmp_path, timeout=300, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert done.returncode == 0, (name, done.stderr[-3000:])
        for result in json.loads(done.stdout):
            err = result["stderr"]
            if (
                result["hung"]
                or result["escaped"]
                or result["rc"] not in (0, 1, 2)
                or "Traceback" in err
                or "unexpected " in err
            ):
                failures.append(result)
    assert not failures, json.dumps(failures, indent=1)[:8000]


# -- finding 14 --------------------------------------------------------------------------------


def test_finding_14_home_must_exist_and_init_keeps_a_lost_device_key_lost(
    home: Path, tmp_path: Path
) -> None:
    """A mistyped --home made a fresh empty state; `init --home /nonexistent/x` made a tree;
    `init` with the device key gone wrote a new one and the audit log read as TAMPERED."""
    typo = tmp_path / "typo"
    done = edgeid("gallery", "list", home=typo)
    assert done.returncode == 2 and "no edgeid state folder" in done.stderr, done.stderr
    assert not typo.exists()

    deep = tmp_path / "nonexistent" / "x"
    done = edgeid("init", home=deep)
    assert done.returncode == 2 and "parent folder" in done.stderr, done.stderr
    assert not deep.parent.exists()

    fresh = tmp_path / "fresh"  # its parent exists: init makes the last part
    fresh_init = edgeid("init", home=fresh)
    assert fresh_init.returncode == 0, fresh_init.stderr
    assert (fresh / "identity").is_dir()

    key = home / "identity" / "device-ed25519.pem"
    key.unlink()
    before = sorted(p.relative_to(home) for p in home.rglob("*"))
    done = edgeid("init", home=home)
    assert done.returncode == 1, done.stderr
    assert "signing key" in done.stderr and "restore" in done.stderr
    assert not key.exists()
    assert sorted(p.relative_to(home) for p in home.rglob("*")) == before


# -- finding 15 --------------------------------------------------------------------------------


def test_finding_15_bad_input_exits_2(home: Path, tmp_path: Path) -> None:
    """Importing a non-export, a damaged export or with a wrong passphrase exited 1 (and
    blamed the key provider); `update verify` passed a bundle for other hardware."""
    secret = tmp_path / "pass.txt"
    secret.write_text(PASSPHRASE)
    export = tmp_path / "g.export"
    done = edgeid("gallery", "export", "g", "--out", export, "--passphrase-file", secret,
                  "--case", CASE, "--reason", REASON, home=home)  # fmt: skip
    assert done.returncode == 0, done.stderr

    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not the passphrase at all")
    not_export = tmp_path / "photo.jpg"
    not_export.write_bytes(b"\xff\xd8\xff" + b"\0" * 100)
    damaged = tmp_path / "damaged.export"
    data = bytearray(export.read_bytes())
    data[-20] ^= 0xFF
    damaged.write_bytes(bytes(data))
    for source, passfile, words in (
        (export, wrong, "wrong backup passphrase"),
        (not_export, secret, "not an edgeid gallery export"),
        (damaged, secret, "damaged"),
    ):
        done = edgeid("gallery", "import", source, "--name", "restored", "--passphrase-file",
                      passfile, "--reason", REASON, home=home)  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert words in done.stderr and "key provider" not in done.stderr, done.stderr

    sys.path.insert(0, str(REPO / "tests"))
    from update_box import write_payload

    key, bundle = tmp_path / "vendor.pem", tmp_path / "other.bundle"
    payload = write_payload(tmp_path / "payload", "9.0.0")
    assert edgeid("update", "keygen", key, home=None).returncode == 0
    assert edgeid("update", "build", payload, "--version", "9.0.0", "--hardware", "other-box",
                  "--out", bundle, home=None).returncode == 0  # fmt: skip
    assert edgeid("update", "sign", bundle, "--key", key, home=None).returncode == 0
    assert edgeid("update", "trust", f"{key}.pub", home=home).returncode == 0
    done = edgeid("update", "verify", bundle, home=home)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "not installable here" in done.stderr and "other-box" in done.stderr


# -- finding 16 --------------------------------------------------------------------------------


def test_finding_16_wrong_values_refused_and_names_shown_safely(home: Path, tmp_path: Path) -> None:
    """A past --retain-until, --frame-interval inf; names with newlines or escapes printed
    raw; direction marks obeyed on pages and in the report; 20,000-character names."""
    media = tmp_path / "media"
    media.mkdir()

    def cases_now() -> list[str]:
        folder = home / "cases"
        return (
            sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []
        )

    before = cases_now()
    for extra in (["--retain-until", "2001-01-01"], ["--frame-interval", "inf"],
                  ["--frame-interval", "1e308"], ["--frame-interval", "nan"]):  # fmt: skip
        done = edgeid("case", "ingest", media, "--case", CASE, "--reason", REASON, *extra,
                      home=home)  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert cases_now() == before  # refused before any case was made

    # A file name from seized media with a screen-clearing escape and a forged line: the
    # ingest's "files not read" list shows it escaped.
    (media / "evil\x1b[2J\nforged line.jpg").write_bytes(b"not an image")
    done = edgeid("case", "ingest", media, "--case", CASE, "--reason", REASON, "--no-progress",
                  "--galleries", "g", home=home)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "evil\\x1b[2J\\x0aforged line.jpg" in done.stdout
    assert not any(line.startswith("forged line") for line in done.stdout.splitlines())

    from edgeid.runtime.cases.report import _ENV
    from edgeid.runtime.gallery.errors import InvalidRecordError
    from edgeid.runtime.gallery.records import NewSubject, check_subject
    from edgeid.runtime.web.rendering import make_environment

    shown = make_environment().from_string("<td>{{ name }}</td>").render(name="ok/\u202egpj.exe")
    assert "\u202e" not in shown and "ok/\u27e8U+202E\u27e9gpj.exe" in shown
    # The case report (its own Jinja2 environment) shows direction marks the same way.
    in_report = _ENV.from_string("<td>{{ name }}</td>").render(name="ok/\u202egpj.exe")
    assert in_report == "<td>ok/\u27e8U+202E\u27e9gpj.exe</td>"

    for name in ("x" * 201, "two\nlines", "bell\x07"):
        with pytest.raises(InvalidRecordError):
            check_subject(NewSubject(name, "warrant W-1", "os:tester"))
    check_subject(NewSubject("x" * 200, "warrant W-1", "os:tester"))


# -- finding 17 --------------------------------------------------------------------------------


def test_finding_17_messages_say_what_and_how(home: Path, lfw_dir: Path, tmp_path: Path) -> None:
    """Every CLI enrol warned "search index reconciled"; the duplicate refusal never named
    --allow-duplicate; `audit verify` said "record None" with head.json gone."""
    person = next(
        sorted(f.glob("*.jpg"))
        for f in sorted((lfw_dir / "images").iterdir())
        if len(list(f.glob("*.jpg"))) >= 2
    )
    argv = ["gallery", "enroll", "g", "--name", "Canary Hygiene", "--legal-basis", "warrant W-1"]
    first = edgeid(*argv, person[0], home=home)
    assert first.returncode == 0, first.stderr
    again = edgeid(*argv, person[0], home=home)
    assert again.returncode == 2, again.stderr
    assert "--allow-duplicate" in again.stderr
    for done in (first, again):
        assert "WARNING" not in done.stderr and "reconciled" not in done.stderr, done.stderr

    (home / "audit" / "head.json").unlink()
    done = edgeid("audit", "verify", home=home)
    assert done.returncode == 1
    assert "None" not in done.stdout + done.stderr
    assert "head.json" in done.stdout + done.stderr


def test_finding_17_a_damaged_upload_error_names_the_upload_not_the_server_path(
    home: Path, tmp_path: Path
) -> None:
    """A damaged-archive error showed web users the server's path to the uploaded copy."""
    import io
    import zipfile

    from edgeid.cli.commands import accountable
    from edgeid.runtime.cases.ingest import IngestRequest, Requester
    from edgeid.runtime.cases.jobs import IngestJob

    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as archive:
        archive.writestr("a.jpg", b"\xff\xd8\xff" + b"x" * 4000)
    upload = home / "case-uploads" / "0123abcd"
    upload.mkdir(parents=True)
    (upload / "archive").write_bytes(data.getvalue()[:-30])  # the central directory cut off
    with accountable.cases(home, inference=True) as door:
        request = IngestRequest(
            source=upload / "archive",
            case_number=CASE,
            reason=REASON,
            requester=Requester("os:tester", "operator"),
            source_label="upload: seized.zip",
        )
        job = IngestJob(door.cases.cases, request).start()
        assert job.wait(60)
    assert job.state == "failed" and job.error is not None
    assert str(home) not in job.error and "/" not in job.error.split("damaged")[0], job.error
    assert "upload the complete archive again" in job.error, job.error
