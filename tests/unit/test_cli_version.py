"""`cotune --version`: the installed console script prints the installed distribution's version."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

# The console script pip installed beside this interpreter (.venv/bin/cotune).
COTUNE = Path(sys.executable).parent / "cotune"


@pytest.mark.skipif(not COTUNE.is_file(), reason=f"no installed console script at {COTUNE}")
def test_version_flag_prints_the_installed_version() -> None:
    done = subprocess.run(
        [str(COTUNE), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"cotune {version('cotune')}\n"
