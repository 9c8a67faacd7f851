"""`edgeid models build`: convert the pinned source weights and write one manifest per model.

The build is reproducible: the same sources and converter versions give the same bytes, and the
expected sha256 of every output is recorded in ``models/checksums.json``. A build whose output
differs from the recorded checksum fails, so a converter change cannot slip onto a box unseen.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeid.models.conversion import ConvertedModel
from edgeid.models.sources import (
    DLIB_MMOD,
    DLIB_RESNET,
    DLIB_SHAPE_PREDICTOR_5,
    FACENET_WHEEL_SOURCE,
    SourceFile,
    locate_installed,
    locate_wheel,
)
from edgeid.runtime.errors import ModelError
from edgeid.runtime.inference.manifest import (
    ModelManifest,
    ModelSource,
    TensorSpec,
    load_manifest,
    manifest_path,
    sha256_bytes,
)
from edgeid.runtime.inference.precision import INT8_SUFFIX, QUANTISED_MODELS, Precision

logger = logging.getLogger(__name__)

# Imported by the converters only (the [models] extra); the running service never needs them.
CONVERTER_MODULES = ("onnx", "face_recognition_models")
CHECKSUMS_FILE = Path(__file__).with_name("checksums.json")
# Bump when a converter's output changes on purpose; recorded in every manifest.
CONVERTER_VERSION = "edgeid-models 1"


@dataclass(frozen=True)
class BuildStep:
    label: str
    source: SourceFile
    outputs: tuple[str, ...]  # model names this step writes
    convert: Callable[[Path, Path], list[ConvertedModel]]


def _mmod(src: Path, dest: Path) -> list[ConvertedModel]:
    from edgeid.models.dlib_onnx import convert_dlib_mmod

    return [convert_dlib_mmod(src, dest)]


def _resnet(src: Path, dest: Path) -> list[ConvertedModel]:
    from edgeid.models.dlib_onnx import convert_dlib_resnet

    return [convert_dlib_resnet(src, dest)]


def _shape_predictor(src: Path, dest: Path) -> list[ConvertedModel]:
    from edgeid.models.dlib_shape_predictor import convert_shape_predictor

    return [convert_shape_predictor(src, dest)]


def _mtcnn(src: Path, dest: Path) -> list[ConvertedModel]:
    from edgeid.models.mtcnn import convert_mtcnn

    return convert_mtcnn(src, dest)


STEPS: tuple[BuildStep, ...] = (
    BuildStep("MMOD face detector (dlib DNN -> ONNX)", DLIB_MMOD, ("dlib_mmod",), _mmod),
    BuildStep(
        "5-point shape predictor (dlib trees -> ertree)",
        DLIB_SHAPE_PREDICTOR_5,
        ("dlib_sp5",),
        _shape_predictor,
    ),
    BuildStep(
        "MTCNN P/R/O-Net (torch weights -> ONNX)",
        FACENET_WHEEL_SOURCE,
        ("mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet"),
        _mtcnn,
    ),
    BuildStep("ResNet face embedder (dlib DNN -> ONNX)", DLIB_RESNET, ("dlib_resnet_v1",), _resnet),
)

Progress = Callable[[str], None]


def expected_checksums() -> dict[str, str]:
    if not CHECKSUMS_FILE.exists():
        return {}
    data: dict[str, str] = json.loads(CHECKSUMS_FILE.read_text(encoding="utf-8"))
    return data


def _up_to_date(models_dir: Path, step: BuildStep, expected: dict[str, str]) -> bool:
    """True when every output of the step exists, matches its manifest and the pinned checksum."""
    for name in step.outputs:
        try:
            manifest = load_manifest(manifest_path(models_dir, name))
        except ModelError:
            return False
        target = models_dir / manifest.file
        if (
            manifest.converter != CONVERTER_VERSION
            or manifest.source.sha256 != step.source.sha256
            or not target.is_file()
            or sha256_bytes(target.read_bytes()) != manifest.sha256
            or (name in expected and expected[name] != manifest.sha256)
        ):
            return False
    return True


def _manifest_for(converted: ConvertedModel, data: bytes, source: SourceFile) -> ModelManifest:
    return ModelManifest(
        name=converted.name,
        task=converted.task,  # type: ignore[arg-type]
        format=converted.format,  # type: ignore[arg-type]
        file=converted.filename,
        sha256=sha256_bytes(data),
        size_bytes=len(data),
        source=ModelSource(
            package=source.package,
            version=source.version,
            file=source.file,
            sha256=source.sha256,
            licence=source.licence,
        ),
        converter=CONVERTER_VERSION,
        inputs=[TensorSpec(**asdict(spec)) for spec in converted.inputs],
        outputs=[TensorSpec(**asdict(spec)) for spec in converted.outputs],
        preprocessing=converted.preprocessing,
        parameters=converted.parameters,
    )


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _source_path(step: BuildStep, wheelhouse: Path) -> Path:
    if step.source is FACENET_WHEEL_SOURCE:
        return locate_wheel(wheelhouse)
    return locate_installed(step.source)


def _need_converters() -> None:
    """The converters' own dependencies are an extra; a box installs converted models instead."""
    missing = [name for name in CONVERTER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelError(
            f"converting models needs {', '.join(missing)}, which this installation lacks: "
            "pip install 'edgeid[models]' (the edgeid package ships converted models)"
        )


def build_models(
    models_dir: Path,
    wheelhouse: Path,
    *,
    force: bool = False,
    only: Sequence[str] | None = None,
    record_checksums: bool = False,
    progress: Progress | None = None,
    precision: Precision = "fp32",
    data_dir: Path | None = None,
) -> list[ModelManifest]:
    """Convert every pinned source into ``models_dir``; returns the manifests written or kept.

    ``precision="int8"`` (or ``"int8-embedder"``) also writes the INT8 twins of the MTCNN nets
    and the embedder, calibrated on the LFW dev photos (MTCNN) and the scene photos (embedder)
    under ``data_dir`` (edgeid/models/quantise.py).
    """
    say = progress or (lambda _message: None)
    models_dir.mkdir(parents=True, exist_ok=True)
    expected = expected_checksums()
    steps = [s for s in STEPS if only is None or any(n in only for n in s.outputs)]
    manifests: list[ModelManifest] = []
    for index, step in enumerate(steps, start=1):
        prefix = f"[{index}/{len(steps)}] {step.label}"
        if not force and _up_to_date(models_dir, step, expected):
            say(f"{prefix}: up to date")
            manifests.extend(load_manifest(manifest_path(models_dir, n)) for n in step.outputs)
            continue
        _need_converters()
        say(f"{prefix}: converting {step.source.package} {step.source.version} …")
        started = time.monotonic()
        source = _source_path(step, wheelhouse)
        with tempfile.TemporaryDirectory(dir=models_dir, prefix=".staging-") as staging:
            converted_models = step.convert(source, Path(staging))
            for converted in converted_models:
                data = (Path(staging) / converted.filename).read_bytes()
                manifest = _manifest_for(converted, data, step.source)
                pinned = expected.get(manifest.name)
                if pinned is not None and pinned != manifest.sha256 and not record_checksums:
                    raise ModelError(
                        f"{manifest.name}: converted bytes have sha256 {manifest.sha256[:12]}…, "
                        f"the pinned build gives {pinned[:12]}…; the converter or the onnx "
                        "package changed (pin onnx==1.23.2, or re-record checksums)"
                    )
                _write_atomically(models_dir / converted.filename, data)
                text = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True)
                _write_atomically(manifest_path(models_dir, manifest.name), (text + "\n").encode())
                manifests.append(manifest)
        say(f"{prefix}: done in {time.monotonic() - started:.1f} s")
    if precision != "fp32":
        manifests.extend(
            _build_int8(models_dir, data_dir, expected, force, record_checksums, say, only)
        )
    if only is None:
        # The self-test's known image and expected results (edgeid/models/selftest_image.py).
        from edgeid.models.selftest_image import install_selftest

        install_selftest(models_dir, wheelhouse, say)
    if record_checksums:
        recorded = expected | {m.name: m.sha256 for m in manifests}
        CHECKSUMS_FILE.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")
        say(f"recorded {len(manifests)} checksums in {CHECKSUMS_FILE}")
    return manifests


def _int8_up_to_date(models_dir: Path, names: Sequence[str], expected: dict[str, str]) -> bool:
    """Every INT8 twin present, intact, quantised from the FP32 model now there, and pinned
    (where the pins apply to this CPU)."""
    from edgeid.models.quantise import pins_apply

    for name in names:
        try:
            manifest = load_manifest(manifest_path(models_dir, name + INT8_SUFFIX))
            fp32 = load_manifest(manifest_path(models_dir, name))
        except ModelError:
            return False
        target = models_dir / manifest.file
        pinned = expected.get(manifest.name)
        if (
            manifest.converter != CONVERTER_VERSION
            or manifest.parameters.get("quantised_from_sha256") != fp32.sha256
            or not target.is_file()
            or sha256_bytes(target.read_bytes()) != manifest.sha256
            or (pinned is not None and pinned != manifest.sha256 and pins_apply())
        ):
            return False
    return True


def _build_int8(
    models_dir: Path,
    data_dir: Path | None,
    expected: dict[str, str],
    force: bool,
    record_checksums: bool,
    say: Progress,
    only: Sequence[str] | None,
) -> list[ModelManifest]:
    """The INT8 twins (static QDQ quantisation), checked against their pinned sha256."""
    names = [n for n in QUANTISED_MODELS if only is None or n in only or n + INT8_SUFFIX in only]
    prefix = "[int8] MTCNN nets and embedder (static QDQ quantisation)"
    if not force and _int8_up_to_date(models_dir, names, expected):
        say(f"{prefix}: up to date")
        return [load_manifest(manifest_path(models_dir, n + INT8_SUFFIX)) for n in names]
    if data_dir is None:
        raise ModelError(
            "INT8 models are calibrated on real photos; pass --data with the shared data folder "
            "(holding lfw-dev/images and scenes/)"
        )
    from edgeid.models.quantise import pins_apply, quantise_all

    say(f"{prefix}: calibrating on {data_dir} (lfw-dev, scenes) …")
    started = time.monotonic()
    manifests = []
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=".staging-") as staging:
        converted_models, _ = quantise_all(models_dir, data_dir, Path(staging), names)
        for converted in converted_models:
            data = (Path(staging) / converted.filename).read_bytes()
            source = load_manifest(
                manifest_path(models_dir, converted.parameters["quantised_from"])
            )
            manifest = _manifest_for(converted, data, _as_source(source.source))
            pinned = expected.get(manifest.name)
            if pinned is not None and pinned != manifest.sha256 and not pins_apply():
                say(
                    f"{manifest.name}: sha256 {manifest.sha256[:12]}… (pinned on another CPU "
                    f"kind: {pinned[:12]}…); kept, as ONNX Runtime's kernels differ here"
                )
            elif pinned is not None and pinned != manifest.sha256 and not record_checksums:
                raise ModelError(
                    f"{manifest.name}: quantised bytes have sha256 {manifest.sha256[:12]}…, the "
                    f"pinned build gives {pinned[:12]}…; the calibration photos, the FP32 model or "
                    "onnxruntime changed (pin onnxruntime, or re-record checksums)"
                )
            _write_atomically(models_dir / converted.filename, data)
            text = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True)
            _write_atomically(manifest_path(models_dir, manifest.name), (text + "\n").encode())
            manifests.append(manifest)
    say(f"{prefix}: done in {time.monotonic() - started:.1f} s")
    return manifests


def _as_source(source: ModelSource) -> SourceFile:
    """The FP32 model's source, which its INT8 twin shares."""
    return SourceFile(
        package=source.package,
        version=source.version,
        file=source.file,
        sha256=source.sha256,
        licence=source.licence,
    )
