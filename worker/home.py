"""Where the worker keeps its files unless told otherwise: under $COTUNE_HOME, or ~/.cotune.

The worker role may not import cotune.orchestrator.settings (role separation), so this mirrors
`Settings.home` for the two folders the worker needs: <home>/worker (`cotune worker`'s work
folder) and <home>/models (the cache of built-in base models). A worker's log file, written
while its live view is on a terminal, lies in its work folder (`log_file`).
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "COTUNE_HOME"


def cotune_home() -> Path:
    """$COTUNE_HOME, or ~/.cotune when it is unset or empty (user folder expanded)."""
    return Path(os.environ.get(HOME_ENV) or "~/.cotune").expanduser()


def default_work_dir() -> Path:
    """<home>/worker: inputs, checkpoints and caches of `cotune worker`."""
    return cotune_home() / "worker"


def default_models_dir() -> Path:
    """<home>/models: built-in base models, built on first use."""
    return cotune_home() / "models"


def log_file(work_dir: Path) -> Path:
    """<work folder>/worker.log: everything `cotune worker` logs while its live view is on."""
    return work_dir / "worker.log"
