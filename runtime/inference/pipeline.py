"""Detect -> landmarks -> align -> embed, over verified models. Knows no HTTP and no storage."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

from runtime.inference.alignment import face_chip
from runtime.inference.embedder import Embedder
from runtime.inference.landmarks import ShapePredictor
from runtime.inference.manifest import read_verified_model
from runtime.inference.onnx_backend import create_cpu_session
from runtime.inference.types import Box, Detection, FloatArray, RGBImage

DetectorName = Literal["mmod", "mtcnn"]
DETECTOR_NAMES: tuple[DetectorName, ...] = ("mmod", "mtcnn")
# Chosen by measurement on ../shared/data (see README, "Choosing the default detector").
DEFAULT_DETECTOR: DetectorName = "mtcnn"
EMBEDDER_MODEL = "dlib_resnet_v1"
LANDMARK_MODEL = "dlib_sp5"
# dlib's face-chip geometry for its ResNet embedder: 150 px chips, 25% padding around the template.
CHIP_SIZE = 150
CHIP_PADDING = 0.25


class FaceDetector(Protocol):
    def detect(self, image: RGBImage) -> list[Detection]: ...

    def landmark_box(self, detection: Detection) -> Box:
        """The box to hand the 5-point predictor, which was trained on dlib-style boxes."""
        ...


@dataclass(frozen=True)
class Face:
    box: Box
    score: float
    landmarks: FloatArray  # (5, 2), dlib's 5-point order
    embedding: FloatArray | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "box": [round(v, 2) for v in self.box.as_list()],
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks],
            "score": round(self.score, 4),
        }
        if self.embedding is not None:
            out["embedding"] = [round(float(v), 6) for v in self.embedding]
        return out


class _MmodAdapter:
    def __init__(self, models_dir: Path, threads: int | None, upsample: int) -> None:
        from runtime.inference.mmod_detector import MmodDetector

        manifest, data = read_verified_model(models_dir, "dlib_mmod")
        self._detector = MmodDetector(create_cpu_session(data, threads), manifest.parameters)
        self._upsample = upsample

    def detect(self, image: RGBImage) -> list[Detection]:
        return self._detector.detect(image, upsample=self._upsample)

    def landmark_box(self, detection: Detection) -> Box:
        return detection.box  # MMOD draws dlib-style boxes already


class _MtcnnAdapter:
    def __init__(self, models_dir: Path, threads: int | None) -> None:
        from runtime.inference.mtcnn_detector import MtcnnDetector

        self._detector = MtcnnDetector.load(models_dir, threads=threads)

    def detect(self, image: RGBImage) -> list[Detection]:
        return self._detector.detect(image)

    def landmark_box(self, detection: Detection) -> Box:
        from runtime.inference.mtcnn_detector import dlib_style_box

        # MTCNN boxes are taller and narrower than dlib's; the predictor needs dlib's framing.
        return dlib_style_box(detection.box)


def load_detector(
    models_dir: Path, name: DetectorName, threads: int | None = None, upsample: int = 0
) -> FaceDetector:
    if name == "mmod":
        return _MmodAdapter(models_dir, threads, upsample)
    return _MtcnnAdapter(models_dir, threads)


class FacePipeline:
    def __init__(
        self, detector: FaceDetector, landmarks: ShapePredictor, embedder: Embedder | None
    ) -> None:
        self.detector = detector
        self.landmarks = landmarks
        self.embedder = embedder

    @classmethod
    def load(
        cls,
        models_dir: Path,
        detector: DetectorName = DEFAULT_DETECTOR,
        *,
        threads: int | None = None,
        upsample: int = 0,
        with_embedder: bool = True,
    ) -> FacePipeline:
        _, sp_bytes = read_verified_model(models_dir, LANDMARK_MODEL)
        embedder = None
        if with_embedder:
            _, emb_bytes = read_verified_model(models_dir, EMBEDDER_MODEL)
            embedder = Embedder(create_cpu_session(emb_bytes, threads), EMBEDDER_MODEL)
        return cls(
            load_detector(models_dir, detector, threads, upsample),
            ShapePredictor.from_bytes(sp_bytes),
            embedder,
        )

    def detect(self, image: RGBImage) -> list[Face]:
        faces = []
        for det in self.detector.detect(image):
            points = self.landmarks.predict(image, self.detector.landmark_box(det))
            faces.append(Face(box=det.box, score=det.score, landmarks=points))
        return faces

    def chips(self, image: RGBImage, faces: list[Face]) -> list[RGBImage]:
        return [face_chip(image, f.landmarks, CHIP_SIZE, CHIP_PADDING) for f in faces]

    def embed(self, image: RGBImage) -> list[Face]:
        """Every face of the image, embedded in one batch."""
        if self.embedder is None:
            raise RuntimeError("pipeline was loaded without an embedder")
        faces = self.detect(image)
        if not faces:
            return []
        vectors = self.embedder.embed(self.chips(image, faces))
        return [replace(face, embedding=vec) for face, vec in zip(faces, vectors, strict=True)]
