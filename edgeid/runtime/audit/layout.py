"""Where the audit log lives: ``<home>/audit/``.

::

    audit.log     the hash chain of sealed records and signed checkpoints (frames.py)
    head.json     the signed chain head, replaced atomically after every append (signing.py)
    .lock         one writer process at a time; verify and export never take it
    .creating     present only while a new log is being made (its key is already in the keyring)

The log's data key is held in the device keyring under the scope ``audit``.
"""

from __future__ import annotations

from pathlib import Path

AUDIT_DIR = "audit"
LOG_FILE = "audit.log"
HEAD_FILE = "head.json"
LOCK_FILE = ".lock"
CREATING_MARKER = ".creating"
AUDIT_KEY_SCOPE = "audit"


def audit_dir(home: Path) -> Path:
    return Path(home) / AUDIT_DIR
