"""`cotune validate` as a user runs it: a real subprocess on the malformed-spec corpus and the
shipped examples; exit codes, every error named, nothing written, no heavy imports."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "specs_bad"
BAD_SPECS = sorted(CORPUS.glob("*.yaml"))
COTUNE = Path(sys.executable).parent / "cotune"
FIELD_PATH = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*")
HEAVY = ("torch", "ray", "redis", "boto3", "pyarrow", "transformers", "peft", "optuna", "numpy")


def expectations(spec: Path) -> tuple[list[str], list[str]]:
    """The header: `# expect: field.path` lines, and `# expect-message: phrase` lines (for
    file-level errors, which have no field: YAML syntax, an empty file, ...)."""
    text = spec.read_text()
    fields = re.findall(r"^# expect: (\S+)$", text, flags=re.MULTILINE)
    phrases = re.findall(r"^# expect-message: (.+)$", text, flags=re.MULTILINE)
    return fields, phrases


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def run_validate(spec: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`cotune validate SPEC` from an empty cwd with an empty HOME; returns (result, tmp root)."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COTUNE_")}
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        COLUMNS="200",  # wide enough that table cells are not wrapped
        NO_COLOR="1",
        PYTHONIOENCODING="utf-8",  # rich draws its box characters whatever the locale
    )
    result = subprocess.run(
        [str(COTUNE), "validate", str(spec)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result, tmp_path


def assert_wrote_nothing(tmp_path: Path) -> None:
    assert list((tmp_path / "home").iterdir()) == [], "validate wrote under HOME"
    assert list((tmp_path / "cwd").iterdir()) == [], "validate wrote into the working directory"


def test_the_corpus_is_large_and_every_file_says_what_it_expects() -> None:
    assert len(BAD_SPECS) >= 30
    for spec in BAD_SPECS:
        fields, phrases = expectations(spec)
        assert fields or phrases, f"{spec.name} has no '# expect:' header"


@pytest.mark.parametrize("spec", BAD_SPECS, ids=lambda p: p.stem)
def test_bad_spec_exits_2_naming_the_field(spec: Path, tmp_path: Path) -> None:
    before = snapshot(CORPUS)
    result, root = run_validate(spec, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    fields, phrases = expectations(spec)
    for field in fields:
        assert FIELD_PATH.fullmatch(field), f"{spec.name}: {field!r} is not a field path"
        assert any(line.startswith(f"{field}: ") for line in lines), result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr
    # Exactly the expected errors: each file has one defect (several_errors has several).
    count = re.search(r"^(\d+) errors? in ", result.stderr, flags=re.MULTILINE)
    assert count is not None, result.stderr
    assert int(count.group(1)) == len(fields) + len(phrases), result.stderr
    assert result.stdout == ""  # nothing "resolved" is shown for a spec that is not valid
    assert_wrote_nothing(root)
    assert snapshot(CORPUS) == before, "validate changed the corpus folder"


@pytest.mark.parametrize(
    "example", sorted(ROOT.glob("examples/*/sweep.yaml")), ids=lambda p: p.parent.name
)
def test_examples_validate_and_show_what_they_imply(example: Path, tmp_path: Path) -> None:
    result, root = run_validate(example, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "resolved spec" in out and "search space" in out and "what it implies" in out
    assert re.search(r"^name: \S+", out, flags=re.MULTILINE)  # the resolved YAML
    assert "warning" not in out
    assert_wrote_nothing(root)


def test_tiny_example_shows_its_counts(tmp_path: Path) -> None:
    result, _ = run_validate(ROOT / "examples/tiny/sweep.yaml", tmp_path)
    out = result.stdout
    data = ROOT / "examples/tiny/data/train.jsonl"
    rows = sum(1 for line in data.read_text().splitlines() if line.strip())
    assert re.search(r"lora\.lora_r\s+│\s+4, 8\s+│\s+4\s+│\s+2", out), out
    assert re.search(r"training\.learning_rate\s+│\s+loguniform \[0\.001, 0\.01\]", out), out
    for label, value in [
        ("trials", "4"),
        ("rounds", "2"),
        ("shards per round", "2"),
        ("shard tasks (trials x rounds x shards)", "16"),
        ("merges", "8"),
        ("dataset rows", f"{rows:,}"),
    ]:
        assert re.search(rf"│ {re.escape(label)}\s+│\s+{re.escape(value)} │", out), (label, out)


def _absent(folder: Path) -> Path:
    return folder / "absent.yaml"


def _folder(folder: Path) -> Path:
    return folder


def _not_utf8(folder: Path) -> Path:
    path = folder / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [(_absent, "no such file"), (_folder, "not a file"), (_not_utf8, "not UTF-8")],
    ids=["missing", "folder", "not-utf8"],
)
def test_unreadable_spec_files_exit_2(
    make: Callable[[Path], Path], message: str, tmp_path: Path
) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    spec = make(specs)
    result, root = run_validate(spec, tmp_path)
    assert result.returncode == 2
    assert f"{spec}: " in result.stderr and message in result.stderr, result.stderr
    assert_wrote_nothing(root)


def test_warnings_are_shown_and_the_spec_still_passes(tmp_path: Path) -> None:
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        "name: w\nbase_model: org/model\ndataset: {path: s3://bucket/train.jsonl}\n"
        "training: {max_steps: 5}\n"
    )
    result, _ = run_validate(spec, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning: base_model_revision: not pinned" in result.stdout
    assert "note: dataset.path: s3:// data is counted" in result.stdout


def test_validate_imports_nothing_heavy(tmp_path: Path) -> None:
    # The submitter's base install has no torch, ray, redis or boto3: validate must not need
    # them. Run the real CLI entry point (plugins included) and look at sys.modules after.
    probe = (
        "import json, sys\n"
        "from cotune.orchestrator.cli.app import main\n"
        f"sys.argv = ['cotune', 'validate', {str(ROOT / 'examples/tiny/sweep.yaml')!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(json.dumps({'code': code, 'heavy': heavy}), file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    verdict = json.loads(result.stderr.strip().splitlines()[-1])
    assert verdict == {"code": 0, "heavy": []}, result.stderr
