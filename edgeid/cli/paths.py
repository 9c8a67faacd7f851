"""Where edgeid keeps its state: ``--home``, else ``$EDGEID_HOME``, else ~/.local/share/edgeid."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "EDGEID_HOME"


def resolve_home(cli_value: str | None) -> Path:
    if cli_value:
        return Path(cli_value).expanduser().resolve()
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser().resolve()
    return Path.home() / ".local" / "share" / "edgeid"


def models_dir(home: Path) -> Path:
    return home / "models"


def wheelhouse_dir(home: Path) -> Path:
    return home / "wheelhouse"
