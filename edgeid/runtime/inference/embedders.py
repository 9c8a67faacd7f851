"""Embedding models on the box: which one is in use, and an operator's own, checked on arrival.

The box embeds with one model at a time, named in ``models/in-use.json`` (absent: the shipped
``dlib_resnet_v1``). An agency may bring its own licensed ONNX embedder (``edgeid models
add``): its file is copied beside the built models with a manifest (sha256, source
"operator-provided", the licence text the operator gives), after the model proved it is what
it is declared to be: one image input of the declared size, one template output, and a dry run
on ONNX Runtime that returns one finite template per chip. A model that does not is refused
(``BadInputError``: one line, exit 2).

Putting a model in use is a change of the service layer (``edgeid.runtime.services.models``):
audited, under the two-person rule, and refused without the model's calibration file
(``<name>.calibration.json`` beside it, written by ``edgeid models calibrate``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeid.runtime.errors import BadInputError, ModelError, first_line
from edgeid.runtime.inference.chip_input import (
    ALIGNMENTS,
    SOURCE_CHIP_SIZE,
    AlignName,
    ChipInput,
    ChipTemplate,
    Layout,
)
from edgeid.runtime.inference.manifest import (
    MODEL_NAME_PATTERN,
    ModelManifest,
    ModelSource,
    TensorSpec,
    manifest_path,
    sha256_bytes,
)

logger = logging.getLogger(__name__)

SHIPPED_EMBEDDER = "dlib_resnet_v1"
IN_USE_FILE = "in-use.json"
CALIBRATION_SUFFIX = ".calibration.json"
OPERATOR_SOURCE = "operator-provided"
# Templates longer than this are not face embeddings (and the gallery store caps them).
MAX_TEMPLATE_DIM = 4096
# A licence text is shown in `models list` and kept in the manifest: one paragraph at most.
MAX_LICENCE_CHARS = 2000
DRY_RUN_CHIPS = 2


def in_use_embedder(models_dir: Path) -> str:
    """The embedding model this box searches with."""
    path = models_dir / IN_USE_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return SHIPPED_EMBEDDER
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"{path} is unreadable ({exc}); put a model in use again with `edgeid models use`"
        ) from exc
    name = raw.get("embedder") if isinstance(raw, dict) else None
    if not isinstance(name, str) or not name:
        raise ModelError(f"{path} names no embedder; put one in use with `edgeid models use`")
    return name


def in_use_document(name: str, since: str) -> bytes:
    """The bytes of ``in-use.json`` naming ``name``."""
    return (json.dumps({"embedder": name, "since": since}, indent=2) + "\n").encode("utf-8")


def calibration_file(models_dir: Path, name: str) -> Path:
    """Where an operator's calibration of model ``name`` lives."""
    return models_dir / f"{name}{CALIBRATION_SUFFIX}"


@dataclass(frozen=True)
class Declared:
    """What the operator says the model is (``edgeid models add`` options)."""

    name: str
    input_size: tuple[int, int]  # (width, height) in pixels
    align: AlignName
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    licence: str
    channel_order: str = "RGB"

    def check(self) -> None:
        import re

        if not re.fullmatch(MODEL_NAME_PATTERN, self.name):
            raise BadInputError(
                f"model name {self.name!r}: use 2-64 lower-case letters, digits and _"
            )
        width, height = self.input_size
        if width != height or not 16 <= width <= 1024:
            raise BadInputError(
                f"input {width}x{height}: a square face chip of 16 to 1024 pixels is needed"
            )
        if self.align not in ALIGNMENTS:
            raise BadInputError(f"--align must be one of {', '.join(ALIGNMENTS)}")
        if not self.licence.strip() or len(self.licence) > MAX_LICENCE_CHARS:
            raise BadInputError(
                f"--licence: give the model's licence terms (1 to {MAX_LICENCE_CHARS} characters)"
            )
        if not all(s != 0 and np.isfinite(s) for s in self.std) or not all(
            np.isfinite(m) for m in self.mean
        ):
            raise BadInputError("--mean and --std must be finite, --std non-zero")


@dataclass(frozen=True)
class Inspected:
    """What the model file turned out to be."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    layout: Layout
    dtype: str
    fixed_batch: int | None
    dim: int


def inspect_model(data: bytes, declared: Declared) -> Inspected:
    """Check the model against its declaration (graph, then a dry run); BadInputError if not."""
    import onnx

    try:
        model = onnx.load_model_from_string(data)
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises its own and protobuf's errors alike
        raise BadInputError(f"not a valid ONNX model ({first_line(exc)})") from exc
    initialisers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initialisers]
    if len(inputs) != 1:
        raise BadInputError(f"the model has {len(inputs)} inputs; an embedder takes one image")
    if len(model.graph.output) < 1:
        raise BadInputError("the model has no output")
    in_shape = _shape(inputs[0])
    in_type = onnx.helper.tensor_dtype_to_np_dtype(inputs[0].type.tensor_type.elem_type)
    size = declared.input_size[0]
    if len(in_shape) != 4:
        raise BadInputError(f"the model's input has shape {in_shape}; an image batch is 4-d")
    if in_shape[1] == 3 and _fits(in_shape[2:], size):
        layout: Layout = "NCHW"
    elif in_shape[3] == 3 and _fits(in_shape[1:3], size):
        layout = "NHWC"
    else:
        raise BadInputError(
            f"the model's input {inputs[0].name} has shape {_shown(in_shape)}, not the declared "
            f"{size}x{size} RGB chips (N,3,{size},{size} or N,{size},{size},3)"
        )
    if in_type not in (np.float32, np.uint8):
        raise BadInputError(f"the model's input is {in_type}; float32 or uint8 is supported")
    out_shape = _shape(model.graph.output[0])
    dim = out_shape[-1] if out_shape else None
    if len(out_shape) != 2 or not isinstance(dim, int) or not 2 <= dim <= MAX_TEMPLATE_DIM:
        raise BadInputError(
            f"the model's output has shape {_shown(out_shape)}; an embedder returns "
            f"(N, D) templates with D from 2 to {MAX_TEMPLATE_DIM}"
        )
    batch = in_shape[0]
    fixed_batch = batch if isinstance(batch, int) else None
    if fixed_batch not in (None, 1):
        raise BadInputError(f"the model's batch size is fixed at {fixed_batch}; 1 or dynamic")
    chip_input = _chip_input(declared, layout, str(np.dtype(in_type)), fixed_batch)
    _dry_run(data, inputs[0].name, chip_input, dim)
    meaning = (
        f"{declared.channel_order} face chips, {declared.align} alignment at {size}x{size}, "
        f"{'(x - mean) / std' if str(np.dtype(in_type)) == 'float32' else 'raw 0-255'}"
    )
    return Inspected(
        inputs=[TensorSpec(name=inputs[0].name, dtype=str(np.dtype(in_type)), shape=in_shape,
                           meaning=meaning)],
        outputs=[TensorSpec(name=model.graph.output[0].name, dtype="float32", shape=out_shape,
                            meaning="face template (normalised to unit length by edgeid)")],
        layout=layout,
        dtype=str(np.dtype(in_type)),
        fixed_batch=fixed_batch,
        dim=dim,
    )  # fmt: skip


def operator_manifest(data: bytes, declared: Declared, source_file: str) -> ModelManifest:
    """The manifest of an operator's model, once ``inspect_model`` accepted it."""
    declared.check()
    found = inspect_model(data, declared)
    sha = sha256_bytes(data)
    size = declared.input_size[0]
    return ModelManifest(
        name=declared.name,
        task="face-embedding",
        format="onnx",
        file=f"{declared.name}.onnx",
        sha256=sha,
        size_bytes=len(data),
        source=ModelSource(
            package=OPERATOR_SOURCE,
            version="operator-provided",
            file=source_file,
            sha256=sha,
            licence=declared.licence.strip(),
        ),
        converter=f"{OPERATOR_SOURCE} (edgeid models add)",
        inputs=found.inputs,
        outputs=found.outputs,
        preprocessing={
            "align": declared.align,
            "chip_size": size,
            "from_chip": f"dlib chip {SOURCE_CHIP_SIZE} px, padding 0.25 (stored with each face)",
            "layout": found.layout,
            "dtype": found.dtype,
            "channel_order": declared.channel_order,
            "mean": list(declared.mean),
            "std": list(declared.std),
            "normalisation": "(x - mean) / std" if found.dtype == "float32" else "none",
            "fixed_batch": found.fixed_batch,
        },
        parameters={"descriptor_dims": found.dim},
    )


def _chip_input(
    declared: Declared, layout: Layout, dtype: str, fixed_batch: int | None
) -> ChipInput:
    return ChipInput.of(
        {
            "align": declared.align,
            "chip_size": declared.input_size[0],
            "layout": layout,
            "dtype": dtype,
            "channel_order": declared.channel_order,
            "mean": list(declared.mean),
            "std": list(declared.std),
            "fixed_batch": fixed_batch,
        }
    )


def _dry_run(data: bytes, input_name: str, chip_input: ChipInput, dim: int) -> None:
    """Run the model on grey chips as the box will feed it: one finite template per chip."""
    from edgeid.runtime.inference.onnx_backend import create_cpu_session

    chips = [np.full((SOURCE_CHIP_SIZE, SOURCE_CHIP_SIZE, 3), v, np.uint8) for v in (90, 170)]
    count = 1 if chip_input.fixed_batch == 1 else DRY_RUN_CHIPS
    try:
        session = create_cpu_session(data, threads=1)
        out = session.run(None, {input_name: chip_input.tensor(chips[:count])})[0]
    except Exception as exc:  # onnxruntime's errors have no common base class
        raise BadInputError(
            f"the model does not run on {chip_input.template.size}x"
            f"{chip_input.template.size} chips as declared ({first_line(exc)})"
        ) from exc
    got = np.asarray(out)
    if got.shape != (count, dim) or not np.isfinite(got).all():
        raise BadInputError(
            f"the dry run returned {got.shape} (finite: {bool(np.isfinite(got).all())}); "
            f"expected ({count}, {dim}) finite templates"
        )


def chip_template(manifest: ModelManifest) -> ChipTemplate:
    return ChipInput.of(manifest.preprocessing).template


def _shape(value_info: Any) -> list[int | str]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def _fits(dims: Sequence[int | str], size: int) -> bool:
    """Spatial dims equal to the declared size (symbolic ones are left to the dry run)."""
    return all(d == size or isinstance(d, str) for d in dims)


def _shown(shape: Sequence[int | str]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def write_model(models_dir: Path, manifest: ModelManifest, data: bytes) -> None:
    """The model file, then its manifest (a manifest never names a file not yet written)."""
    from edgeid.runtime.storage.durable import write_file_atomically

    models_dir.mkdir(parents=True, exist_ok=True)
    write_file_atomically(models_dir / manifest.file, data, action="writing the model")
    text = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    write_file_atomically(
        manifest_path(models_dir, manifest.name), text.encode("utf-8"), action="writing"
    )
