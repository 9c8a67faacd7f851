"""Key rotation as an accountable change: every door that replaces the device's
key-encryption key (``edgeid gallery rotate-key``, ``edgeid provision rotate-keys``) goes
through ``rotate_kek``, which records the rotation before it happens (it destroys the old key,
so it cannot be undone if a record written afterwards failed) and records a failure."""

from __future__ import annotations

from edgeid.runtime.audit.events import AuditAction
from edgeid.runtime.audit.recorder import Recorder
from edgeid.runtime.gallery.store import GalleryStore
from edgeid.runtime.services.caller import Caller
from edgeid.runtime.vault.keys import KekProvider


def rotate_kek(
    store: GalleryStore, recorder: Recorder, caller: Caller, new_provider: KekProvider
) -> str:
    """Re-wrap every data key under ``new_provider``'s new KEK; returns the new KEK's id."""
    old = store.keyring.kek_id
    recorder.record(
        caller.actor,
        AuditAction.KEYS_ROTATED,
        detail=f"key-encryption key {old} replaced by a new {new_provider.kind} key",
    )
    with recorder.failure_recorded(caller.actor, AuditAction.KEYS_ROTATED):
        store.rotate_kek(new_provider)
    return store.keyring.kek_id
