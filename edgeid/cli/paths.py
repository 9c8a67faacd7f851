"""Where edgeid keeps its state: ``--home``, else ``$EDGEID_HOME``, else ~/.local/share/edgeid."""

from __future__ import annotations

import os
from pathlib import Path

from edgeid.runtime.inference.model_home import MODELS_DIR
from edgeid.runtime.inference.model_home import models_dir as installed_models

HOME_ENV = "EDGEID_HOME"


def resolve_home(cli_value: str | None) -> Path:
    if cli_value:
        return Path(cli_value).expanduser().resolve()
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser().resolve()
    return Path.home() / ".local" / "share" / "edgeid"


def models_dir(home: Path) -> Path:
    """The models the box runs: the state directory's own, else those installed with the code."""
    return installed_models(home)


def built_models_dir(home: Path) -> Path:
    """Where ``edgeid models build`` writes: always the state directory."""
    return home / MODELS_DIR


def wheelhouse_dir(home: Path) -> Path:
    return home / "wheelhouse"
