"""The update state machine: install, resume, commit, rollback, status.

An install verifies the bundle completely (signature, manifest, hardware, version, every
payload hash) before it writes anything, writes the inactive slot, switches to it, restarts
the service there, runs the health check, and commits or rolls back on its own. Each step is
announced in the journal (``state.py``) before it is taken, and each step is idempotent, so
``resume`` can finish whatever a killed process left, from any point:

* killed before the switch: the new slot is discarded, the old one never stopped running;
* killed after it: the health check decides, as it would have (commit or roll back);
* killed while committing or rolling back: that is finished.

One operation at a time: every mutating call holds an exclusive lock on
``<home>/updates/lock``. The lock dies with its process, so a held lock always means a live
update, which the unit's start-up recovery (``resume(at_start=True)``) leaves alone.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from edgeid.runtime.compat import UTC
from edgeid.runtime.config.settings import load_settings
from edgeid.runtime.errors import EdgeidError
from edgeid.runtime.storage.durable import fsync_directory
from edgeid.updater.bundle import VerifiedBundle, verify_bundle
from edgeid.updater.crashpoints import CrashPoints
from edgeid.updater.errors import BundleRejectedError, UpdateError
from edgeid.updater.events import UPDATE_APPLIED, UPDATE_ROLLED_BACK, EventOutbox, EventSink
from edgeid.updater.health import RESTART_TIMEOUT_S, CheckResult, UpdatePolicy, run_command
from edgeid.updater.manifest import Manifest, is_newer
from edgeid.updater.signing import TrustedKey, trusted_keys, verify_signature
from edgeid.updater.slots import CrashPoint, DirectorySlots, SlotBackend
from edgeid.updater.state import Kind, Outcome, Phase, StateJournal, UpdateState

logger = logging.getLogger(__name__)

UPDATES_DIR = "updates"
LOCK_FILE = "lock"
# A trial whose health check was started this many times without an answer (it hangs, or
# takes the box down with it) is rolled back without a further try.
MAX_HEALTH_ATTEMPTS = 3
UPDATES_DIR_MODE = 0o755  # the service user reads the event outbox that root writes


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    state: UpdateState

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.COMMITTED

    def to_dict(self) -> dict[str, Any]:
        return {"outcome": str(self.outcome), **self.state.to_dict()}


class UpdateManager:
    def __init__(
        self,
        home: Path,
        policy: UpdatePolicy,
        *,
        slots: SlotBackend | None = None,
        on_event: EventSink | None = None,
        crash: CrashPoint | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.home = home
        self.policy = policy
        self.updates_dir = home / UPDATES_DIR
        self._crash: CrashPoint = crash or CrashPoints()
        self.slots: SlotBackend = slots or DirectorySlots(home, self._crash)
        self.journal = StateJournal(self.updates_dir)
        self.outbox = EventOutbox(self.updates_dir)
        self._on_event = on_event
        self._now = now or (lambda: datetime.now(UTC))
        self._may_restart = True

    @classmethod
    def for_home(cls, home: Path, *, on_event: EventSink | None = None) -> UpdateManager:
        """The manager for the box at ``home``, with the policy from its edgeid.toml."""
        policy = UpdatePolicy.from_settings(load_settings(home).updates)
        return cls(home, policy, on_event=on_event)

    # Reading.

    def installed_version(self) -> str | None:
        active = self.slots.active()
        record = self.slots.record(active) if active else None
        return record.manifest.version if record else None

    def status(self) -> dict[str, Any]:
        state = self.journal.load()
        active = self.slots.active()
        report: dict[str, Any] = {
            "phase": str(state.phase),
            "pending": state.pending,
            "active": self._slot_info(active) if active else None,
            "inactive": self._slot_info(self.slots.inactive()),
            "good": self.slots.good(),
            "hardware_id": self.policy.hardware_id,
            "last": state.to_dict() if state.at else None,
        }
        if state.pending:
            report["hint"] = "an update was interrupted; run edgeid update resume"
        return report

    def _slot_info(self, slot: str) -> dict[str, Any]:
        record = self.slots.record(slot)
        return {
            "slot": slot,
            "path": str(self.slots.path(slot)),
            "version": record.manifest.version if record else None,
            "signer": record.signer if record else None,
        }

    def verify(self, bundle: Path, keys: list[TrustedKey] | None = None) -> VerifiedBundle:
        return verify_bundle(bundle, keys if keys is not None else trusted_keys(self.home))

    def check_installable(self, manifest: Manifest, allow_downgrade: bool = False) -> None:
        """Refuse a bundle for other hardware, or not newer than what runs (unless allowed)."""
        hardware = self.policy.hardware_id
        if hardware not in manifest.hardware:
            raise BundleRejectedError(
                f"bundle is for {', '.join(manifest.hardware)}, this box is {hardware}; "
                f"get the bundle built for {hardware}"
            )
        installed = self.installed_version()
        downgrade_ok = allow_downgrade or self.policy.allow_downgrade
        if installed and not downgrade_ok and not is_newer(manifest.version, installed):
            raise BundleRejectedError(
                f"bundle version {manifest.version} is not newer than the installed "
                f"{installed}; pass --allow-downgrade to install it anyway"
            )

    # Operations.

    def install(self, bundle_path: Path, *, allow_downgrade: bool = False) -> Result:
        with self._locked():
            self._refuse_if_pending()
            bundle = self.verify(bundle_path)  # nothing below runs for a refused bundle
            self.check_installable(bundle.manifest, allow_downgrade)
            from_slot, to_slot = self.slots.active(), self.slots.inactive()
            state = self._enter(
                UpdateState(
                    phase=Phase.WRITING,
                    kind=Kind.INSTALL,
                    update_id=uuid.uuid4().hex[:16],
                    from_slot=from_slot,
                    to_slot=to_slot,
                    from_version=self.installed_version(),
                    to_version=bundle.manifest.version,
                )
            )
            try:
                self.slots.write(to_slot, bundle)
            except EdgeidError as exc:
                self._abort(state, f"writing slot {to_slot} failed: {exc}")
                raise
            state = self._enter(dataclasses.replace(state, phase=Phase.SWITCHING))
            self.slots.activate(to_slot)
            state = self._enter(dataclasses.replace(state, phase=Phase.TRIAL))
            return self._trial(state)

    def resume(self, *, at_start: bool = False) -> Result | None:
        """Finish an interrupted operation; None when there was nothing to finish.

        ``at_start``: called as the service starts (the unit's ExecStartPre), so the service is
        not restarted from here, and an update a live process is driving is left to it.
        """
        if not self.journal.load().pending:
            return None  # the common case, and read-only: fine inside the service's sandbox
        with ExitStack() as stack:
            try:
                stack.enter_context(self._locked())
            except UpdateError:
                if at_start:
                    logger.info("an update is in progress in another process; leaving it to it")
                    return None
                raise
            self._may_restart = not at_start
            try:
                return self._resume(self.journal.load())
            finally:
                self._may_restart = True

    def _resume(self, state: UpdateState) -> Result | None:
        if not state.pending:
            return None  # finished by another process between our first look and the lock
        logger.warning("resuming an update interrupted in phase %s", state.phase)
        if state.phase is Phase.WRITING:
            return self._abort(state, f"interrupted while writing slot {state.to_slot}")
        if state.phase is Phase.SWITCHING:
            if self.slots.active() != state.to_slot:
                return self._abort(state, "interrupted before the switch")
            state = self._enter(dataclasses.replace(state, phase=Phase.TRIAL))
        if state.phase is Phase.TRIAL:
            return self._trial(state)
        if state.phase is Phase.COMMITTING:
            return self._commit(state, state.reason or "health check passed")
        if state.phase is Phase.ROLLING_BACK:
            return self._roll_back(state, state.reason or "interrupted while rolling back")
        return None

    def commit(self) -> Result | None:
        """Commit the slot on trial without waiting for the health check; None: none on trial."""
        with self._locked():
            state = self.journal.load()
            if state.phase is Phase.TRIAL:
                return self._commit(state, "committed by the operator")
            self._refuse_if_pending()
            return None

    def rollback(self) -> Result:
        """Leave the slot on trial, or with none on trial go back to the other slot's version."""
        with self._locked():
            state = self.journal.load()
            if state.phase is Phase.TRIAL:
                return self._roll_back(state, "rolled back by the operator")
            self._refuse_if_pending()
            target = self.slots.inactive()
            record = self.slots.record(target)
            if record is None:
                raise UpdateError(f"slot {target} holds no complete version to roll back to")
            problems = self.slots.check(target)
            if problems:
                raise UpdateError(
                    f"slot {target} no longer matches its manifest ({problems[0]}); "
                    "install a bundle instead"
                )
            # The old version must still be signed by a key this box trusts (keys get revoked).
            try:
                verify_signature(record.manifest_bytes, record.signature, trusted_keys(self.home))
            except BundleRejectedError:
                raise UpdateError(
                    f"slot {target} holds a version no trusted key signed; install a bundle instead"
                ) from None
            state = self._enter(
                UpdateState(
                    phase=Phase.SWITCHING,
                    kind=Kind.ROLLBACK,
                    update_id=uuid.uuid4().hex[:16],
                    from_slot=self.slots.active(),
                    to_slot=target,
                    from_version=self.installed_version(),
                    to_version=record.manifest.version,
                )
            )
            self.slots.activate(target)
            state = self._enter(dataclasses.replace(state, phase=Phase.TRIAL))
            return self._trial(state)

    # Steps.

    def _trial(self, state: UpdateState) -> Result:
        assert state.to_slot is not None
        slot_dir = self.slots.path(state.to_slot)
        if not state.restarted:
            restart = self._restart(slot_dir)
            state = self._enter(dataclasses.replace(state, restarted=True))
            if not restart.ok:
                return self._roll_back(state, f"the service did not restart: {restart.detail}")
        if state.attempts >= MAX_HEALTH_ATTEMPTS:
            return self._roll_back(
                state, f"the health check was interrupted {state.attempts} times"
            )
        state = self._enter(dataclasses.replace(state, attempts=state.attempts + 1))
        health = self._health(slot_dir)
        self._crash("health checked")
        if health.ok:
            return self._commit(state, "health check passed")
        return self._roll_back(state, f"health check failed: {health.detail}")

    def _commit(self, state: UpdateState, reason: str) -> Result:
        to_slot = state.to_slot
        assert to_slot is not None
        state = self._enter(dataclasses.replace(state, phase=Phase.COMMITTING, reason=reason))
        self.slots.mark_good(to_slot)
        name = UPDATE_APPLIED if state.kind is Kind.INSTALL else UPDATE_ROLLED_BACK
        self._event(name, state, state.to_version)
        return self._finish(state, Outcome.COMMITTED, reason)

    def _roll_back(self, state: UpdateState, reason: str) -> Result:
        state = self._enter(dataclasses.replace(state, phase=Phase.ROLLING_BACK, reason=reason))
        self.slots.activate(state.from_slot)
        if state.to_slot is not None:
            # A version that failed its trial is no rollback target; reinstall it to retry.
            self.slots.discard(state.to_slot)
        if state.from_slot is not None:
            restart = self._restart(self.slots.path(state.from_slot))
            if not restart.ok:
                logger.error("restart after rolling back failed: %s", restart.detail)
        self._event(UPDATE_ROLLED_BACK, state, state.from_version)
        return self._finish(state, Outcome.ROLLED_BACK, reason)

    def _abort(self, state: UpdateState, reason: str) -> Result:
        """Before the switch: the new slot is dropped, the old one never stopped."""
        if state.to_slot is not None and state.to_slot != self.slots.active():
            self.slots.discard(state.to_slot)
        return self._finish(state, Outcome.ABORTED, reason)

    def _finish(self, state: UpdateState, outcome: Outcome, reason: str) -> Result:
        final = self._enter(
            dataclasses.replace(state, phase=Phase.IDLE, outcome=outcome, reason=reason)
        )
        # Info, not warning: the caller reports the outcome (the CLI's one line, the events).
        logger.info("update %s: %s (%s)", final.update_id, outcome, reason)
        return Result(outcome, final)

    def _enter(self, state: UpdateState) -> UpdateState:
        """Journal ``state`` durably; only then is the step it announces taken."""
        state = dataclasses.replace(state, at=self._now().strftime("%Y-%m-%dT%H:%M:%SZ"))
        self._ensure_updates_dir()
        self.journal.append(state)
        self._crash(f"journal: {state.phase}")
        return state

    def _event(self, name: str, state: UpdateState, running_version: str | None) -> None:
        fields = {
            "update_id": state.update_id or "",
            "kind": str(state.kind),
            "from_version": state.from_version or "",
            "to_version": state.to_version or "",
            "version": running_version or "",
            "reason": state.reason or "",
        }
        self.outbox.record(name, fields)
        self._crash("event recorded")
        if self._on_event is not None:
            try:
                self._on_event(name, dict(fields))
            except Exception:  # the outbox has it; a failing sink must not undo the update
                logger.exception("update event sink failed for %s", name)

    def _restart(self, slot_dir: Path) -> CheckResult:
        argv = self.policy.restart_argv(slot_dir, self.home)
        if not self._may_restart or not argv:
            return CheckResult(True, "no restart")
        result = run_command(argv, RESTART_TIMEOUT_S, self.home, slot_dir)
        self._crash("restarted")
        return result

    def _health(self, slot_dir: Path) -> CheckResult:
        argv = self.policy.health_argv(slot_dir, self.home)
        if argv is None:
            return CheckResult(
                False,
                f"no health check: {slot_dir}/bin/edgeid not found; set health_command "
                "in [updates] of edgeid.toml",
            )
        return run_command(argv, self.policy.health_timeout_s, self.home, slot_dir)

    def _refuse_if_pending(self) -> None:
        state = self.journal.load()
        if state.pending:
            raise UpdateError(
                f"an interrupted update is in phase {state.phase}; run edgeid update resume first"
            )

    def _ensure_updates_dir(self) -> None:
        if not self.updates_dir.is_dir():
            self.updates_dir.mkdir(mode=UPDATES_DIR_MODE, parents=True, exist_ok=True)
            self.updates_dir.chmod(UPDATES_DIR_MODE)
            fsync_directory(self.updates_dir.parent)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self._ensure_updates_dir()
        fd = os.open(self.updates_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UpdateError(
                "another edgeid update operation is running on this box; wait for it to finish"
            ) from None
        try:
            yield
        finally:
            os.close(fd)  # releases the lock


def resume(
    home: Path, *, at_start: bool = True, on_event: EventSink | None = None
) -> Result | None:
    """Finish an interrupted update at ``home``; the one call for a service's start-up."""
    return UpdateManager.for_home(home, on_event=on_event).resume(at_start=at_start)
