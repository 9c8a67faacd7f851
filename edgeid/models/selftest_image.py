"""The self-test's known image and what the pipeline must find in it.

The image is NASA's photograph of astronaut Eileen Collins ("no known copyright restrictions,
released into the public domain"), as shipped inside the scikit-image wheel at
``skimage/data/astronaut.png``. No face photo ships in this repository: the wheel is fetched like
the facenet-pytorch wheel (``make models`` puts it in ``<home>/wheelhouse``) and only that PNG is
read. The PNG's own sha256 is pinned, so the pinned wheel or any other 0.25.2 wheel of
scikit-image will do on an air-gapped box.

What the pipeline must find in it (one face: box, five landmarks and the 128-d embedding, per
detector) is pinned in ``models/selftest_reference.json`` together with the sha256 of every model
it was computed with. It was recorded once from the CPU pipeline with
``python -m edgeid.models.selftest_image --record --models var/models`` and is cross-checked
against dlib
itself in ``tests/test_provision_selftest.py``. ``edgeid models build`` checks that the models it
built are the ones the reference was recorded with and writes the image and the reference into
``<home>/models/``; ``edgeid provision selftest`` compares within the recorded tolerance.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeid.runtime.errors import ModelError, first_line
from edgeid.runtime.inference.manifest import SHA256_PATTERN, load_manifest, manifest_path
from edgeid.runtime.storage.durable import write_file_atomically

SKIMAGE_PACKAGE = "scikit-image"
SKIMAGE_VERSION = "0.25.2"
# The image is the same in every platform's wheel; this one is pinned so that `make models`
# fetches the same bytes on x86 and ARM boxes (pip download --platform ...).
SKIMAGE_WHEEL = (
    f"scikit_image-{SKIMAGE_VERSION}-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
)
SKIMAGE_WHEEL_SHA256 = "24cc986e1f4187a12aa319f777b36008764e856e5013666a4a83f8df083c2641"
IMAGE_MEMBER = "skimage/data/astronaut.png"
IMAGE_SHA256 = "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5"
IMAGE_LICENCE = "public domain (NASA Great Images; no known copyright restrictions)"

IMAGE_FILE = "selftest-astronaut.png"
REFERENCE_FILE = "selftest-reference.json"
PINNED_REFERENCE = Path(__file__).with_name("selftest_reference.json")

# Bars for the comparison, recorded in the reference. FP16 TensorRT engines move the embedding
# by well under 1e-3 in cosine (the bar of make gpu-check); the detectors' boxes by a few
# hundredths of IoU; landmarks come from the same numpy predictor given a nearby box.
MIN_COSINE = 0.999
MIN_BOX_IOU = 0.95
MAX_LANDMARK_PX = 2.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageSource(_Strict):
    package: str
    version: str
    wheel: str
    wheel_sha256: str = Field(pattern=SHA256_PATTERN)
    member: str
    licence: str


class Tolerance(_Strict):
    min_cosine: float = Field(gt=0.0, le=1.0)
    min_box_iou: float = Field(gt=0.0, le=1.0)
    max_landmark_px: float = Field(ge=0.0)


class ReferenceFace(_Strict):
    box: list[float] = Field(min_length=4, max_length=4)  # x0, y0, x1, y1
    landmarks: list[list[float]] = Field(min_length=5, max_length=5)  # dlib's 5-point order
    embedding: list[float] = Field(min_length=1)  # float32 values, unit length
    embedding_sha256: str = Field(pattern=SHA256_PATTERN)  # of the little-endian float32 bytes


class SelftestReference(_Strict):
    schema_version: Literal[1] = 1
    image_file: str
    image_sha256: str = Field(pattern=SHA256_PATTERN)
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    source: ImageSource
    # Every model the expected values were computed with, name -> ONNX/ertree sha256.
    models: dict[str, str]
    tolerance: Tolerance
    detectors: dict[str, list[ReferenceFace]]


def reference_bytes(reference: SelftestReference) -> bytes:
    """The canonical file bytes: the same reference always gives the same file."""
    return (json.dumps(reference.model_dump(mode="json"), indent=1, sort_keys=True) + "\n").encode()


def parse_reference(data: bytes, where: str) -> SelftestReference:
    try:
        return SelftestReference.model_validate(json.loads(data))
    except (ValueError, ValidationError) as exc:
        raise ModelError(
            f"self-test reference {where} is unreadable ({first_line(exc)}); rebuild with "
            "edgeid models build"
        ) from exc


def load_reference(models_dir: Path) -> SelftestReference:
    path = models_dir / REFERENCE_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"no self-test reference at {path}; run edgeid models build") from None
    except OSError as exc:
        raise ModelError(f"cannot read {path} ({exc.strerror}); run edgeid models build") from exc
    return parse_reference(data, str(path))


def pinned_reference() -> SelftestReference:
    return parse_reference(PINNED_REFERENCE.read_bytes(), str(PINNED_REFERENCE))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _candidate_wheels(wheelhouse: Path) -> list[Path]:
    """The pinned wheel first, then any other platform's wheel of the same version."""
    pinned = wheelhouse / SKIMAGE_WHEEL
    others = sorted(wheelhouse.glob(f"scikit_image-{SKIMAGE_VERSION}-*.whl"))
    return [pinned, *(w for w in others if w != pinned)] if pinned.is_file() else others


def extract_image(wheelhouse: Path) -> bytes:
    """The astronaut PNG out of a scikit-image wheel, checked against its pinned sha256."""
    wheels = _candidate_wheels(wheelhouse)
    if not wheels:
        raise ModelError(
            f"{wheelhouse / SKIMAGE_WHEEL} is missing (it holds the self-test image); fetch it "
            f"with `pip download --no-deps --only-binary=:all: --platform manylinux2014_x86_64 "
            f"--python-version 3.11 {SKIMAGE_PACKAGE}=={SKIMAGE_VERSION} -d {wheelhouse}` "
            "(make models does this)"
        )
    for wheel in wheels:
        if wheel.name == SKIMAGE_WHEEL and _sha256(wheel.read_bytes()) != SKIMAGE_WHEEL_SHA256:
            raise ModelError(
                f"{wheel} does not have the pinned sha256 {SKIMAGE_WHEEL_SHA256[:12]}…; "
                "delete it and fetch it again"
            )
        try:
            with zipfile.ZipFile(wheel) as archive:
                data = archive.read(IMAGE_MEMBER)
        except (OSError, KeyError, zipfile.BadZipFile):
            continue
        if _sha256(data) == IMAGE_SHA256:
            return data
    raise ModelError(
        f"no wheel in {wheelhouse} holds {IMAGE_MEMBER} with sha256 {IMAGE_SHA256[:12]}…; "
        f"fetch {SKIMAGE_WHEEL} again"
    )


def _check_models(models_dir: Path, reference: SelftestReference) -> None:
    for name, sha256 in sorted(reference.models.items()):
        built = load_manifest(manifest_path(models_dir, name)).sha256
        if built != sha256:
            raise ModelError(
                f"the self-test reference was recorded with {name} {sha256[:12]}…, the build "
                f"gives {built[:12]}…; re-record it with"
                " python -m edgeid.models.selftest_image --record"
            )


def _write_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file() and path.read_bytes() == data:
        return False
    write_file_atomically(path, data, action=f"writing {path.name}")
    return True


def install_selftest(
    models_dir: Path, wheelhouse: Path, progress: Callable[[str], None] | None = None
) -> SelftestReference:
    """Write the known image and its reference into ``models_dir``; no-op when they are there."""
    say = progress or (lambda _message: None)
    label = "self-test image and reference (scikit-image astronaut)"
    reference = pinned_reference()
    _check_models(models_dir, reference)
    image_path = models_dir / reference.image_file
    changed = False
    if not (image_path.is_file() and _sha256(image_path.read_bytes()) == reference.image_sha256):
        changed |= _write_if_changed(image_path, extract_image(wheelhouse))
    changed |= _write_if_changed(models_dir / REFERENCE_FILE, reference_bytes(reference))
    say(f"{label}: {'written' if changed else 'up to date'}")
    return reference


# -- recording (a developer's step, when a model or the pipeline changes on purpose) -----------


def record_reference(models_dir: Path, wheelhouse: Path) -> SelftestReference:
    """Run the CPU pipeline on the image with every detector and pin what it finds."""
    import numpy as np

    from edgeid.runtime.inference.image_decode import decode_image
    from edgeid.runtime.inference.mtcnn_detector import MODEL_NAMES as MTCNN_MODELS
    from edgeid.runtime.inference.pipeline import (
        DETECTOR_NAMES,
        EMBEDDER_MODEL,
        LANDMARK_MODEL,
        MMOD_MODEL,
        FacePipeline,
    )

    data = extract_image(wheelhouse)
    image = decode_image(data, name=IMAGE_FILE)
    names = [EMBEDDER_MODEL, LANDMARK_MODEL, MMOD_MODEL, *MTCNN_MODELS]
    detectors: dict[str, list[ReferenceFace]] = {}
    for detector in DETECTOR_NAMES:
        pipeline = FacePipeline.load(models_dir, detector, backend="cpu")
        faces = []
        for face in pipeline.embed(image):
            assert face.embedding is not None
            vector = face.embedding.astype("<f4")
            faces.append(
                ReferenceFace(
                    box=[float(v) for v in face.box.as_list()],
                    landmarks=[[float(x), float(y)] for x, y in np.asarray(face.landmarks)],
                    embedding=[float(v) for v in vector],
                    embedding_sha256=_sha256(vector.tobytes()),
                )
            )
        detectors[detector] = faces
    return SelftestReference(
        image_file=IMAGE_FILE,
        image_sha256=IMAGE_SHA256,
        width=int(image.shape[1]),
        height=int(image.shape[0]),
        source=ImageSource(
            package=SKIMAGE_PACKAGE,
            version=SKIMAGE_VERSION,
            wheel=SKIMAGE_WHEEL,
            wheel_sha256=SKIMAGE_WHEEL_SHA256,
            member=IMAGE_MEMBER,
            licence=IMAGE_LICENCE,
        ),
        models={n: load_manifest(manifest_path(models_dir, n)).sha256 for n in sorted(names)},
        tolerance=Tolerance(
            min_cosine=MIN_COSINE, min_box_iou=MIN_BOX_IOU, max_landmark_px=MAX_LANDMARK_PX
        ),
        detectors=detectors,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Record the self-test reference (developers).")
    parser.add_argument("--record", action="store_true", required=True)
    parser.add_argument("--models", type=Path, required=True, help="built models folder")
    parser.add_argument("--wheelhouse", type=Path, help="default: beside the models folder")
    args = parser.parse_args(argv)
    wheelhouse = args.wheelhouse or args.models.parent / "wheelhouse"
    reference = record_reference(args.models, wheelhouse)
    PINNED_REFERENCE.write_bytes(reference_bytes(reference))
    faces = {d: len(f) for d, f in reference.detectors.items()}
    print(f"recorded {PINNED_REFERENCE} (faces per detector: {faces})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
