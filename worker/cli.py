"""Worker-role commands (`cotune worker`, `cotune train-local`), plugged into `cotune`.

Kept light at import time: heavy modules load inside each command.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the worker commands to the `cotune` app (entry point `cotune.commands`)."""
