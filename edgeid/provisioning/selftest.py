"""`edgeid provision selftest`: is this box working, end to end?

The known image (``<home>/models/selftest-astronaut.png``, written by ``edgeid models build``)
goes through the whole pipeline (decode, detect, landmarks, align, embed) on the CPU and, where
a GPU answers, on TensorRT; each must find the face the reference records (box IoU, landmark
distance, embedding cosine within the reference's tolerance). Then the keys (device key, the
keyring's KEK and every data key, TLS keys and certificates), the storage and the broker.

Each check is independent: one that fails or raises is reported and the others still run.
Nothing biometric is printed: the embedding is summarised by its cosine to the reference.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeid.models.selftest_image import ReferenceFace, SelftestReference, Tolerance, load_reference
from edgeid.provisioning.broker import check_broker
from edgeid.provisioning.certificates import describe_cert, inspect, service_paths
from edgeid.provisioning.kek import check_data_keys
from edgeid.provisioning.report import CheckResult, Outcome, first_clause
from edgeid.runtime.compat import UTC
from edgeid.runtime.config.settings import Settings, load_settings
from edgeid.runtime.errors import EdgeidError
from edgeid.runtime.evaluation.detection import iou
from edgeid.runtime.identity.device_key import fingerprint, load_device_key
from edgeid.runtime.inference.backends import tensorrt_backend
from edgeid.runtime.inference.backends.selection import BackendChoice
from edgeid.runtime.inference.image_decode import decode_image
from edgeid.runtime.inference.manifest import list_manifests, read_verified_model
from edgeid.runtime.inference.model_home import models_dir
from edgeid.runtime.inference.pipeline import DetectorName, Face, FacePipeline
from edgeid.runtime.inference.types import Box
from edgeid.runtime.storage.durable import shred_and_unlink, write_file_atomically
from edgeid.runtime.telemetry.topics import Topics

logger = logging.getLogger(__name__)

# Room for a TensorRT engine rebuild, a gallery compaction (which briefly doubles a gallery)
# and some days of audit log; below this the box will fail writes soon.
MIN_FREE_BYTES = 1 << 30
STORAGE_PROBE_BYTES = 4096


def _check(name: str, run: Callable[[], tuple[Outcome, str]]) -> CheckResult:
    try:
        outcome, detail = run()
    except EdgeidError as exc:
        return CheckResult(name, Outcome.FAIL, str(exc))
    except Exception as exc:  # one broken check must not hide the others' results
        logger.debug("self-test check %s raised", name, exc_info=True)
        return CheckResult(name, Outcome.FAIL, f"{type(exc).__name__}: {exc}")
    return CheckResult(name, outcome, detail)


# -- the pipeline on the known image ---------------------------------------------------------


def compare_faces(
    faces: list[Face], expected: list[ReferenceFace], tolerance: Tolerance
) -> tuple[Outcome, str]:
    """Found faces against the reference, in the detector's order (the face is unique here)."""
    if len(faces) != len(expected):
        return Outcome.FAIL, f"found {len(faces)} face(s), the reference has {len(expected)}"
    worst_iou, worst_px, worst_cos, identical = 1.0, 0.0, 1.0, True
    for face, ref in zip(faces, expected, strict=True):
        assert face.embedding is not None
        worst_iou = min(worst_iou, iou(face.box, Box(*ref.box)))
        dist = np.linalg.norm(np.asarray(face.landmarks) - np.asarray(ref.landmarks), axis=1)
        worst_px = max(worst_px, float(dist.max()))
        got = face.embedding.astype(np.float64)
        want = np.asarray(ref.embedding, dtype=np.float64)
        worst_cos = min(worst_cos, float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want))))
        vector = face.embedding.astype("<f4").tobytes()
        identical &= hashlib.sha256(vector).hexdigest() == ref.embedding_sha256
    detail = (
        f"{len(faces)} face(s): box IoU {worst_iou:.3f} (>= {tolerance.min_box_iou}), landmarks "
        f"within {worst_px:.2f} px (<= {tolerance.max_landmark_px}), embedding cosine "
        f"{worst_cos:.6f} (>= {tolerance.min_cosine})" + (", bit-identical" if identical else "")
    )
    ok = (
        worst_iou >= tolerance.min_box_iou
        and worst_px <= tolerance.max_landmark_px
        and worst_cos >= tolerance.min_cosine
    )
    return (Outcome.PASS if ok else Outcome.FAIL), detail


def _reference_image(models_dir: Path, reference: SelftestReference) -> bytes:
    path = models_dir / reference.image_file
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EdgeidError(f"cannot read {path} ({exc.strerror}); run edgeid models build") from exc
    if hashlib.sha256(data).hexdigest() != reference.image_sha256:
        raise EdgeidError(f"{path} is not the pinned image; rebuild with edgeid models build")
    return data


def check_pipeline(
    models_dir: Path, detector: DetectorName, backend: BackendChoice, threads: int | None = None
) -> tuple[Outcome, str]:
    if backend == "tensorrt":
        try:
            platform = tensorrt_backend.probe()
        except tensorrt_backend.TensorRTUnavailableError as exc:
            return Outcome.SKIP, f"no GPU answers ({first_clause(exc)})"
        logger.info("self-test on TensorRT %s", platform.trt_version)
    reference = load_reference(models_dir)
    if detector not in reference.detectors:
        return Outcome.FAIL, f"the reference has no results for detector {detector}"
    for name, sha256 in reference.models.items():
        if read_verified_model(models_dir, name)[0].sha256 != sha256:
            return Outcome.FAIL, f"model {name} is not the one the reference was recorded with"
    image = decode_image(_reference_image(models_dir, reference), name=reference.image_file)
    pipeline = FacePipeline.load(models_dir, detector, threads=threads, backend=backend)
    try:
        if backend == "tensorrt" and pipeline.backend_state != "tensorrt":
            state = pipeline.backend_state
            return Outcome.FAIL, f"TensorRT did not run the models (backend {state})"
        outcome, detail = compare_faces(
            pipeline.embed(image), reference.detectors[detector], reference.tolerance
        )
    finally:
        pipeline.close()  # free the GPU engines in this thread, not in a finaliser
    return outcome, f"{detector}: {detail}"


def check_models(models_dir: Path) -> tuple[Outcome, str]:
    manifests = list_manifests(models_dir)
    if not manifests:
        return Outcome.FAIL, f"no models in {models_dir}; run edgeid models build"
    for manifest in manifests:
        read_verified_model(models_dir, manifest.name)
    return Outcome.PASS, f"{len(manifests)} models match their manifests"


# -- keys, storage, broker -------------------------------------------------------------------


def check_device_key(home: Path) -> tuple[Outcome, str]:
    return Outcome.PASS, f"ed25519, fingerprint {fingerprint(load_device_key(home))[:16]}"


def check_gallery_keys(
    home: Path, settings: Settings, passphrase: str | None
) -> tuple[Outcome, str]:
    kind, count = check_data_keys(home, settings.keys, passphrase)
    return Outcome.PASS, f"{kind} key-encryption key opens the keyring; {count} data key(s) unwrap"


def check_tls(
    home: Path, service: str, key: str | None, cert: str | None, now: dt.datetime
) -> tuple[Outcome, str]:
    if not (key and cert):
        return Outcome.SKIP, "no certificate configured in edgeid.toml"
    state = inspect(service_paths(home, service, key, cert), now)
    if state.problem is not None or state.cert is None:
        return Outcome.FAIL, state.problem or f"no certificate at {cert}"
    return Outcome.PASS, f"key matches, {describe_cert(state.cert)}"


def check_storage(home: Path) -> tuple[Outcome, str]:
    """A durable write, read back and erased, in the state directory; and room to grow."""
    probe = home / f".selftest-{os.getpid()}-{os.urandom(4).hex()}"
    data = os.urandom(STORAGE_PROBE_BYTES)
    try:
        write_file_atomically(probe, data, action="the storage self-test write")
        if probe.read_bytes() != data:
            return Outcome.FAIL, f"{home}: a write did not read back the same"
    finally:
        shred_and_unlink(probe)
    free = shutil.disk_usage(home).free
    detail = f"{home} writable (fsync), {free / (1 << 30):.1f} GiB free"
    if free < MIN_FREE_BYTES:
        return Outcome.FAIL, f"{detail}; free at least {MIN_FREE_BYTES >> 30} GiB"
    return Outcome.PASS, detail


def check_telemetry(settings: Settings) -> tuple[Outcome, str]:
    telemetry = settings.telemetry
    if telemetry.sink != "mqtt":
        return Outcome.SKIP, f"telemetry sink is {telemetry.sink!r}, no broker to reach"
    # Not the agent's own client id: the broker would drop a running agent's session for it.
    client_id = f"{Topics.of(settings.device).client_id}-selftest"
    result = check_broker(telemetry, client_id)
    return (Outcome.PASS if result.reachable else Outcome.FAIL), result.detail


# -- all of it -------------------------------------------------------------------------------


def run_selftest(
    home: Path, *, passphrase: str | None = None, now: dt.datetime | None = None
) -> list[CheckResult]:
    when = now or dt.datetime.now(UTC)
    try:
        settings = load_settings(home)
        config = CheckResult("configuration", Outcome.PASS, f"{home / 'edgeid.toml'} is valid")
    except EdgeidError as exc:
        settings = Settings()
        config = CheckResult("configuration", Outcome.FAIL, str(exc))
    models = models_dir(home)
    detector, threads = settings.inference.detector, settings.inference.threads
    web, tel = settings.web, settings.telemetry
    return [
        config,
        _check("models", lambda: check_models(models)),
        _check("pipeline (cpu)", lambda: check_pipeline(models, detector, "cpu", threads)),
        _check(
            "pipeline (tensorrt)",
            lambda: check_pipeline(models, detector, "tensorrt", threads),
        ),
        _check("device key", lambda: check_device_key(home)),
        _check("gallery keys", lambda: check_gallery_keys(home, settings, passphrase)),
        _check("web certificate", lambda: check_tls(home, "web", web.tls_key, web.tls_cert, when)),
        _check(
            "mqtt certificate",
            lambda: check_tls(home, "mqtt", tel.key_file, tel.cert_file, when),
        ),
        _check("storage", lambda: check_storage(home)),
        _check("broker", lambda: check_telemetry(settings)),
    ]
