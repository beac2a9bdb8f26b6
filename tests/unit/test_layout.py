"""The S3 key layout: the documented keys, no two (task, attempt)s sharing one, and
orchestrator/data/layout.py the only module that spells them."""

from __future__ import annotations

import ast
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from cotune.orchestrator.data import layout
from cotune.orchestrator.data.layout import (
    LayoutError,
    adapter_key,
    attempt_prefix,
    base_eval_key,
    best_prefix,
    checkpoint_key,
    data_key,
    data_prefix,
    job_prefix,
    manifest_key,
    merged_prefix,
    model_archive_key,
    model_prefix,
    round_prefix,
    spec_key,
    trial_prefix,
)
from cotune.orchestrator.data.sharding import EVAL_NAME, shard_name

ROOT = Path(__file__).resolve().parents[2]
JOB = "tiny-1a2b3c4d"
SHA = "0123456789abcdef" * 4


@dataclass(frozen=True)
class Place:
    """A task's place in its job (the fields of TaskRecord that keys use)."""

    job_id: str
    trial: int
    round: int
    shard: int


TASK = Place(JOB, trial=3, round=2, shard=1)
ATTEMPT = "jobs/tiny-1a2b3c4d/trials/3/r2/s1/a4/"


def test_the_keys_of_a_sample_task_are_the_documented_ones():
    assert spec_key(JOB) == "jobs/tiny-1a2b3c4d/spec.yaml"
    assert data_prefix(JOB) == "jobs/tiny-1a2b3c4d/data/"
    assert manifest_key(JOB) == "jobs/tiny-1a2b3c4d/data/manifest.json"
    assert data_key(JOB, shard_name(0)) == "jobs/tiny-1a2b3c4d/data/shard-00000.jsonl.zst"
    assert data_key(JOB, EVAL_NAME) == "jobs/tiny-1a2b3c4d/data/eval.jsonl.zst"
    assert base_eval_key(JOB) == "jobs/tiny-1a2b3c4d/base_eval.json"
    assert trial_prefix(JOB, 3) == "jobs/tiny-1a2b3c4d/trials/3/"
    assert round_prefix(JOB, 3, 2) == "jobs/tiny-1a2b3c4d/trials/3/r2/"
    assert attempt_prefix(TASK, 4) == ATTEMPT
    assert adapter_key(TASK, 4, "adapter_model.safetensors") == (
        ATTEMPT + "adapter/adapter_model.safetensors"
    )
    assert checkpoint_key(TASK, 4, 7) == ATTEMPT + "ckpt/0007/checkpoint.tar"
    assert checkpoint_key(TASK, 4, 12345) == ATTEMPT + "ckpt/12345/checkpoint.tar"
    assert merged_prefix(JOB, 3, 2) == "jobs/tiny-1a2b3c4d/trials/3/r2/merged/"
    assert best_prefix(JOB) == "jobs/tiny-1a2b3c4d/best/"
    assert model_prefix(SHA) == f"models/{SHA}/"
    assert model_archive_key(SHA) == f"models/{SHA}/model.tar"


def test_the_module_docstring_shows_exactly_the_keys_the_functions_build():
    """The tree in layout.py's docstring, filled in for the sample task, is what the code
    makes: the documentation cannot drift from the keys."""
    fill = {
        "<job>": JOB,
        "<t>": "3",
        "<round>": "2",
        "<shard>": "1",
        "<attempt>": "4",
        "<file>": "adapter_model.safetensors",
        "<seq:04d>": "0007",
        "<sha256>": SHA,
    }
    documented = set()
    for line in (layout.__doc__ or "").splitlines():
        if re.match(r"\s+(jobs|models)/", line):
            key = line.split()[0].removesuffix("...")
            for part, value in fill.items():
                key = key.replace(part, value)
            documented.add(key)
    built = {
        spec_key(JOB),
        manifest_key(JOB),
        data_key(JOB, shard_name(0)),
        data_key(JOB, EVAL_NAME),
        base_eval_key(JOB),
        adapter_key(TASK, 4, "adapter_model.safetensors"),
        checkpoint_key(TASK, 4, 7),
        merged_prefix(JOB, 3, 2),
        best_prefix(JOB),
        model_archive_key(SHA),
    }
    assert documented == built


def test_no_two_task_attempts_share_a_key_or_a_folder():
    """Every (job, trial, round, shard, attempt) writes under its own folder, and no folder
    holds another's (so "a1/" and "a11/", "r1/s11" and "r11/s1" stay apart)."""
    numbers = (0, 1, 2, 10, 11, 12, 101)
    places = [
        (Place(job, trial, round, shard), attempt)
        for job in ("j", "j-1", "j1")
        for trial, round, shard, attempt in itertools.product(numbers, repeat=4)
    ]
    prefixes = sorted(attempt_prefix(task, attempt) for task, attempt in places)
    assert len(set(prefixes)) == len(places)
    # In sorted order a prefix of any key is a prefix of the key right after it.
    nested = [(a, b) for a, b in itertools.pairwise(prefixes) if b.startswith(a)]
    assert nested == []
    for task, attempt in places[:50]:
        keys = {checkpoint_key(task, attempt, seq) for seq in range(12)}
        keys |= {adapter_key(task, attempt, name) for name in ("a.json", "b.safetensors")}
        assert len(keys) == 14
        assert all(k.startswith(attempt_prefix(task, attempt)) for k in keys)
    assert not any(p.startswith(merged_prefix("j", 1, 1)) for p in prefixes)


@pytest.mark.parametrize("job_id", ["", "a/b", ".", "..", "bad\nid"])
def test_job_ids_that_cannot_be_keys_are_refused(job_id: str):
    for build in (job_prefix, spec_key, data_prefix, best_prefix, base_eval_key):
        with pytest.raises(LayoutError, match="job_id"):
            build(job_id)
    with pytest.raises(LayoutError, match="job_id"):
        attempt_prefix(Place(job_id, 0, 0, 0), 1)


def test_parts_that_could_collide_are_refused_with_their_name():
    with pytest.raises(LayoutError, match=r"trial: -1 is not a whole number"):
        trial_prefix(JOB, -1)
    with pytest.raises(LayoutError, match="round"):
        merged_prefix(JOB, 0, -2)
    with pytest.raises(LayoutError, match="shard"):
        attempt_prefix(Place(JOB, 0, 0, -1), 1)
    with pytest.raises(LayoutError, match=r"attempt: True"):
        attempt_prefix(TASK, True)
    with pytest.raises(LayoutError, match="checkpoint seq"):
        checkpoint_key(TASK, 1, -1)
    with pytest.raises(LayoutError, match=r"adapter file: 'x/y' is not a plain file name"):
        adapter_key(TASK, 1, "x/y")
    with pytest.raises(LayoutError, match="data file"):
        data_key(JOB, "..")
    with pytest.raises(LayoutError, match="model sha256"):
        model_prefix("ABC")
    with pytest.raises(LayoutError, match="model sha256"):
        model_archive_key("../" + SHA)


# -- one owner ------------------------------------------------------------------------------

KEY_PATTERNS = re.compile(
    r"^(jobs|models)/|^(trials|merged|best|data|ckpt|adapter)/"
    r"|/(trials|merged|best|data|ckpt|adapter)/"
)


def key_literals(source: str) -> list[str]:
    """The string pieces of `source` (plain strings and the literal parts of f-strings, not
    docstrings) that spell part of an object key."""
    tree = ast.parse(source)
    docstrings: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and KEY_PATTERNS.search(node.value)
    ]


def test_the_key_check_finds_a_key_spelled_outside_layout():
    source = '''
"""Writes jobs/<job>/best/ (a docstring may say so)."""
def best(job_id, n):
    """jobs/<job>/trials/ too."""
    return f"jobs/{job_id}/best/", f"{job_id}/trials/{n}/", "merged/" + "x", "/v1/jobs/x"
'''
    assert sorted(key_literals(source)) == ["/best/", "/trials/", "jobs/", "merged/"]


def test_no_module_but_layout_spells_an_object_key():
    owner = ROOT / "orchestrator" / "data" / "layout.py"
    spelled = {
        str(path.relative_to(ROOT)): found
        for path in sorted((ROOT / "orchestrator").rglob("*.py"))
        if path != owner and (found := key_literals(path.read_text()))
    }
    assert spelled == {}
    assert key_literals(owner.read_text())  # the check does see the keys where they are
