"""`cotune merge` through the real CLI app (typer), and once through the installed entry point."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cotune.orchestrator.cli.app import app
from typer.testing import CliRunner


def test_merge_prints_a_summary_and_writes_a_peft_folder(
    tmp_path: Path, two_adapters: list[Path]
) -> None:
    out = tmp_path / "merged"
    args = ["merge", *map(str, two_adapters), "--method", "svd", "--rank", "3", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"merged 2 adapter(s) -> {out}" in result.stdout
    assert "method svd (exact), rank 3, 3 modules, weights from trained tokens" in result.stdout
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3
    assert (
        f"Command: `cotune merge {two_adapters[0]} {two_adapters[1]} --method svd --rank 3"
        in (out / "README.md").read_text()
    )


def test_given_weights_and_approximate_methods_are_labelled(
    tmp_path: Path, two_adapters: list[Path]
) -> None:
    args = ["merge", *map(str, two_adapters), "--method", "linear", "--weights", "1,1"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "method linear (approximate)" in result.stdout and "weights from given" in result.stdout
    assert "APPROXIMATION" in (tmp_path / "m" / "README.md").read_text()


def test_bad_input_exits_2_with_the_message_on_stderr(
    tmp_path: Path, two_adapters: list[Path]
) -> None:
    (two_adapters[1] / "adapter_model.safetensors").unlink()
    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", *map(str, two_adapters), "--out", str(out)])
    assert result.exit_code == 2
    assert f"error: adapter {two_adapters[1]}: missing adapter_model.safetensors" in result.stderr
    assert result.stdout == ""
    assert not out.exists()


def test_missing_token_counts_warn_on_stderr(tmp_path: Path, two_adapters: list[Path]) -> None:
    (two_adapters[0] / "metrics.json").unlink()
    result = CliRunner().invoke(
        app, ["merge", *map(str, two_adapters), "--out", str(tmp_path / "m")]
    )
    assert result.exit_code == 0, result.output
    assert "warning: no trained token count" in result.stderr
    assert "weights from equal" in result.stdout


def test_installed_entry_point(tmp_path: Path, two_adapters: list[Path]) -> None:
    cotune = shutil.which("cotune") or str(Path(__file__).parents[3] / ".venv" / "bin" / "cotune")
    if not Path(cotune).exists():
        pytest.skip("the cotune entry point is not installed (pip install -e .)")
    out = tmp_path / "merged"
    done = subprocess.run(
        [cotune, "merge", *map(str, two_adapters), "--method", "cat", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    bad = subprocess.run(
        [cotune, "merge", str(two_adapters[0]), "--weights", "1,2", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2
    assert "--weights: got 2 weight(s) for 1 adapter(s)" in bad.stderr
