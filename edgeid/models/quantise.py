"""INT8 twins of the MTCNN nets and the shipped embedder: static quantisation with ONNX Runtime.

QDQ format, per-channel signed weights, unsigned activations, MinMax calibration. The
calibration inputs are what the FP32 models see on fixed, ordered sets of real photos:

- P/R/O-Net: the pyramid levels and crops the FP32 cascade hands them on the first
  ``CALIBRATION_IMAGES`` LFW dev images by path;
- the embedder: the aligned chip of every face the FP32 pipeline finds in the scene photos
  (``scenes/``, by path), none of which the LFW evaluation scores. Before quantising, each
  convolution's affine (the Mul/Add of dlib's batch norm) is folded into its weights, and the
  two layers a per-layer sensitivity pass found the most sensitive (``EMBEDDER_KEPT_FP32``)
  stay FP32 (README "INT8 on the CPU").

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

# LFW dev images (sorted by path) whose pyramid levels and crops calibrate the MTCNN ranges.
CALIBRATION_IMAGES = 100
LFW_IMAGES = Path("lfw-dev") / "images"
# Photos whose faces calibrate the embedder: not LFW, so its evaluation scores none of them.
SCENE_IMAGES = Path("scenes")
# The 16 scene photos hold 90 faces the FP32 pipeline finds.
MIN_SCENE_CHIPS = 60
EMBEDDER = "dlib_resnet_v1"
# Quantising one layer at a time, each alone, on the calibration chips, the mean cosine loss of
# the template was 1.7e-4 for the first convolution, 1.1e-4 for the final FC, 7.9e-5 for the next
# two layers and at most 2.3e-5 for every other. Keeping the first two FP32 gave the better LFW
# figures (README); the next two as well gained nothing.
EMBEDDER_KEPT_FP32 = ("l000_con", "l129_fc")
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


def scene_images(data_dir: Path) -> list[Path]:
    """The fixed, ordered photos whose faces calibrate the embedder."""
    folder = data_dir / SCENE_IMAGES
    found = sorted(folder.rglob("*.jpg")) if folder.is_dir() else []
    if not found:
        raise ModelError(
            f"INT8 calibration of the embedder needs the scene photos under {folder}; "
            "pass --data with the shared data folder"
        )
    return found


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
    """Per model, the input feeds to calibrate on, in order, and the photos they came from
    (model name to the photos' sha256 and count)."""

    feeds: dict[str, list[dict[str, npt.NDArray[Any]]]] = field(default_factory=dict)
    photos: dict[str, tuple[str, int]] = field(default_factory=dict)


def _batched(feeds: list[dict[str, npt.NDArray[Any]]]) -> list[dict[str, npt.NDArray[Any]]]:
    """R/O-Net feeds regrouped into batches of ``_CROP_BATCH`` crops (fewer, fuller runs)."""
    if not feeds:
        return []
    name = next(iter(feeds[0]))
    rows = np.concatenate([f[name] for f in feeds])
    return [{name: rows[i : i + _CROP_BATCH]} for i in range(0, len(rows), _CROP_BATCH)]


def collect_calibration(
    models_dir: Path, data_dir: Path, names: Sequence[str] = QUANTISED_MODELS
) -> CalibrationSet:
    """Run the FP32 pipeline over the calibration photos and keep what each of ``names`` is fed
    (MTCNN nets: LFW dev photos; the embedder: every face chip of the scene photos)."""
    from edgeid.runtime.inference.image_decode import load_image
    from edgeid.runtime.inference.manifest import read_verified_model
    from edgeid.runtime.inference.mtcnn_detector import MODEL_NAMES
    from edgeid.runtime.inference.onnx_backend import create_cpu_session
    from edgeid.runtime.inference.pipeline import FacePipeline, load_detector

    result = CalibrationSet()
    nets = [n for n in MODEL_NAMES if n in names]
    if nets:
        paths = calibration_images(data_dir)
        recorders: dict[str, _Recording] = {}

        def opener(name: str, sha256: str, data: bytes) -> Any:
            del sha256  # verified by read_verified_model already
            recorders[name] = _Recording(create_cpu_session(data, _THREADS))
            return recorders[name]

        # Whole levels and big crop runs, as recorded when the INT8 twins were pinned: the
        # recorder wraps CPU sessions, which would otherwise get tiles and small batches.
        detector = load_detector(models_dir, "mtcnn", _THREADS, open_model=opener, runs="whole")
        for path in paths:
            detector.detect(load_image(path))
        digest = calibration_digest(paths)  # the same photos for every net: hashed once
        for name in nets:
            feeds = recorders[name].feeds
            result.feeds[name] = feeds if name == "mtcnn_pnet" else _batched(feeds)
            result.photos[name] = (digest, len(paths))
    if EMBEDDER in names:
        scenes = scene_images(data_dir)
        pipeline = FacePipeline.load(
            models_dir, "mtcnn", threads=_THREADS, backend="cpu", with_embedder=False
        )
        chips = []
        for path in scenes:
            image = load_image(path)
            chips.extend(pipeline.chips(image, pipeline.detect(image)))
        if len(chips) < MIN_SCENE_CHIPS:
            raise ModelError(
                f"INT8 calibration of the embedder found {len(chips)} faces in the scene photos "
                f"under {data_dir / SCENE_IMAGES}, needs {MIN_SCENE_CHIPS}"
            )
        manifest, _ = read_verified_model(models_dir, EMBEDDER)
        chip_input = manifest.inputs[0].name
        result.feeds[EMBEDDER] = [{chip_input: chip[np.newaxis]} for chip in chips]
        result.photos[EMBEDDER] = (calibration_digest(scenes), len(scenes))
    return result


def fold_affine(fp32: bytes) -> bytes:
    """``fp32`` with each Conv -> Mul(per-channel constant) -> Add(per-channel constant) chain
    folded into the convolution's weights and bias (dlib's batch norm as exported): one tensor
    quantised where there were three, and fewer QDQ steps to run."""
    from onnx import numpy_helper

    model = onnx.load_from_string(fp32)
    graph = model.graph
    constants = {i.name: i for i in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def only_reader(output: str, op_type: str) -> onnx.NodeProto | None:
        found = readers.get(output, [])
        if len(found) == 1 and found[0].op_type == op_type and found[0].input[1] in constants:
            return found[0]
        return None

    folded: set[str] = set()
    for conv in [n for n in graph.node if n.op_type == "Conv" and len(n.input) == 3]:
        mul = only_reader(conv.output[0], "Mul")
        add = only_reader(mul.output[0], "Add") if mul is not None else None
        if mul is None or add is None:
            continue
        gamma = numpy_helper.to_array(constants[mul.input[1]])
        beta = numpy_helper.to_array(constants[add.input[1]])
        weight = numpy_helper.to_array(constants[conv.input[1]])
        bias = numpy_helper.to_array(constants[conv.input[2]])
        channels = weight.shape[0]
        if gamma.size != channels or beta.size != channels:
            continue
        gamma, beta = gamma.reshape(channels), beta.reshape(channels)
        new_weight = (weight * gamma[:, None, None, None]).astype(np.float32)
        new_bias = (bias * gamma + beta).astype(np.float32)
        constants[conv.input[1]].CopyFrom(numpy_helper.from_array(new_weight, conv.input[1]))
        constants[conv.input[2]].CopyFrom(numpy_helper.from_array(new_bias, conv.input[2]))
        conv.output[0] = add.output[0]
        folded |= {mul.name, add.name}
    kept = [n for n in graph.node if n.name not in folded]
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input}
    initializers = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return bytes(model.SerializeToString())


class _Reader:
    """onnxruntime's CalibrationDataReader over a fixed list of feeds."""

    def __init__(self, feeds: list[dict[str, npt.NDArray[Any]]]) -> None:
        self._all = feeds
        self._feeds: Iterator[dict[str, npt.NDArray[Any]]] = iter(feeds)

    def get_next(self) -> dict[str, npt.NDArray[Any]] | None:
        return next(self._feeds, None)

    def rewind(self) -> None:
        self._feeds = iter(self._all)


def quantise_model(
    fp32: bytes,
    feeds: list[dict[str, npt.NDArray[Any]]],
    dest: Path,
    *,
    kept_fp32: Sequence[str] = (),
    method: str = "MinMax",
    op_types: Sequence[str] | None = None,
) -> None:
    """Write the QDQ INT8 model of ``fp32`` calibrated on ``feeds`` to ``dest`` (the nodes
    named in ``kept_fp32`` are left unquantised). ``method`` (a ``CalibrationMethod`` name)
    and ``op_types`` (the op types to quantise, default all) are for the recipe sweep
    (benchmarks/int8_embedder_sweep.py); the build uses MinMax and every op type."""
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
            calibrate_method=getattr(CalibrationMethod, method),
            nodes_to_exclude=list(kept_fp32),
            op_types_to_quantize=list(op_types) if op_types else None,
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

    calibration = collect_calibration(models_dir, data_dir, names)
    converted = []
    for name in names:
        fp32_manifest = load_manifest(manifest_path(models_dir, name))
        _, data = read_verified_model(models_dir, name)
        twin = name + INT8_SUFFIX
        filename = f"{twin}.onnx"
        method = "static QDQ, per-channel s8 weights, u8 activations, MinMax"
        kept: Sequence[str] = ()
        if name == EMBEDDER:
            data, kept = fold_affine(data), EMBEDDER_KEPT_FP32
            method += "; affine folded into the convolutions; FP32: " + ", ".join(kept)
        quantise_model(data, calibration.feeds[name], staging / filename, kept_fp32=kept)
        digest, photos = calibration.photos[name]
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
                    "quantisation": method,
                    "calibration_images": photos,
                    "calibration_feeds": len(calibration.feeds[name]),
                    "calibration_sha256": digest,
                },
            )
        )
    return converted, calibration


def _spec(spec: TensorSpec) -> Any:
    from edgeid.models.conversion import TensorSpec as ConversionSpec

    return ConversionSpec(**spec.model_dump())
