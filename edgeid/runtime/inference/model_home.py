"""Where a box's models are.

``<home>/models`` when something built or copied models there (``edgeid models build``, a lab
box); otherwise the converted models installed with the code: the Debian package and every
update slot hold one tree, ``bin/edgeid``, ``lib/`` (this package) and ``models/``, so a
fresh state directory needs no copy and an update that brings new models brings them with the
code that reads them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edgeid.runtime.inference.embedders import SHIPPED_EMBEDDER
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


def adopt_installed_models(home: Path) -> Path:
    """The state directory's own models folder, first filled with the installed models when it
    lacks them: an operator's model (``edgeid models add``) and the choice of the model in use
    are written beside them there, never into the installed tree an update replaces."""
    own = home / MODELS_DIR
    shipped = shipped_models_dir()
    if shipped is not None and not _has_models(own):
        staging = home / f".{MODELS_DIR}.adopting"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(shipped, staging)
        for item in own.iterdir() if own.is_dir() else ():  # e.g. an earlier operator model
            target = staging / item.name
            if not target.exists():
                shutil.move(str(item), str(target))
        shutil.rmtree(own, ignore_errors=True)
        staging.rename(own)
    return own


def _has_models(folder: Path) -> bool:
    """Whether ``folder`` holds the box's own set (at least the shipped embedder's manifest):
    a folder with only an operator's model does not hide the installed ones."""
    return (folder / f"{SHIPPED_EMBEDDER}{MANIFEST_SUFFIX}").is_file()
