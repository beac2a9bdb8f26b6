"""`cotune validate SPEC --tokenizer FOLDER`: the rows' lengths in tokens and what
training.sequence_len keeps, from a real subprocess with the tiny model's real tokenizer."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_validate_cli import assert_wrote_nothing

pytest.importorskip("transformers", reason="--tokenizer needs the worker extra")

COTUNE = Path(sys.executable).parent / "cotune"


def write_spec(
    folder: Path, rows: list[dict[str, str]], sequence_len: int, **dataset: float
) -> Path:
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = folder / "sweep.yaml"
    extra = "".join(f"  {k}: {v}\n" for k, v in dataset.items())
    spec.write_text(
        "name: fit\nbase_model: cotune://tiny-llama\n"
        f"dataset:\n  path: {data}\n  format: alpaca\n{extra}"
        f"training:\n  sequence_len: {sequence_len}\n  max_steps: 2\n"
    )
    return spec


def validate(spec: Path, *flags: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(COTUNE), "validate", str(spec), *flags],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        env={"COLUMNS": "200", "NO_COLOR": "1", "PYTHONIOENCODING": "utf-8", "HOME": str(cwd)},
    )


SHORT = {"instruction": "Reverse the letters.", "input": "abc", "output": "cba"}
LONG = {"instruction": " ".join(["describe the colour of the sea"] * 12), "output": "blue"}


@pytest.fixture
def place(tmp_path: Path) -> Path:
    (tmp_path / "home").mkdir()
    (tmp_path / "cwd").mkdir()
    (tmp_path / "spec").mkdir()
    return tmp_path


def test_the_table_shows_lengths_and_what_sequence_len_keeps(
    place: Path, tiny_model_dir: Path
) -> None:
    spec = write_spec(place / "spec", [SHORT] * 99 + [LONG], 512)
    result = validate(spec, "--tokenizer", str(tiny_model_dir), cwd=place / "cwd")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "sequence_len 512 on the first 100 rows" in out
    assert re.search(r"whole\s+│\s+100 \(100\.0%\)", out), out
    assert re.search(r"dropped \(no trained token left\)\s+│\s+0 \(0\.0%\)", out), out
    assert re.search(r"p50 / p90 / p99 / max\s+│\s+\d+ / \d+ / \d+ / \d+", out), out
    assert "warning" not in out and "valid:" in out
    assert_wrote_nothing(place)


def test_rows_dropped_past_the_limit_exit_2_naming_the_counts(
    place: Path, tiny_model_dir: Path
) -> None:
    spec = write_spec(place / "spec", [SHORT] * 90 + [LONG] * 10, 64)
    result = validate(spec, "--tokenizer", str(tiny_model_dir), cwd=place / "cwd")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "10 of 100 rows of the first 100 of the dataset (10.0%) lose every trained token" in (
        result.stderr
    )
    assert "more than dataset.max_dropped_rows 0.05" in result.stderr
    assert "valid:" not in result.stdout
    # The table still says which sequence_len would keep them.
    none_dropped = re.search(r"sequence_len dropping none\s+│\s+(\d+)", result.stdout)
    assert none_dropped is not None and int(none_dropped.group(1)) > 64


def test_a_raised_limit_passes_with_a_warning(place: Path, tiny_model_dir: Path) -> None:
    spec = write_spec(place / "spec", [SHORT] * 90 + [LONG] * 10, 64, max_dropped_rows=0.2)
    result = validate(spec, "--tokenizer", str(tiny_model_dir), "--rows", "50", cwd=place / "cwd")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "on the first 50 rows" in result.stdout  # --rows: only the first 50 (all short)
    assert "warning" not in result.stdout
    result = validate(spec, "--tokenizer", str(tiny_model_dir), cwd=place / "cwd")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning: of 100 rows at sequence_len 64" in result.stdout
    assert "10 dropped (10.0%)" in result.stdout


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("absent", "--tokenizer: {p}/absent: no such folder"),
        ("empty", "--tokenizer: {p}/empty: no tokenizer loads from it"),
    ],
)
def test_a_bad_tokenizer_folder_exits_2_naming_it(place: Path, flag: str, message: str) -> None:
    (place / "empty").mkdir()
    spec = write_spec(place / "spec", [SHORT] * 20, 64)
    result = validate(spec, "--tokenizer", str(place / flag), cwd=place / "cwd")
    assert result.returncode == 2
    assert message.format(p=place) in result.stderr.replace("\n", " ")


def test_rows_must_be_a_positive_number(place: Path, tiny_model_dir: Path) -> None:
    spec = write_spec(place / "spec", [SHORT] * 20, 64)
    result = validate(spec, "--tokenizer", str(tiny_model_dir), "--rows", "0", cwd=place / "cwd")
    assert result.returncode == 2 and "--rows" in result.stderr
