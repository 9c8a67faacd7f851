"""An agency's own embedder: added (and refused when it is not what it is declared to be),
calibrated on labelled LFW people, put in use under the two-person rule, galleries re-embedded.

The embedder is built here with onnx's helper API: a fixed random projection of the 112x112
chip. It proves the plumbing (checks, chips, calibration, switch-over, re-embedding), not a
face model: its scores say little about identity, which is why the enrolled mate searched for
is the enrolment photo itself.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeid.cli import main
from edgeid.runtime.accounts.sealing import accounts_key
from edgeid.runtime.accounts.tokens import TokenStore
from edgeid.runtime.accounts.users import UserStore
from edgeid.runtime.audit import AuditAction, AuditLog
from edgeid.runtime.audit.events import AuditEvent
from edgeid.runtime.audit.recorder import Recorder
from edgeid.runtime.config.settings import Settings
from edgeid.runtime.evaluation.calibration import pair_scores
from edgeid.runtime.evaluation.lfw import central_face_embedder
from edgeid.runtime.evaluation.operator_calibration import labelled_images
from edgeid.runtime.gallery.store import GalleryStore
from edgeid.runtime.gallery.thresholds import model_calibration
from edgeid.runtime.gallery.wording import reliability_note
from edgeid.runtime.inference.chip_input import (
    ARCFACE_112,
    SOURCE_TEMPLATE,
    ChipTemplate,
    rechip,
)
from edgeid.runtime.inference.embedders import IN_USE_FILE, in_use_embedder
from edgeid.runtime.inference.image_decode import load_image
from edgeid.runtime.inference.pipeline import FacePipeline
from edgeid.runtime.services.accounts import AccountAdmin
from edgeid.runtime.services.approvals import Approvals
from edgeid.runtime.services.models import ModelAdmin
from edgeid.runtime.services.proposals import ProposalStore
from edgeid.runtime.telemetry.software import embedder_id
from edgeid.runtime.vault.key_choice import provider_for
from edgeid.runtime.web.principal import Principal

REPO_ROOT = Path(__file__).resolve().parent.parent
NAME = "agency_arcface"
LICENCE = "Licensed to the test agency for victim identification only (test licence)"
REASON = "the agency's licensed model replaces the shipped one"
GALLERY = "victims"
CASE = "OPS-2026/0815"
# Images for calibration and, from other people, for the held-out check (LFW dev, sorted).
CALIBRATION_IMAGES = 130
TARGET_FMR = 1e-2


def build_embedder(
    path: Path, *, size: int = 112, spatial: tuple[int | str, int | str] | None = None
) -> Path:
    """A fixed random projection of a (N, 3, size, size) float chip, averaged 4x4 first: 64-d.

    ``spatial`` overrides the input's declared height and width (symbolic ones: a model that
    says it takes any size but whose weights fit ``size`` only)."""
    pooled = 3 * (size // 4) * (size // 4)
    weights = np.random.default_rng(7).standard_normal((pooled, 64)).astype(np.float32)
    height, width = spatial or (size, size)
    graph = helper.make_graph(
        [
            helper.make_node("AveragePool", ["chip"], ["pooled"], kernel_shape=[4, 4],
                             strides=[4, 4]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "projection"], ["template"]),
        ],
        "random_projection",
        [helper.make_tensor_value_info("chip", TensorProto.FLOAT, ["N", 3, height, width])],
        [helper.make_tensor_value_info("template", TensorProto.FLOAT, ["N", 64])],
        [numpy_helper.from_array(weights, "projection")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def add_args(model: Path, name: str = NAME, size: str = "112x112") -> list[str]:
    declared = ["--task", "embedding", "--input", size, "--align", "arcface"]
    pixels = ["--mean", "127.5", "--std", "127.5"]
    return ["models", "add", str(model), "--name", name, *declared, *pixels, "--licence", LICENCE]


def edgeid(home: Path, *argv: str) -> tuple[int, object, str]:
    """`edgeid ... --home HOME --json` as a real process."""
    done = subprocess.run(
        [sys.executable, "-m", "edgeid", *argv, "--home", str(home), "--json"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    out = json.loads(done.stdout) if done.stdout.strip() else None
    return done.returncode, out, done.stderr


def cli(capsys: pytest.CaptureFixture[str], home: Path, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*argv[:2], "--home", str(home), *argv[2:]])
    out, err = capsys.readouterr()
    return code, out, err


def own_models(home: Path, models_dir: Path) -> Path:
    """A models folder of the box's own, its built models linked (the shared folder is
    never written)."""
    folder = home / "models"
    folder.mkdir(parents=True)
    for item in models_dir.iterdir():
        if item.is_file() and item.name != IN_USE_FILE:
            (folder / item.name).symlink_to(item)
    return folder


def events(home: Path) -> list[AuditEvent]:
    with (
        GalleryStore(home, provider_for(home, Settings().keys)) as store,
        AuditLog.open(home, store.keyring) as log,
    ):
        return [r.event for r in reversed(log.query(limit=1000))]


def people_split(lfw_dir: Path, tmp: Path) -> tuple[Path, Path]:
    """Two labelled sets of different LFW people (alternate people, sorted), ~130 images each."""
    sets = (tmp / "calibration", tmp / "held_out")
    counts = [0, 0]
    for i, person in enumerate(sorted((lfw_dir / "images").iterdir())):
        side = i % 2
        if counts[side] >= CALIBRATION_IMAGES:
            if all(c >= CALIBRATION_IMAGES for c in counts):
                break
            continue
        sets[side].mkdir(parents=True, exist_ok=True)
        (sets[side] / person.name).symlink_to(person)
        counts[side] += len(list(person.glob("*.jpg")))
    return sets


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("onnx")
    build_embedder(folder / "good.onnx")
    build_embedder(folder / "made_for_150.onnx", size=150)
    build_embedder(folder / "any_size_fits_150.onnx", size=150, spatial=("H", "W"))
    return folder


@pytest.fixture(scope="module")
def calibrated(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, lfw_dir: Path, onnx_dir: Path
) -> tuple[Path, Path]:
    """A box with the operator's model added and calibrated; and the held-out people."""
    root = tmp_path_factory.mktemp("calibrated")
    home = root / "home"
    code, _, err = edgeid(home, "init")
    assert code == 0, err
    own_models(home, models_dir)
    code, _, err = edgeid(home, *add_args(onnx_dir / "good.onnx"))
    assert code == 0, err
    calibration_set, held_out = people_split(lfw_dir, root)
    code, _, err = edgeid(home, "models", "calibrate", NAME, "--images", str(calibration_set))
    assert code == 0, err
    return home, held_out


@pytest.fixture
def box(calibrated: tuple[Path, Path], tmp_path: Path) -> Path:
    """A private copy of the calibrated box."""
    home = tmp_path / "home"
    shutil.copytree(calibrated[0], home, symlinks=True)
    return home


# -- adding a model --------------------------------------------------------------------------


def test_a_model_is_added_with_its_manifest_checksum_source_and_licence(
    tmp_path: Path, models_dir: Path, onnx_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    folder = own_models(home, models_dir)
    code, _, err = cli(capsys, home, *add_args(onnx_dir / "good.onnx"))
    assert code == 0, err
    manifest = json.loads((folder / f"{NAME}.manifest.json").read_text())
    data = (folder / f"{NAME}.onnx").read_bytes()
    import hashlib

    assert manifest["sha256"] == hashlib.sha256(data).hexdigest()
    assert data == (onnx_dir / "good.onnx").read_bytes()
    assert manifest["source"]["package"] == "operator-provided"
    assert manifest["source"]["licence"] == LICENCE
    assert manifest["preprocessing"]["align"] == "arcface"
    assert manifest["preprocessing"]["layout"] == "NCHW"
    assert manifest["outputs"][0]["shape"] == ["N", 64]
    code, out, _ = cli(capsys, home, "models", "verify")
    assert code == 0 and NAME in out
    assert in_use_embedder(folder) == "dlib_resnet_v1"  # added is not in use


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ("made_for_150.onnx", "not the declared 112x112"),
        ("any_size_fits_150.onnx", "does not run on 112x112 chips as declared"),
    ],
)
def test_a_model_not_of_its_declared_shape_is_refused_in_one_line(
    tmp_path: Path,
    models_dir: Path,
    onnx_dir: Path,
    model: str,
    words: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    home = tmp_path / "home"
    folder = own_models(home, models_dir)
    before = sorted(p.name for p in folder.iterdir())
    code, _, err = cli(capsys, home, *add_args(onnx_dir / model))
    assert code == 2
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written


def test_a_model_declared_at_another_size_than_its_own_is_refused(
    tmp_path: Path, models_dir: Path, onnx_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    own_models(home, models_dir)
    code, _, err = cli(capsys, home, *add_args(onnx_dir / "good.onnx", size="150x150"))
    assert code == 2 and "not the declared 150x150" in err


# -- chips -----------------------------------------------------------------------------------


def test_the_arcface_chip_puts_the_eyes_where_arcface_expects_them() -> None:
    """A dlib chip with a bright dot at each template eye centre: the ArcFace chip cut from
    it has them at ArcFace's eye points (within a pixel)."""
    chip = np.zeros((150, 150, 3), np.uint8)
    points = SOURCE_TEMPLATE.points
    for eye in (points[2:4].mean(axis=0), points[0:2].mean(axis=0)):
        x, y = (round(v) for v in eye)
        chip[y - 1 : y + 2, x - 1 : x + 2] = 255
    arc = rechip(chip, ChipTemplate("arcface", 112))
    assert arc.shape == (112, 112, 3)
    for expected in ARCFACE_112[:2]:
        x, y = (round(v) for v in expected)
        window = arc[y - 2 : y + 3, x - 2 : x + 3, 0]
        assert window.max() > 100, (expected, window)
    assert rechip(chip, SOURCE_TEMPLATE) is chip  # the shipped model's chip is the stored one


# -- calibration -----------------------------------------------------------------------------


def test_calibrated_thresholds_hold_their_false_match_rate_on_held_out_people(
    calibrated: tuple[Path, Path],
) -> None:
    home, held_out = calibrated
    calibration = model_calibration(home / "models", NAME)
    assert calibration.bands == ("adult",)
    band = calibration.band("adult")
    assert band.data.provenance.in_product and band.data.verification is not None
    # `models calibrate` also ran `eval ident`'s 1:N protocol on the same people.
    ident = band.data.provenance.details["identification"]
    assert isinstance(ident, dict) and ident["mated_searches"] > 0
    assert 0 <= ident["hit_rate"]["1"] <= ident["hit_rate"]["10"] <= 1
    pipeline = FacePipeline.load(home / "models", embedder_model=NAME, threads=1, backend="cpu")
    embed = central_face_embedder(pipeline)
    images = labelled_images(held_out)
    vectors, people = [], []
    for item in images:
        template = embed(item.path)
        if template is not None:
            vectors.append(template)
            people.append(item.person)
    _, non_mated = pair_scores(np.stack(vectors), people)
    measured = float(np.mean(non_mated >= band.threshold(TARGET_FMR)))
    assert len(non_mated) > 5000
    assert TARGET_FMR / 2 <= measured <= TARGET_FMR * 2, measured


def test_the_reliability_note_says_what_the_model_was_not_measured_on(
    calibrated: tuple[Path, Path],
) -> None:
    calibration = model_calibration(calibrated[0] / "models", NAME)
    note = reliability_note(calibration, calibration.for_age("child_0_5"))
    assert f"not calibrated for model {NAME}" in note
    assert f"How reliably model {NAME} verifies the same child was not measured" in note
    assert "was not measured on teenagers aged 13-17, children aged 0-12" in note
    adult = reliability_note(calibration, calibration.for_age("adult"))
    rate = calibration.band("adult").data.verification
    assert rate is not None and f"about {rate.verification_rate:.0%}" in adult


# -- putting it in use -----------------------------------------------------------------------


def enrol(home: Path, photo: Path) -> str:
    code, _, err = edgeid(home, "gallery", "create", GALLERY)
    assert code == 0, err
    subject = ["--name", "Quillon Test Subject", "--legal-basis", "warrant W-1/2026"]
    code, out, err = edgeid(home, "gallery", "enroll", GALLERY, str(photo), *subject)
    assert code == 0 and isinstance(out, dict), err
    return str(out["subject_id"])


def search(home: Path, photo: Path) -> dict[str, object]:
    code, out, err = edgeid(home, "gallery", "search", str(photo), "--gallery", GALLERY,
                            "--case", CASE, "--reason", "find the child in the still")  # fmt: skip
    assert code == 0 and isinstance(out, dict), err
    return out


@pytest.fixture(scope="module")
def photo(lfw_dir: Path, models_dir: Path) -> Path:
    """An LFW photo with one face good enough to enrol."""
    pipeline = FacePipeline.load(models_dir, threads=1, backend="cpu")
    for path in sorted((lfw_dir / "images").glob("*/*.jpg")):
        faces = pipeline.detect(load_image(path))
        if len(faces) == 1 and faces[0].quality is not None and faces[0].quality.overall > 0.7:
            return path
    pytest.fail("no enrollable LFW photo")


def test_a_model_without_calibration_cannot_be_put_in_use(
    tmp_path: Path, models_dir: Path, onnx_dir: Path
) -> None:
    home = tmp_path / "home"
    code, _, err = edgeid(home, "init")
    assert code == 0, err
    folder = own_models(home, models_dir)
    code, _, err = edgeid(home, *add_args(onnx_dir / "good.onnx"))
    assert code == 0, err
    before = len(events(home))
    code, _, err = edgeid(home, "models", "use", NAME, "--reason", REASON)
    assert code == 2 and f"edgeid models calibrate {NAME}" in err, err
    assert len(err.strip().splitlines()) == 1
    assert in_use_embedder(folder) == "dlib_resnet_v1"
    assert not (folder / IN_USE_FILE).exists()
    assert len(events(home)) == before  # nothing proposed or changed


def test_with_dual_control_off_use_switches_and_re_embeds_and_search_finds_the_mate(
    box: Path, photo: Path
) -> None:
    (box / "edgeid.toml").write_text("[security]\ndual_control = false\n")
    subject = enrol(box, photo)
    code, out, err = edgeid(box, "models", "use", NAME, "--reason", REASON)
    assert code == 0 and isinstance(out, dict) and out["done"], err
    assert sum(out["re_embedded"].values()) == 1
    assert in_use_embedder(box / "models") == NAME
    found = search(box, photo)
    assert found["model_id"] == NAME
    first = found["candidates"][0]  # type: ignore[index]
    assert first["subject_id"] == subject and first["above_threshold"], found
    assert NAME in str(found["reliability"])  # the note reads this model's own figures
    changed = [e for e in events(box) if e.action is AuditAction.MODEL_CHANGED]
    assert len(changed) == 1 and changed[0].reason == REASON
    assert f"dlib_resnet_v1 -> {NAME}" in (changed[0].detail or "")
    assert "dual control off" in (changed[0].detail or "")
    assert [e.action for e in events(box)].count(AuditAction.GALLERY_RE_EMBEDDED) == 1
    reported = embedder_id(box / "models")
    assert reported is not None and reported.startswith(f"{NAME}@")


@contextmanager
def web_approvals(home: Path) -> Iterator[tuple[Approvals, Principal]]:
    """The approvals service as the web builds it, for the web's first admin ("admin")."""
    with (
        GalleryStore(home, provider_for(home, Settings().keys)) as store,
        AuditLog.open(home, store.keyring) as log,
    ):
        recorder = Recorder(log)
        sealing = accounts_key(store.keyring)
        users = UserStore(home, sealing)
        accounts = AccountAdmin(
            users, TokenStore(home, sealing), recorder, gallery_names=lambda: [GALLERY]
        )
        user = users.require("admin")
        admin = Principal(
            user.username, user.role, user.permissions, user.galleries, "session", "t:admin"
        )
        yield (
            Approvals(
                ProposalStore(home, store.keyring),
                recorder,
                accounts,
                models=ModelAdmin(home / "models", recorder),
            ),
            admin,
        )


def test_under_dual_control_a_second_person_approves_and_the_galleries_are_re_embedded(
    box: Path, photo: Path
) -> None:
    if getpass.getuser() == "admin":
        pytest.skip("the shell's login is the web admin's name: one person")
    subject = enrol(box, photo)
    # The shell proposes; it may not approve its own proposal.
    code, out, err = edgeid(box, "models", "use", NAME, "--reason", REASON)
    assert code == 0 and isinstance(out, dict) and not out["done"], err
    own = out["proposal"]["proposal_id"]  # type: ignore[index]
    code, _, err = edgeid(box, "approvals", "approve", own)
    assert code != 0 and "nobody approves their own proposal" in err
    assert in_use_embedder(box / "models") == "dlib_resnet_v1"
    code, _, err = edgeid(box, "approvals", "reject", own)  # withdrawn
    assert code == 0, err
    # The web's admin proposes; the shell approves, and the galleries are re-embedded.
    with web_approvals(box) as (approvals, admin):
        asked = approvals.use_model(admin, NAME, reason=REASON, where="test")
    assert not asked.done and asked.proposal is not None
    assert in_use_embedder(box / "models") == "dlib_resnet_v1"
    code, out, err = edgeid(box, "approvals", "approve", asked.proposal.proposal_id)
    assert code == 0 and isinstance(out, dict) and out["done"], err
    assert sum(out["re_embedded"].values()) == 1
    assert in_use_embedder(box / "models") == NAME
    found = search(box, photo)
    assert found["candidates"][0]["subject_id"] == subject  # type: ignore[index]
    me = f"os:{getpass.getuser()}"
    changed = [e for e in events(box) if e.action is AuditAction.MODEL_CHANGED]
    assert len(changed) == 1 and changed[0].user == me
    pid = asked.proposal.proposal_id
    assert f"proposal {pid} by admin, approved by {me}" in (changed[0].detail or "")


# -- ages ------------------------------------------------------------------------------------


def test_ages_give_each_band_its_own_figures_and_a_bad_ages_file_is_refused(
    tmp_path: Path,
) -> None:
    """The age plumbing alone, on templates drawn per person (no model): with an ages file,
    the adult and the child bands are measured each on their own pairs; bands without 300
    non-mated pairs are absent."""
    from edgeid.runtime.errors import BadInputError
    from edgeid.runtime.evaluation.operator_calibration import calibrate_model

    images = tmp_path / "set"
    rows = ["image,age"]
    rng = np.random.default_rng(3)
    centres: dict[str, np.ndarray] = {}
    for p in range(60):
        person = f"person_{p:02d}"
        (images / person).mkdir(parents=True)
        centres[person] = rng.standard_normal(32)
        for i in range(2):
            name = f"{person}_{i}.jpg"
            (images / person / name).write_bytes(b"\xff\xd8")
            rows.append(f"{person}/{name},{8 if p < 30 else 40}")
    ages = tmp_path / "ages.csv"
    ages.write_text("\n".join(rows) + "\n")

    def embed(path: Path) -> np.ndarray:
        vector = centres[path.parent.name] + 0.3 * rng.standard_normal(32)
        return (vector / np.linalg.norm(vector)).astype(np.float32)

    run = calibrate_model("agency_arcface", labelled_images(images, ages), embed, data_set="t")
    assert set(run.data.bands) == {"adult", "child", "child_6_12"}
    assert run.data.bands["adult"].provenance.people == 30
    assert run.data.bands["child_6_12"].provenance.images == 60
    assert all(b.verification is not None for b in run.data.bands.values())
    ages.write_text("image,age\nperson_00/person_00_0.jpg,eight\n")
    with pytest.raises(BadInputError, match="line 2: age 'eight' is not a number of years"):
        labelled_images(images, ages)
