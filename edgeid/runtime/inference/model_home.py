"""Where a box's models are.

``<home>/models`` when something built or copied models there (``edgeid models build``, a lab
box); otherwise the converted models installed with the code: the Debian package and every
update slot hold one tree, ``bin/edgeid``, ``lib/`` (this package) and ``models/``, so a
fresh state directory needs no copy and an update that brings new models brings them with the
code that reads them.
"""

from __future__ import annotations

from pathlib import Path

from edgeid.runtime.inference.manifest import MANIFEST_SUFFIX

MODELS_DIR = "models"
# <tree>/lib/edgeid/runtime/inference/model_home.py: the tree is four folders up.
_TREE = Path(__file__).resolve().parents[4]


def shipped_models_dir(tree: Path = _TREE) -> Path | None:
    """The models beside the installed code, when this code runs from a built tree."""
    folder = tree / MODELS_DIR
    if (tree / "lib" / "edgeid").is_dir() and _has_models(folder):
        return folder
    return None


def models_dir(home: Path) -> Path:
    """The state directory's own models if it has any, else the installed ones (else the
    state directory's folder, where ``edgeid models build`` would put them)."""
    own = home / MODELS_DIR
    if _has_models(own):
        return own
    return shipped_models_dir() or own


def _has_models(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob(f"*{MANIFEST_SUFFIX}"))
