"""The submitter's install (`pip install cotune`, no extras) runs the light commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("base-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(ROOT)],
        check=True,
    )
    return venv


def test_base_install_has_no_heavy_packages(base_venv: Path) -> None:
    for heavy in ("torch", "ray", "redis", "boto3"):
        found = subprocess.run(
            [str(base_venv / "bin" / "python"), "-c", f"import {heavy}"], capture_output=True
        )
        assert found.returncode != 0, f"{heavy} is importable in the base install"


def test_help_and_validate_work_on_the_base_install(base_venv: Path) -> None:
    cotune = str(base_venv / "bin" / "cotune")
    help_out = subprocess.run([cotune, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert help_out.returncode == 0, help_out.stderr
    assert "validate" in help_out.stdout and "worker" in help_out.stdout

    validated = subprocess.run(
        [cotune, "validate", "examples/tiny/sweep.yaml"], capture_output=True, text=True, cwd=ROOT
    )
    assert validated.returncode == 0, validated.stdout + validated.stderr
    assert "shard tasks" in validated.stdout.lower()
