"""Sharding of local inputs: determinism, the documented assignment, every input kind, errors."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import zstandard
from cotune.orchestrator.data.datasource import MAX_JSON_ARRAY_BYTES
from cotune.orchestrator.data.manifest import (
    MANIFEST,
    Manifest,
    ManifestError,
    load_manifest,
    verify_files,
)
from cotune.orchestrator.data.sharding import (
    EVAL_NAME,
    ShardingError,
    shard_dataset,
    shard_name,
)
from cotune.orchestrator.data.synthetic import generate_rows, write_jsonl
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st


def read_split(path: Path) -> list[bytes]:
    """The canonical lines of one output file."""
    data = zstandard.ZstdDecompressor().stream_reader(path.read_bytes(), read_across_frames=True)
    return data.read().splitlines(keepends=True)


def canonical(row: dict[str, Any]) -> bytes:
    return orjson.dumps(row, option=orjson.OPT_SORT_KEYS) + b"\n"


def expected_split(
    rows: list[dict[str, Any]], shards: int, fraction: float, seed: int
) -> tuple[list[list[bytes]], list[bytes]]:
    """The assignment exactly as orchestrator/data/sharding.py's docstring specifies it."""
    threshold = int(fraction * 2**64)
    salt = (seed % 2**64).to_bytes(8, "little")
    train: list[bytes] = []
    evals: list[bytes] = []
    for row in rows:
        line = canonical(row)
        digest = hashlib.blake2b(line, digest_size=8, salt=salt).digest()
        (evals if int.from_bytes(digest, "big") < threshold else train).append(line)
    return [train[i::shards] for i in range(shards)], evals


def outputs(out: Path, shards: int) -> tuple[list[list[bytes]], list[bytes]]:
    return [read_split(out / shard_name(i)) for i in range(shards)], read_split(out / EVAL_NAME)


def shard(source: Path | str, out: Path, **kwargs: Any) -> Manifest:
    args: dict[str, Any] = {"fmt": "alpaca", "shards": 3, "eval_split": 0.1, "seed": 7}
    args.update(kwargs)
    return shard_dataset(source, out_dir=out, **args)


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# -- determinism and the assignment ----------------------------------------------------------


def test_same_input_and_seed_give_byte_identical_output(alpaca_dataset: Path, tmp_path: Path):
    first = shard(alpaca_dataset, tmp_path / "a", shards=4)
    second = shard(alpaca_dataset, tmp_path / "b", shards=4)
    assert first == second
    files = tree_bytes(tmp_path / "a")
    assert files == tree_bytes(tmp_path / "b")
    assert sorted(files) == [EVAL_NAME, MANIFEST, *(shard_name(i) for i in range(4))]
    other = shard(alpaca_dataset, tmp_path / "c", shards=4, seed=8)
    assert tree_bytes(tmp_path / "c")[EVAL_NAME] != files[EVAL_NAME]
    assert other.eval.sha256 != first.eval.sha256


def test_manifest_describes_the_files(alpaca_dataset: Path, tmp_path: Path):
    manifest = shard(alpaca_dataset, tmp_path / "out", shards=4, eval_split=0.25)
    out = tmp_path / "out"
    assert Manifest.from_json((out / MANIFEST).read_text()) == manifest
    assert (out / MANIFEST).read_text() == manifest.to_json()
    raw = alpaca_dataset.read_bytes()
    assert manifest.source.sha256 == hashlib.sha256(raw).hexdigest()
    assert manifest.source.bytes == len(raw)
    assert manifest.source.rows == 2000
    assert manifest.format == "alpaca" and manifest.seed == 7 and manifest.eval_split == 0.25
    for info in manifest.files():
        data = (out / info.name).read_bytes()
        assert info.sha256 == hashlib.sha256(data).hexdigest()
        assert info.bytes == len(data)
        lines = read_split(out / info.name)
        assert info.rows == len(lines)
        assert info.tokens_estimate == sum(map(len, lines)) // 4
    assert sum(s.rows for s in manifest.shards) + manifest.eval.rows == 2000
    assert max(s.rows for s in manifest.shards) - min(s.rows for s in manifest.shards) <= 1
    verify_files(out, manifest)
    assert load_manifest(out) == manifest


def test_rows_land_where_the_docstring_says(alpaca_dataset: Path, tmp_path: Path):
    rows = [json.loads(line) for line in alpaca_dataset.read_text().splitlines()]
    shard(alpaca_dataset, tmp_path / "out", shards=5, eval_split=0.2, seed=123)
    assert outputs(tmp_path / "out", 5) == expected_split(rows, 5, 0.2, 123)


def test_eval_fraction_is_respected_on_distinct_rows(tmp_path: Path):
    path = tmp_path / "distinct.jsonl"
    write_jsonl(path, ({"text": f"row {i}"} for i in range(4000)))
    manifest = shard(path, tmp_path / "out", fmt="text", eval_split=0.2)
    # Binomial(4000, 0.2): mean 800, sd ~25; five sd either side.
    assert 675 < manifest.eval.rows < 925


def test_appending_data_moves_no_earlier_row(tmp_path: Path):
    rows = list(generate_rows("text", 900, seed=1))
    write_jsonl(tmp_path / "small.jsonl", rows[:600])
    write_jsonl(tmp_path / "big.jsonl", rows)
    shard(tmp_path / "small.jsonl", tmp_path / "s", fmt="text", shards=4)
    shard(tmp_path / "big.jsonl", tmp_path / "b", fmt="text", shards=4)
    small_shards, small_eval = outputs(tmp_path / "s", 4)
    big_shards, big_eval = outputs(tmp_path / "b", 4)
    assert big_eval[: len(small_eval)] == small_eval
    for small, big in zip(small_shards, big_shards, strict=True):
        assert big[: len(small)] == small


_row = st.fixed_dictionaries(
    {"instruction": st.text(min_size=1, max_size=8).filter(lambda s: not s.isspace())},
    optional={"input": st.text(max_size=5), "id": st.integers(-(2**63), 2**64 - 1)},
).map(lambda r: {**r, "output": "out"})


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(_row, min_size=4, max_size=60).flatmap(  # with some duplicates
        lambda rs: st.lists(st.sampled_from(rs), max_size=20).map(lambda dup: rs + dup)
    ),
    shards=st.integers(1, 5),
    seed=st.integers(-(2**70), 2**70),
    fraction=st.floats(0.05, 0.95),
    bad_every=st.sampled_from([0, 0, 2, 5, 9]),
)
def test_every_row_lands_in_exactly_one_split(
    rows: list[dict[str, Any]], shards: int, seed: int, fraction: float, bad_every: int
):
    lines = [json.dumps(r) for r in rows]
    if bad_every:  # sprinkle bad lines in; they must be dropped, counted and not routed
        for i in range(len(lines), -1, -bad_every):
            lines.insert(i, '{"instruction": "no output"}')
    bad = len(lines) - len(rows)
    want_shards, want_eval = expected_split(rows, shards, fraction, seed)
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "in.jsonl", Path(tmp) / "out"
        source.write_text("".join(line + "\n" for line in lines))
        try:
            manifest = shard(
                source, out, shards=shards, eval_split=fraction, seed=seed, max_bad_rows=0.5
            )
        except ShardingError as e:
            message = str(e)
            if bad > 0.5 * len(lines):
                assert f"{bad} of {len(lines)} rows" in message
                event("refused: too many bad rows")
            elif sum(map(len, want_shards)) < shards:
                assert "cannot fill" in message
                event("refused: fewer training rows than shards")
            else:
                assert not want_eval and "eval split is empty" in message
                event("refused: empty eval split")
            assert not out.exists()
            return
        event("sharded")
        got_shards, got_eval = outputs(out, shards)
        assert Counter([*itertools.chain(*got_shards), *got_eval]) == Counter(map(canonical, rows))
        assert (got_shards, got_eval) == (want_shards, want_eval)
        assert manifest.bad_rows.count == bad
        assert manifest.source.rows == len(lines)


# -- input kinds -------------------------------------------------------------------------------


@pytest.fixture
def rows_file(tmp_path: Path) -> tuple[list[dict[str, Any]], Path]:
    """300 alpaca rows, some without `input`, as JSON lines with non-canonical spacing."""
    rows = list(generate_rows("alpaca", 300, seed=5))
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r, indent=None) + "\n" for r in rows))
    return rows, path


def _same_splits(a: Path, b: Path, shards: int = 3) -> bool:
    return outputs(a, shards) == outputs(b, shards)


def test_compressed_inputs_give_the_same_shards(rows_file, tmp_path: Path):
    _, plain = rows_file
    gz, zst = tmp_path / "rows.jsonl.gz", tmp_path / "rows.jsonl.zst"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    zst.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    base = shard(plain, tmp_path / "plain")
    for source in (gz, zst):
        manifest = shard(source, tmp_path / source.suffix)
        assert _same_splits(tmp_path / "plain", tmp_path / source.suffix)
        assert manifest.shards == base.shards and manifest.eval == base.eval
        assert manifest.source.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
        assert manifest.source.bytes == source.stat().st_size


def test_parquet_gives_the_same_shards(rows_file, tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, _ = rows_file
    # Parquet has one schema for all rows: rows without `input` have it null there.
    table = pa.Table.from_pylist([{**r, "input": r.get("input")} for r in rows])
    path = tmp_path / "rows.parquet"
    pq.write_table(table, path, row_group_size=64)
    nulls = tmp_path / "nulls.jsonl"
    write_jsonl(nulls, ({**r, "input": r.get("input")} for r in rows))
    manifest = shard(path, tmp_path / "pq")
    shard(nulls, tmp_path / "jl")
    assert _same_splits(tmp_path / "pq", tmp_path / "jl")
    assert manifest.source.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest.source.rows == 300


def test_bad_parquet_rows_are_reported_by_row_number(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"t{i}"} for i in range(50)]
    rows[9] = {"text": ""}
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    manifest = shard(tmp_path / "t.parquet", tmp_path / "out", fmt="text", max_bad_rows=0.1)
    assert [(b.file, b.line, b.reason) for b in manifest.bad_rows.first] == [
        ("t.parquet", 10, "'text' is empty")
    ]


def test_json_array_gives_the_same_shards(rows_file, tmp_path: Path):
    rows, plain = rows_file
    array = tmp_path / "rows.json"
    array.write_text("\n  " + json.dumps(rows, indent=1))
    lines_json = tmp_path / "lines.json"  # a .json file may also hold JSON lines
    lines_json.write_bytes(plain.read_bytes())
    shard(plain, tmp_path / "plain")
    shard(array, tmp_path / "array")
    shard(lines_json, tmp_path / "lines")
    assert _same_splits(tmp_path / "plain", tmp_path / "array")
    assert _same_splits(tmp_path / "plain", tmp_path / "lines")


def test_a_json_array_that_is_not_valid_json_is_named(tmp_path: Path):
    path = tmp_path / "broken.json"
    path.write_text('[{"text": "a"}, {"text": ')
    with pytest.raises(ShardingError, match=r"broken\.json: not valid JSON"):
        shard(path, tmp_path / "out", fmt="text")
    assert MAX_JSON_ARRAY_BYTES >= 64 << 20  # small arrays load; larger must be JSON lines


def test_folder_reads_its_files_in_sorted_order(rows_file, tmp_path: Path):
    rows, plain = rows_file
    folder = tmp_path / "folder"
    (folder / "b").mkdir(parents=True)
    write_jsonl(folder / "a-1.jsonl", rows[:100])
    (folder / "a-2.jsonl.gz").write_bytes(
        gzip.compress(b"".join(canonical(r) for r in rows[100:200]))
    )
    write_jsonl(folder / "b" / "c.jsonl", rows[200:])
    (folder / "README.md").write_text("not data")
    (folder / ".hidden.jsonl").write_text("not json either\n")
    manifest = shard(folder, tmp_path / "from-folder")
    shard(plain, tmp_path / "from-file")
    assert _same_splits(tmp_path / "from-folder", tmp_path / "from-file")
    listing = "".join(
        f"{hashlib.sha256((folder / name).read_bytes()).hexdigest()}  {name}\n"
        for name in ("a-1.jsonl", "a-2.jsonl.gz", "b/c.jsonl")
    )
    assert manifest.source.sha256 == hashlib.sha256(listing.encode()).hexdigest()
    assert manifest.source.uri == str(folder) and manifest.source.rows == 300


def test_blank_lines_and_a_byte_order_mark_are_not_rows(tmp_path: Path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\n   \n{"text": "b"}\n{"text": "c"}')
    manifest = shard(path, tmp_path / "out", fmt="text", shards=1, eval_split=0.5, seed=0)
    assert manifest.source.rows == 3 and manifest.bad_rows.count == 0


# -- bad rows and errors -----------------------------------------------------------------------


def _with_bad_lines(tmp_path: Path, n: int, bad_at: dict[int, str]) -> Path:
    good = [json.dumps(r) for r in generate_rows("alpaca", n, seed=2)]
    lines = [bad_at.get(i, good[i - 1]) for i in range(1, n + 1)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_rows_are_counted_with_their_line_numbers(tmp_path: Path):
    path = _with_bad_lines(
        tmp_path, 1000, {3: "{not json", 40: '{"instruction": "x"}', 41: "[1]", 500: '"s"'}
    )
    manifest = shard(path, tmp_path / "out")
    assert manifest.bad_rows.count == 4
    first = manifest.bad_rows.first
    assert first[0].line == 3 and first[0].reason.startswith("not valid JSON: ")  # orjson's words
    assert [(b.line, b.reason) for b in first[1:]] == [
        (40, "missing 'output'"),
        (41, "row must be a JSON object, got an array"),
        (500, "row must be a JSON object, got a string"),
    ]
    assert {b.file for b in manifest.bad_rows.first} == {"mixed.jsonl"}
    assert manifest.source.rows == 1000
    assert sum(s.rows for s in manifest.shards) + manifest.eval.rows == 996


def test_only_the_first_bad_rows_are_listed(tmp_path: Path):
    path = _with_bad_lines(tmp_path, 200, {i: "nope" for i in range(2, 200, 4)})
    manifest = shard(path, tmp_path / "out", max_bad_rows=0.3)
    assert manifest.bad_rows.count == 50
    assert [b.line for b in manifest.bad_rows.first] == list(range(2, 80, 4))


def test_too_many_bad_rows_fail_with_the_file_count_threshold_and_lines(tmp_path: Path):
    path = _with_bad_lines(tmp_path, 100, {7: "{}", 8: "{}", 90: "oops"})
    out = tmp_path / "out"
    with pytest.raises(ShardingError) as failure:
        shard(path, out, max_bad_rows=0.02)
    message = str(failure.value)
    assert str(path) in message
    assert "3 of 100 rows (3.00%)" in message
    assert "max_bad_rows=0.02" in message
    assert "mixed.jsonl:7: missing 'instruction'" in message
    assert "mixed.jsonl:90: not valid JSON" in message
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [path]  # no partial folder left behind


def test_more_shards_than_training_rows(tmp_path: Path):
    path = tmp_path / "few.jsonl"
    write_jsonl(path, ({"text": f"r{i}"} for i in range(6)))
    with pytest.raises(ShardingError, match=r"few\.jsonl: \d training rows cannot fill 8 shards"):
        shard(path, tmp_path / "out", fmt="text", shards=8)
    assert not (tmp_path / "out").exists()


def test_an_empty_eval_split_is_an_error(tmp_path: Path):
    path = tmp_path / "one.jsonl"
    write_jsonl(path, [{"text": "only"}] * 50)  # identical rows: all on one side
    fraction, seed = 0.5, 0
    salt = seed.to_bytes(8, "little")
    lands_in_eval = hashlib.blake2b(canonical({"text": "only"}), digest_size=8, salt=salt)
    if int.from_bytes(lands_in_eval.digest(), "big") < fraction * 2**64:
        seed = 1  # pick the seed that sends the row to training
    with pytest.raises(ShardingError, match="eval split is empty"):
        shard(path, tmp_path / "out", fmt="text", shards=1, eval_split=0.5, seed=seed)


def test_an_empty_input_is_an_error(tmp_path: Path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ShardingError, match=r"empty\.jsonl: no rows"):
        shard(path, tmp_path / "out")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fmt": "sharegpt"}, "format: unknown 'sharegpt'"),
        ({"shards": 0}, "shards: must be an integer >= 1, got 0"),
        ({"seed": "7"}, "seed: must be an integer, got '7'"),
        ({"eval_split": 1.0}, r"eval_split: a fraction must be in \(0, 1\), got 1.0"),
        ({"eval_split": 0}, r"eval_split: a fraction must be in \(0, 1\)"),
        ({"max_bad_rows": 1.5}, r"max_bad_rows: must be a fraction in \[0, 1\], got 1.5"),
    ],
)
def test_bad_arguments_are_named(alpaca_dataset: Path, tmp_path: Path, kwargs, message):
    with pytest.raises(ShardingError, match=message):
        shard(alpaca_dataset, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_bad_sources_are_named(tmp_path: Path):
    with pytest.raises(ShardingError, match=r"missing\.jsonl: no such file or folder"):
        shard(tmp_path / "missing.jsonl", tmp_path / "out")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ShardingError, match=r"data\.csv: unsupported file type"):
        shard(tmp_path / "data.csv", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardingError, match="folder holds no dataset files"):
        shard(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all\n")
    with pytest.raises(ShardingError, match=r"bad\.jsonl\.gz: not a valid gzip file"):
        shard(tmp_path / "bad.jsonl.gz", tmp_path / "out")
    (tmp_path / "bad.jsonl.zst").write_bytes(b"not zstd at all\n")
    with pytest.raises(ShardingError, match=r"bad\.jsonl\.zst: not a valid zstd file"):
        shard(tmp_path / "bad.jsonl.zst", tmp_path / "out")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(ShardingError, match=r"bad\.parquet: not a readable parquet file"):
        shard(tmp_path / "bad.parquet", tmp_path / "out")
    with pytest.raises(ShardingError, match="s3:// source needs an object store"):
        shard("s3://bucket/data.jsonl", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_non_empty_output_folder_is_refused(alpaca_dataset: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ShardingError, match="output folder exists and is not empty"):
        shard(alpaca_dataset, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    shard(alpaca_dataset, empty)  # an empty folder is fine
    assert (empty / MANIFEST).exists()


# -- an eval file instead of a fraction ------------------------------------------------------


def test_eval_file_is_its_own_split(synthetic_jsonl: Callable[..., Path], tmp_path: Path):
    train = synthetic_jsonl("chat", 120, seed=1)
    evals = synthetic_jsonl("chat", 30, seed=2)
    with evals.open("a") as f:
        f.write('{"messages": []}\n')
    manifest = shard(train, tmp_path / "out", fmt="chat", eval_split=evals, max_bad_rows=0.05)
    assert sum(s.rows for s in manifest.shards) == 120
    assert manifest.eval.rows == 30
    assert manifest.eval_split == str(evals)
    assert manifest.eval.source is not None and manifest.eval.source.rows == 31
    assert manifest.eval.source.sha256 == hashlib.sha256(evals.read_bytes()).hexdigest()
    assert [(b.file, b.line) for b in manifest.bad_rows.first] == [(evals.name, 31)]
    want = [canonical(r) for r in generate_rows("chat", 30, seed=2)]
    assert read_split(tmp_path / "out" / EVAL_NAME) == want
    with pytest.raises(ShardingError, match=r"1 of 31 rows .* above max_bad_rows=0.01"):
        shard(train, tmp_path / "strict", fmt="chat", eval_split=evals)
    with pytest.raises(ShardingError, match="no such file"):
        shard(train, tmp_path / "none", fmt="chat", eval_split=tmp_path / "nope.jsonl")


# -- the manifest and the folder it describes --------------------------------------------------


def test_tampered_files_and_manifests_are_caught(alpaca_dataset: Path, tmp_path: Path):
    out = tmp_path / "out"
    manifest = shard(alpaca_dataset, out)
    victim = out / shard_name(1)
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    with pytest.raises(ManifestError, match=r"shard-00001\.jsonl\.zst: does not match"):
        verify_files(out, manifest)
    victim.unlink()
    with pytest.raises(ManifestError, match=r"shard-00001\.jsonl\.zst: cannot read"):
        verify_files(out, manifest)
    text = json.loads((out / MANIFEST).read_text())
    text["shards"][0]["name"] = "../escape.zst"
    with pytest.raises(ManifestError, match="must be a plain file name"):
        Manifest.from_json(json.dumps(text))
    text["shards"][0]["name"] = "ok.zst"
    text["surprise"] = 1
    with pytest.raises(ManifestError, match="surprise"):
        Manifest.from_json(json.dumps(text))
    shutil.rmtree(out)
    with pytest.raises(ManifestError, match="cannot read the manifest"):
        load_manifest(out)


def test_progress_off_a_terminal_still_shards(alpaca_dataset: Path, tmp_path: Path):
    manifest = shard(alpaca_dataset, tmp_path / "out", progress=True)
    assert manifest.source.rows == 2000
