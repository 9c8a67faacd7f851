"""INT8 twins of the MTCNN nets and the shipped embedder: static quantisation with ONNX Runtime.

QDQ format, per-channel signed weights, unsigned activations, MinMax calibration. The
calibration inputs are what the FP32 models see on a fixed, ordered set of real photos
(``CALIBRATION_IMAGES`` LFW dev images, the first by path): the pyramid levels and crops the FP32
cascade hands P/R/O-Net, and the aligned chip of each image's central face for the embedder.
Same photos, same FP32 models, same onnxruntime: same bytes (pinned in ``checksums.json``).
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from edgeid.models.conversion import ConvertedModel
from edgeid.runtime.errors import ModelError
from edgeid.runtime.inference.manifest import TensorSpec, load_manifest, manifest_path
from edgeid.runtime.inference.precision import INT8_SUFFIX, QUANTISED_MODELS

# LFW dev images (sorted by path) whose pyramid levels, crops and chips calibrate the ranges.
CALIBRATION_IMAGES = 100
LFW_IMAGES = Path("lfw-dev") / "images"
# Single-threaded calibration runs: the ranges (hence the bytes) never depend on the core count.
_THREADS = 1
# One net per pass: R/O-Net crops are fed in batches of at most this many.
_CROP_BATCH = 32
# The ranges come from ONNX Runtime's FP32 kernels, which it picks by the CPU's vector
# instructions: another instruction set may round a last bit differently and so give other
# INT8 bytes. The pins in checksums.json were recorded on a CPU with these.
PINNED_ON = "avx2 avx512_bf16 avx512_vnni avx512bw avx512f avx512vl f16c fma"
_KERNEL_FLAGS = frozenset(
    [
        "avx2",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "avx_vnni",
        "amx_tile",
        "amx_int8",
        "amx_bf16",
        "fma",
        "f16c",
    ]
)


def cpu_kernels(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The vector instructions of this CPU that ONNX Runtime chooses kernels by."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith("flags"):
            return " ".join(sorted(_KERNEL_FLAGS & set(line.split(":", 1)[1].split())))
    return ""


def pins_apply() -> bool:
    """Whether this CPU is one the INT8 pins were recorded on (else a build is checked for
    reproducibility only: the same bytes twice on this machine)."""
    return cpu_kernels() == PINNED_ON


def calibration_images(data_dir: Path, count: int = CALIBRATION_IMAGES) -> list[Path]:
    """The fixed, ordered calibration photos under ``data_dir`` (../shared/data)."""
    folder = data_dir / LFW_IMAGES
    found = sorted(folder.rglob("*.jpg")) if folder.is_dir() else []
    if len(found) < count:
        raise ModelError(
            f"INT8 calibration needs {count} LFW dev images under {folder}, found {len(found)}; "
            "pass --data with the shared data folder"
        )
    return found[:count]


def calibration_digest(paths: Sequence[Path]) -> str:
    """sha256 over the calibration photos' names and bytes, in order (recorded per model)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


class _Recording:
    """A session that keeps a copy of every input it is run on (the FP32 cascade's feeds)."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.feeds: list[dict[str, npt.NDArray[Any]]] = []

    def get_inputs(self) -> Any:
        return self._session.get_inputs()

    def get_outputs(self) -> Any:
        return self._session.get_outputs()

    def run(self, output_names: Any, feed: dict[str, npt.NDArray[Any]]) -> Any:
        self.feeds.append({k: np.array(v, copy=True) for k, v in feed.items()})
        return self._session.run(output_names, feed)


@dataclass
class CalibrationSet:
    """Per model, the input feeds to calibrate on, in order."""

    digest: str
    images: int
    feeds: dict[str, list[dict[str, npt.NDArray[Any]]]] = field(default_factory=dict)


def _batched(feeds: list[dict[str, npt.NDArray[Any]]]) -> list[dict[str, npt.NDArray[Any]]]:
    """R/O-Net feeds regrouped into batches of ``_CROP_BATCH`` crops (fewer, fuller runs)."""
    if not feeds:
        return []
    name = next(iter(feeds[0]))
    rows = np.concatenate([f[name] for f in feeds])
    return [{name: rows[i : i + _CROP_BATCH]} for i in range(0, len(rows), _CROP_BATCH)]


def collect_calibration(models_dir: Path, data_dir: Path, *, chips: bool = True) -> CalibrationSet:
    """Run the FP32 pipeline over the calibration photos and keep what each model is fed
    (``chips``: also cut the central face's chip for the embedder)."""
    from edgeid.runtime.evaluation.lfw import central_index
    from edgeid.runtime.inference.image_decode import load_image
    from edgeid.runtime.inference.manifest import read_verified_model
    from edgeid.runtime.inference.mtcnn_detector import MODEL_NAMES
    from edgeid.runtime.inference.onnx_backend import create_cpu_session
    from edgeid.runtime.inference.pipeline import FacePipeline

    paths = calibration_images(data_dir)
    recorders: dict[str, _Recording] = {}

    def opener(name: str, sha256: str, data: bytes) -> Any:
        del sha256  # verified by read_verified_model already
        recorders[name] = _Recording(create_cpu_session(data, _THREADS))
        return recorders[name]

    pipeline = FacePipeline.load(models_dir, "mtcnn", threads=_THREADS, with_embedder=False)
    from edgeid.runtime.inference.pipeline import load_detector

    pipeline.detector = load_detector(models_dir, "mtcnn", _THREADS, open_model=opener)
    aligned = []
    for path in paths:
        image = load_image(path)
        if not chips:
            pipeline.detector.detect(image)
            continue
        faces = pipeline.detect(image)
        if not faces:
            continue
        boxes = [(f.box.x0, f.box.y0, f.box.x1, f.box.y1) for f in faces]
        face = faces[central_index(boxes, image.shape[1], image.shape[0])]
        aligned.append(pipeline.chips(image, [face])[0])
    manifest, _ = read_verified_model(models_dir, "dlib_resnet_v1")
    chip_input = manifest.inputs[0].name
    result = CalibrationSet(calibration_digest(paths), len(paths))
    for name in MODEL_NAMES:
        feeds = recorders[name].feeds
        result.feeds[name] = feeds if name == "mtcnn_pnet" else _batched(feeds)
    result.feeds["dlib_resnet_v1"] = [{chip_input: chip[np.newaxis]} for chip in aligned]
    return result


class _Reader:
    """onnxruntime's CalibrationDataReader over a fixed list of feeds."""

    def __init__(self, feeds: list[dict[str, npt.NDArray[Any]]]) -> None:
        self._feeds: Iterator[dict[str, npt.NDArray[Any]]] = iter(feeds)

    def get_next(self) -> dict[str, npt.NDArray[Any]] | None:
        return next(self._feeds, None)

    def rewind(self) -> None:  # pragma: no cover - MinMax reads once
        raise NotImplementedError


def quantise_model(fp32: bytes, feeds: list[dict[str, npt.NDArray[Any]]], dest: Path) -> None:
    """Write the QDQ INT8 model of ``fp32`` calibrated on ``feeds`` to ``dest``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(_Reader, CalibrationDataReader):  # type: ignore[misc]  # untyped base
        pass

    with tempfile.TemporaryDirectory(prefix="edgeid-quant-") as work:
        source = Path(work) / "fp32.onnx"
        source.write_bytes(fp32)
        quantize_static(
            source,
            dest,
            Reader(feeds),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            # Symmetric weights let the CPU use its s8 kernels; the graph optimiser folds
            # nothing here, so the bytes depend on the FP32 model and the ranges only.
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
    # Normalise what quantize_static stamps on the model so the bytes depend on content only.
    model = onnx.load(str(dest))
    model.producer_name = "edgeid-models"
    model.producer_version = ""
    onnx.save(model, str(dest))


def quantise_all(
    models_dir: Path, data_dir: Path, staging: Path, names: Sequence[str] = QUANTISED_MODELS
) -> tuple[list[ConvertedModel], CalibrationSet]:
    """INT8 twins of ``names`` written into ``staging``, with what the manifests need."""
    from edgeid.runtime.inference.manifest import read_verified_model

    calibration = collect_calibration(models_dir, data_dir, chips="dlib_resnet_v1" in names)
    converted = []
    for name in names:
        fp32_manifest = load_manifest(manifest_path(models_dir, name))
        _, data = read_verified_model(models_dir, name)
        twin = name + INT8_SUFFIX
        filename = f"{twin}.onnx"
        quantise_model(data, calibration.feeds[name], staging / filename)
        converted.append(
            ConvertedModel(
                name=twin,
                task=fp32_manifest.task,
                filename=filename,
                format="onnx",
                inputs=[_spec(s) for s in fp32_manifest.inputs],
                outputs=[_spec(s) for s in fp32_manifest.outputs],
                preprocessing=dict(fp32_manifest.preprocessing),
                parameters=dict(fp32_manifest.parameters)
                | {
                    "precision": "int8",
                    "quantised_from": name,
                    "quantised_from_sha256": fp32_manifest.sha256,
                    "quantisation": "static QDQ, per-channel s8 weights, u8 activations, MinMax",
                    "calibration_images": calibration.images,
                    "calibration_feeds": len(calibration.feeds[name]),
                    "calibration_sha256": calibration.digest,
                },
            )
        )
    return converted, calibration


def _spec(spec: TensorSpec) -> Any:
    from edgeid.models.conversion import TensorSpec as ConversionSpec

    return ConversionSpec(**spec.model_dump())
