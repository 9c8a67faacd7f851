"""The tamper-evident audit log: who searched what, when, for which case and why.

Public API (for the web service and the CLI)::

    log = AuditLog.open(home, store.keyring)          # verifies, then holds the writer lock
    record = log.append(AuditEvent(user=..., role=..., action=AuditAction.SEARCH, case=...,
                                   reason=..., probe_sha256=..., candidates=[Candidate(...)]))
    log.query(user=, case=, action=, since=, until=, limit=, before_seq=)  # newest first
    log.close()                                        # signs a final checkpoint
    verify_chain(audit_dir(home), public_key) -> VerifyReport   # no keys, no lock
    export_log(...) / verify_export(...)               # signed JSON lines for oversight
"""

from edgeid.runtime.audit.errors import (
    AuditBusyError,
    AuditError,
    AuditInputError,
    AuditNotFoundError,
    AuditTamperedError,
    ExportSignatureError,
)
from edgeid.runtime.audit.events import AuditAction, AuditEvent, AuditRecord, Candidate
from edgeid.runtime.audit.export import ExportCheck, ExportSummary, export_log, verify_export
from edgeid.runtime.audit.layout import AUDIT_KEY_SCOPE, audit_dir
from edgeid.runtime.audit.log import AuditLog, RecordFilter
from edgeid.runtime.audit.verify import VerifyReport, VerifyStatus, verify_chain

__all__ = [
    "AUDIT_KEY_SCOPE",
    "AuditAction",
    "AuditBusyError",
    "AuditError",
    "AuditEvent",
    "AuditInputError",
    "AuditLog",
    "AuditNotFoundError",
    "AuditRecord",
    "AuditTamperedError",
    "Candidate",
    "ExportCheck",
    "ExportSignatureError",
    "ExportSummary",
    "RecordFilter",
    "VerifyReport",
    "VerifyStatus",
    "audit_dir",
    "export_log",
    "verify_chain",
    "verify_export",
]
