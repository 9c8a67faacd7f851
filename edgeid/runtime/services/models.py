"""Which embedding model the box searches with: changed only here, recorded, two people.

Putting another embedder in use changes every later search's candidates and thresholds, so it
is a covered change of the two-person rule (``approvals.py``, ``ChangeKind.USE_MODEL``) and
recorded as ``model_changed`` with the model's and its calibration's sha256. A model is refused
before anything is proposed when its file does not match its manifest, it is not an embedder,
or it has no calibration (``edgeid models calibrate``): a model without measured thresholds
cannot say what its scores mean. The galleries' templates are re-embedded afterwards (each
re-embedding recorded as ``gallery_re_embedded``); until then a gallery refuses searches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from edgeid.runtime.accounts.roles import Permission
from edgeid.runtime.audit.events import AuditAction
from edgeid.runtime.audit.recorder import Recorder
from edgeid.runtime.errors import BadInputError, ModelError
from edgeid.runtime.gallery.thresholds import (
    CalibrationError,
    calibration_path,
    model_calibration,
    operator_calibration_path,
)
from edgeid.runtime.inference.embedders import IN_USE_FILE, in_use_document, in_use_embedder
from edgeid.runtime.inference.manifest import read_verified_model
from edgeid.runtime.services.caller import Caller
from edgeid.runtime.services.consent import ChangeKind, Consent, redeem
from edgeid.runtime.storage.durable import write_file_atomically
from edgeid.runtime.vault.crypto import utc_now


@dataclass(frozen=True)
class UsableModel:
    """An embedder that may be put in use: verified file, calibration present."""

    name: str
    sha256: str
    calibration_sha256: str
    bands: tuple[str, ...]


class ModelAdmin:
    def __init__(self, models_dir: Path, recorder: Recorder) -> None:
        self.models_dir = models_dir
        self.recorder = recorder

    def in_use(self) -> str:
        return in_use_embedder(self.models_dir)

    def require(self, caller: Caller, *, where: str, name: str) -> None:
        """Only those who hold the box's settings change its model."""
        if caller.may(Permission.SETTINGS):
            return
        raise self.recorder.refused(
            caller.actor,
            "only admins change the box's embedding model",
            where=where,
            resource=f"model {name}",
            why="needs settings",
        )

    def check_usable(self, name: str) -> UsableModel:
        """The model, if it may be put in use; BadInputError naming the fix if not."""
        try:
            manifest, _ = read_verified_model(self.models_dir, name)
        except ModelError as exc:
            raise BadInputError(f"model {name} cannot be used: {exc}") from exc
        if manifest.task != "face-embedding":
            raise BadInputError(f"model {name} is a {manifest.task} model, not an embedder")
        try:
            calibration = model_calibration(self.models_dir, name)
        except CalibrationError as exc:
            raise BadInputError(f"model {name} cannot be put in use: {exc}") from None
        shipped = calibration_path(name)
        source = shipped if shipped.exists() else operator_calibration_path(self.models_dir, name)
        return UsableModel(
            name,
            manifest.sha256,
            hashlib.sha256(source.read_bytes()).hexdigest(),
            calibration.bands,
        )

    def use(
        self, caller: Caller, name: str, *, reason: str, where: str, consent: Consent | None
    ) -> UsableModel:
        """Put ``name`` in use: recorded first, then ``in-use.json`` replaced at once."""
        self.require(caller, where=where, name=name)
        redeem(consent, ChangeKind.USE_MODEL, name, what=f"putting model {name} in use")
        assert consent is not None  # redeem raised otherwise
        usable = self.check_usable(name)
        before = self.in_use()
        self.recorder.record(
            caller.actor,
            AuditAction.MODEL_CHANGED,
            reason=reason,
            detail=f"embedder {before} -> {name} (model sha256 {usable.sha256[:12]}, "
            f"calibration sha256 {usable.calibration_sha256[:12]}, bands "
            f"{', '.join(usable.bands)}); {consent.detail()}",
        )
        with self.recorder.failure_recorded(caller.actor, AuditAction.MODEL_CHANGED):
            write_file_atomically(
                self.models_dir / IN_USE_FILE,
                in_use_document(name, utc_now().isoformat()),
                action="putting the model in use",
            )
        return usable
