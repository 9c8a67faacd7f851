"""Detect -> landmarks -> align -> embed, over verified models. Knows no HTTP and no storage."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from edgeid.runtime.errors import ModelError
from edgeid.runtime.inference.alignment import face_chip
from edgeid.runtime.inference.backends.selection import BackendChoice, BackendState, SessionFactory
from edgeid.runtime.inference.backends.session import ModelOpener
from edgeid.runtime.inference.chip_input import ChipInput
from edgeid.runtime.inference.embedder import Embedder
from edgeid.runtime.inference.embedders import SHIPPED_EMBEDDER, in_use_embedder
from edgeid.runtime.inference.image_decode import WorkingImage
from edgeid.runtime.inference.landmarks import ShapePredictor
from edgeid.runtime.inference.manifest import read_verified_model
from edgeid.runtime.inference.onnx_backend import DEFAULT_SPINNING
from edgeid.runtime.inference.precision import DEFAULT_PRECISION, Precision, precision_model
from edgeid.runtime.inference.quality import FaceQuality, assess
from edgeid.runtime.inference.types import Box, Detection, FloatArray, RGBImage

if TYPE_CHECKING:  # imported where MTCNN is loaded, not for MMOD
    from edgeid.runtime.inference.mtcnn_detector import RunSizing

DetectorName = Literal["mmod", "mtcnn"]
DETECTOR_NAMES: tuple[DetectorName, ...] = ("mmod", "mtcnn")
# Chosen by measurement on ../shared/data (see README, "Choosing the default detector").
DEFAULT_DETECTOR: DetectorName = "mtcnn"
# The shipped embedder; the one a box uses is `in_use_embedder` (edgeid models use).
EMBEDDER_MODEL = SHIPPED_EMBEDDER
MMOD_MODEL = "dlib_mmod"
# TensorRT engines live beside the models folder, keyed by model, GPU and TensorRT version.
ENGINES_DIR = "engines"
LANDMARK_MODEL = "dlib_sp5"
# dlib's face-chip geometry for its ResNet embedder: 150 px chips, 25% padding around the template.
CHIP_SIZE = 150
CHIP_PADDING = 0.25
# Stage names a StageTimer records, in pipeline order; "decode" is timed by the caller, which
# owns the image bytes (the pipeline starts from pixels).
STAGES = ("decode", "detect", "landmarks_align", "quality", "embed")
# A face found on a reduced photo is re-read from the full-resolution photo within its box
# widened by this fraction on each side (the padded chip reaches about 0.4 beyond the box).
REGION_MARGIN = 0.6
# ...and at most this many pixels on the region's longer side: 4x the chip keeps the 150-px chip
# sharp while a face filling a 50-megapixel photo costs a 600-px crop, not its full size.
REGION_MAX_SIDE = 4 * CHIP_SIZE
# Floor for the norm when renormalising the flip-averaged template (as the embedder does).
_MIN_NORM = 1e-12


class StageTimer:
    """Wall-clock seconds per pipeline stage, summed over every call it is passed to.

    Pass one to ``FacePipeline.detect``/``embed`` to read where the time goes; without one the
    pipeline times nothing. Not thread-safe: use one timer per thread.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = self._clock()
        try:
            yield
        finally:
            self.add(name, self._clock() - started)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.calls[name] = self.calls.get(name, 0) + 1

    def milliseconds(self) -> dict[str, float]:
        """Total milliseconds per stage, in pipeline order (stages never entered are absent)."""
        order = [name for name in STAGES if name in self.seconds]
        order += sorted(set(self.seconds) - set(STAGES))
        return {name: 1000 * self.seconds[name] for name in order}


_UNTIMED: AbstractContextManager[None] = nullcontext()


def _stage(timer: StageTimer | None, name: str) -> AbstractContextManager[None]:
    return _UNTIMED if timer is None else timer.stage(name)


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
    quality: FaceQuality | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "box": [round(v, 2) for v in self.box.as_list()],
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks],
            "score": round(self.score, 4),
        }
        if self.quality is not None:
            out["quality"] = self.quality.to_json()
        if self.embedding is not None:
            out["embedding"] = [round(float(v), 6) for v in self.embedding]
        return out


class _MmodAdapter:
    def __init__(self, models_dir: Path, open_model: ModelOpener, upsample: int) -> None:
        from edgeid.runtime.inference.mmod_detector import MmodDetector

        manifest, data = read_verified_model(models_dir, MMOD_MODEL)
        session = open_model(MMOD_MODEL, manifest.sha256, data)
        self._detector = MmodDetector(session, manifest.parameters)
        self._upsample = upsample

    def detect(self, image: RGBImage) -> list[Detection]:
        return self._detector.detect(image, upsample=self._upsample)

    def landmark_box(self, detection: Detection) -> Box:
        return detection.box  # MMOD draws dlib-style boxes already


class _MtcnnAdapter:
    def __init__(
        self,
        models_dir: Path,
        threads: int | None,
        open_model: ModelOpener,
        precision: Precision,
        runs: RunSizing,
    ) -> None:
        from edgeid.runtime.inference.mtcnn_detector import MtcnnDetector

        self._detector = MtcnnDetector.load(
            models_dir, threads=threads, open_model=open_model, precision=precision, runs=runs
        )

    def detect(self, image: RGBImage) -> list[Detection]:
        return self._detector.detect(image)

    def landmark_box(self, detection: Detection) -> Box:
        from edgeid.runtime.inference.mtcnn_detector import dlib_style_box

        # MTCNN boxes are taller and narrower than dlib's; the predictor needs dlib's framing.
        return dlib_style_box(detection.box)


def load_detector(
    models_dir: Path,
    name: DetectorName,
    threads: int | None = None,
    upsample: int = 0,
    open_model: ModelOpener | None = None,
    precision: Precision = DEFAULT_PRECISION,
    runs: RunSizing = "by-backend",
) -> FaceDetector:
    """``runs``: how MTCNN sizes its runs (see ``MtcnnDetector.load``); MMOD ignores it."""
    opener = open_model or SessionFactory("cpu", models_dir.parent / ENGINES_DIR, threads).open
    if name == "mmod":
        return _MmodAdapter(models_dir, opener, upsample)
    return _MtcnnAdapter(models_dir, threads, opener, precision, runs)


class FacePipeline:
    """Every face of an image with its landmarks and quality, and (with an embedder) template.

    ``flip_tta``: embed each chip and its mirror image in the same batch and use the
    renormalised mean (horizontal-flip test-time augmentation; doubles the embedder's work).
    """

    def __init__(
        self,
        detector: FaceDetector,
        landmarks: ShapePredictor,
        embedder: Embedder | None,
        *,
        flip_tta: bool = False,
    ) -> None:
        self.detector = detector
        self.landmarks = landmarks
        self.embedder = embedder
        self.flip_tta = flip_tta
        # What the models run on: "cpu", "tensorrt", or "degraded" (TensorRT expected, CPU used).
        self.backend_state: BackendState = "cpu"
        # The sessions' factory when load() opened them: GPU memory figures and closing.
        self.sessions: SessionFactory | None = None

    @classmethod
    def load(
        cls,
        models_dir: Path,
        detector: DetectorName = DEFAULT_DETECTOR,
        *,
        threads: int | None = None,
        upsample: int = 0,
        with_embedder: bool = True,
        flip_tta: bool = False,
        backend: BackendChoice = "auto",
        engine_cache_dir: Path | None = None,
        embedder_model: str | None = None,
        spinning: bool = DEFAULT_SPINNING,
        precision: Precision = DEFAULT_PRECISION,
        rewrite_prelu: bool = True,
    ) -> FacePipeline:
        """Verified models on the chosen backend (``auto``: TensorRT where a GPU answers).

        The embedder is ``embedder_model``, by default the one in use on the box
        (``models/in-use.json``, else the shipped one).

        TensorRT engines are cached in ``engine_cache_dir`` (default: ``engines/`` beside the
        models folder); ``backend_state`` then says ``cpu``, ``tensorrt`` or ``degraded``.

        ``spinning``: ONNX Runtime's intra-op threads busy-wait after each run (edgeid.toml
        ``inference.spinning``); ``precision``: the FP32 models or their INT8 twins for the
        MTCNN nets and the shipped embedder (``inference.precision``); ``rewrite_prelu`` False
        runs PRelu as built, only to measure what ``create_cpu_session``'s rewrite gains.
        """
        sessions = SessionFactory(
            backend,
            engine_cache_dir or models_dir.parent / ENGINES_DIR,
            threads,
            spinning,
            rewrite_prelu,
        )
        try:
            _, sp_bytes = read_verified_model(models_dir, LANDMARK_MODEL)
            embedder = None
            if with_embedder:
                name = embedder_model or in_use_embedder(models_dir)
                if name == SHIPPED_EMBEDDER:
                    name = precision_model(name, precision)
                manifest, emb_bytes = read_verified_model(models_dir, name)
                if manifest.task != "face-embedding":
                    raise ModelError(f"model {name} is a {manifest.task} model, not an embedder")
                session = sessions.open(name, manifest.sha256, emb_bytes)
                # The shipped model reads the stored chip as it is; others say what they need.
                shipped = name in (SHIPPED_EMBEDDER, precision_model(SHIPPED_EMBEDDER, "int8"))
                chip_input = None if shipped else ChipInput.of(manifest.preprocessing)
                embedder = Embedder(session, name, chip_input)
            pipeline = cls(
                load_detector(models_dir, detector, threads, upsample, sessions.open, precision),
                ShapePredictor.from_bytes(sp_bytes),
                embedder,
                flip_tta=flip_tta,
            )
        except BaseException:
            sessions.close()  # engines opened before the failure hold GPU memory
            raise
        pipeline.backend_state = sessions.state
        pipeline.sessions = sessions
        return pipeline

    def gpu_memory(self) -> dict[str, int]:
        """Bytes of GPU memory each model's TensorRT engine holds (empty on the CPU)."""
        return self.sessions.gpu_memory() if self.sessions is not None else {}

    def close(self) -> None:
        """Free the TensorRT engines (the pipeline cannot run afterwards on them)."""
        if self.sessions is not None:
            self.sessions.close()

    def detect(self, image: RGBImage, *, timer: StageTimer | None = None) -> list[Face]:
        """Every face of the image with its landmarks and quality (no embedding)."""
        return self._analyse(image, timer)[0]

    def chips(self, image: RGBImage, faces: list[Face]) -> list[RGBImage]:
        return [face_chip(image, f.landmarks, CHIP_SIZE, CHIP_PADDING) for f in faces]

    def embed(self, image: RGBImage, *, timer: StageTimer | None = None) -> list[Face]:
        """Every face of the image, embedded in one batch."""
        if self.embedder is None:
            raise RuntimeError("pipeline was loaded without an embedder")
        faces, chips, _ = self._analyse(image, timer)
        if not faces:
            return []
        with _stage(timer, "embed"):
            vectors = self.embed_chips(chips)
        return [replace(face, embedding=vec) for face, vec in zip(faces, vectors, strict=True)]

    def embed_chips(self, chips: Sequence[RGBImage]) -> FloatArray:
        """Unit-length templates of aligned chips, one row each (flip-averaged under TTA)."""
        if self.embedder is None:
            raise RuntimeError("pipeline was loaded without an embedder")
        if not self.flip_tta or not chips:
            return self.embedder.embed(list(chips))
        mirrored = [chip[:, ::-1] for chip in chips]
        both = self.embedder.embed([*chips, *mirrored])
        mean = both[: len(chips)] + both[len(chips) :]
        norms = np.linalg.norm(mean, axis=1, keepdims=True)
        averaged: FloatArray = mean / np.maximum(norms, np.float32(_MIN_NORM))
        return averaged

    def detect_working(
        self, work: WorkingImage, *, max_faces: int, timer: StageTimer | None = None
    ) -> tuple[list[Face], list[RGBImage], int]:
        """Faces (at most ``max_faces``, the most confident), their chips, and how many faces
        were found but not analysed. Boxes and landmarks are in full-resolution coordinates."""
        if not work.reduced:
            return self._analyse(work.pixels, timer, max_faces)
        with _stage(timer, "detect"):
            detections = self.detector.detect(work.pixels)
        kept = _most_confident(detections, max_faces)
        faces: list[Face] = []
        chips: list[RGBImage] = []
        with _stage(timer, "landmarks_align"):
            for det in kept:
                face, chip = self._from_full_resolution(work, det)
                faces.append(face)
                chips.append(chip)
        return faces, chips, len(detections) - len(kept)

    def _from_full_resolution(self, work: WorkingImage, det: Detection) -> tuple[Face, RGBImage]:
        """One face found on the reduced photo, re-read from a bounded full-resolution crop."""
        box = _scaled(det.box, 1 / work.scale)
        wide = _scaled(self.detector.landmark_box(det), 1 / work.scale)
        margin_x, margin_y = REGION_MARGIN * wide.width, REGION_MARGIN * wide.height
        region = work.region(
            wide.x0 - margin_x,
            wide.y0 - margin_y,
            wide.x1 + margin_x,
            wide.y1 + margin_y,
            REGION_MAX_SIDE,
        )
        ox, oy = region.origin
        local = Box(
            (wide.x0 - ox) * region.scale,
            (wide.y0 - oy) * region.scale,
            (wide.x1 - ox) * region.scale,
            (wide.y1 - oy) * region.scale,
        )
        points = self.landmarks.predict_many(region.pixels, [local])[0]
        chip = face_chip(region.pixels, points, CHIP_SIZE, CHIP_PADDING)
        full_points = (points / np.float32(region.scale) + np.array([ox, oy], np.float32)).astype(
            np.float32
        )
        quality = assess(full_points, chip, padding=CHIP_PADDING)
        return Face(box=box, score=det.score, landmarks=full_points, quality=quality), chip

    def _analyse(
        self, image: RGBImage, timer: StageTimer | None, max_faces: int | None = None
    ) -> tuple[list[Face], list[RGBImage], int]:
        """Faces with landmarks and quality, their aligned chips (same order), and how many
        faces beyond ``max_faces`` were left out."""
        with _stage(timer, "detect"):
            found = self.detector.detect(image)
        detections = found if max_faces is None else _most_confident(found, max_faces)
        skipped = len(found) - len(detections)
        if not detections:
            return [], [], skipped
        with _stage(timer, "landmarks_align"):
            boxes = [self.detector.landmark_box(det) for det in detections]
            points = list(self.landmarks.predict_many(image, boxes))
            chips = [face_chip(image, p, CHIP_SIZE, CHIP_PADDING) for p in points]
        with _stage(timer, "quality"):
            qualities = [
                assess(p, c, padding=CHIP_PADDING) for p, c in zip(points, chips, strict=True)
            ]
        faces = [
            Face(box=det.box, score=det.score, landmarks=p, quality=q)
            for det, p, q in zip(detections, points, qualities, strict=True)
        ]
        return faces, chips, skipped


def _most_confident(detections: list[Detection], limit: int) -> list[Detection]:
    """At most ``limit`` detections, the most confident, in the detector's order."""
    if len(detections) <= limit:
        return detections
    ranked = sorted(range(len(detections)), key=lambda i: -detections[i].score)[:limit]
    return [detections[i] for i in sorted(ranked)]


def _scaled(box: Box, factor: float) -> Box:
    return Box(box.x0 * factor, box.y0 * factor, box.x1 * factor, box.y1 * factor)
