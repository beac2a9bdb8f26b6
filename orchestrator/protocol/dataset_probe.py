"""A quick look at local dataset files before a job starts: their rows, and whether they fit.

Used by spec checking (`cotune validate`), so it runs on the submitter's base install: stdlib
only, with pyarrow (parquet) and zstandard (.zst) imported lazily and skipped with a note when
missing. It reads the same inputs as orchestrator/data/datasource.py (which does the real, streamed
read at sharding time): .jsonl/.ndjson/.json, optionally .gz/.zst, and .parquet; a folder
means every such file below it, hidden names skipped.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cotune.orchestrator.protocol.formats import row_checker

_JSON = (".jsonl", ".ndjson", ".json")
DATA_SUFFIXES: tuple[str, ...] = (*(s + c for s in _JSON for c in ("", ".gz", ".zst")), ".parquet")
SAMPLE_ROWS = 1000
MAX_JSON_ARRAY_BYTES = 256 * 1024 * 1024


@dataclass
class Probe:
    """What a look at one location found: rows (None: not all counted), problems and notes."""

    rows: int | None = 0
    errors: list[str] = field(default_factory=list)
    format_errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _Skip(Exception):
    """A file this install cannot read (a missing optional package): noted, not an error."""


def suffix_of(name: str) -> str | None:
    lower = name.lower()
    return next(
        (s for s in sorted(DATA_SUFFIXES, key=len, reverse=True) if lower.endswith(s)), None
    )


def dataset_files(folder: Path) -> list[Path]:
    """The dataset files below `folder`, in name order; hidden names skipped."""
    return [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and suffix_of(p.name)
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]


def probe(path: Path, fmt: str, max_bad_rows: float) -> Probe:
    """Count the rows at `path` (file or folder) and check a sample of them against `fmt`."""
    result = Probe()
    if not path.exists():
        result.errors.append(f"no such file or folder: {path}")
        result.rows = None
        return result
    if path.is_dir():
        files = dataset_files(path)
        if not files:
            result.errors.append(f"{path} holds no dataset files ({', '.join(DATA_SUFFIXES)})")
    elif suffix_of(path.name) is None:
        result.errors.append(
            f"{path.name}: expected one of {', '.join(DATA_SUFFIXES)}, or a folder"
        )
        files = []
    else:
        files = [path]
    if result.errors:
        result.rows = None
        return result
    check = row_checker(fmt)
    for file in files:
        try:
            count, bad, sampled, first_bad, broken = _scan(file, check)
        except _Skip as skip:
            result.notes.append(f"{file.name}: rows not counted ({skip})")
            result.rows = None
            continue
        except Exception as exc:  # gzip, zstd, pyarrow and json each raise their own kinds
            result.errors.append(f"cannot read {file.name}: {exc}")
            result.rows = None
            continue
        if result.rows is not None:
            result.rows += count
        if sampled and bad / sampled > max_bad_rows:
            # Rows that are not even JSON are the file's fault; parsed rows that do not fit
            # are most often the wrong dataset.format.
            (result.errors if broken else result.format_errors).append(
                f"{bad} of the first {sampled} rows of {file.name} do not fit format {fmt} "
                f"(more than dataset.max_bad_rows {max_bad_rows:g}); {first_bad}"
            )
    return result


def _scan(file: Path, check: Any) -> tuple[int, int, int, str, bool]:
    """(rows, bad rows in the sample, rows sampled, the first bad row, any invalid JSON)."""
    if suffix_of(file.name) == ".parquet":
        total, sample = _parquet_sample(file)
        rows: Iterator[tuple[int, Any]] = enumerate(sample, start=1)
    else:
        total, rows = None, _json_rows(file)
    count = bad = 0
    first_bad, broken = "", False
    for number, row in rows:
        count += 1
        if count > SAMPLE_ROWS:
            continue  # beyond the sample: only counted
        if isinstance(row, ValueError):
            why, broken = f"not valid JSON ({row})", True
        else:
            why = check(row)
        if why:
            bad += 1
            first_bad = first_bad or f"row {number}: {why}"
    sampled = min(count, SAMPLE_ROWS)
    return (count if total is None else total), bad, sampled, first_bad, broken


def _json_rows(file: Path) -> Iterator[tuple[int, Any]]:
    """(line number, or index from 1 in a JSON array; the parsed row or its JSON error)."""
    suffix = suffix_of(file.name) or ""
    with _open(file, suffix) as stream:
        # A .json file is a JSON array when it starts with "[", else JSON lines.
        array_ok = suffix.startswith(".json") and not suffix.startswith(".jsonl")
        if array_ok and stream.peek(4096)[:4096].lstrip()[:1] == b"[":
            data = stream.read(MAX_JSON_ARRAY_BYTES + 1)
            if len(data) > MAX_JSON_ARRAY_BYTES:
                raise ValueError("a JSON array above 256 MiB; convert it to JSON lines")
            yield from enumerate(json.loads(data), start=1)
            return
        for number, line in enumerate(stream, start=1):
            if line.strip():
                yield number, _json_or_error(line)


def _open(file: Path, suffix: str) -> io.BufferedReader:
    raw = file.open("rb")
    if suffix.endswith(".gz"):
        return io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"))
    if suffix.endswith(".zst"):
        try:
            import zstandard  # lazy: not in the submitter's base install
        except ImportError:
            raw.close()
            raise _Skip("zstandard not installed") from None
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return io.BufferedReader(reader)
    return io.BufferedReader(raw)


def _json_or_error(line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError as exc:
        return exc


def _parquet_sample(file: Path) -> tuple[int, list[dict[str, Any]]]:
    """(rows, from the footer; the first SAMPLE_ROWS rows decoded)."""
    try:
        import pyarrow.parquet as pq  # lazy: not in the submitter's base install
    except ImportError:
        raise _Skip("pyarrow not installed") from None
    parquet = pq.ParquetFile(file)
    sample = next(parquet.iter_batches(batch_size=SAMPLE_ROWS), None)
    return parquet.metadata.num_rows, sample.to_pylist() if sample is not None else []


def sample_rows(path: Path, limit: int) -> list[Any]:
    """The first `limit` parsed rows of the dataset at `path` (a file or a folder, files in
    name order), for `cotune validate --tokenizer`; rows that are not JSON are left out (the
    format check counts them). ValueError naming the file when one cannot be read."""
    files = dataset_files(path) if path.is_dir() else [path]
    rows: list[Any] = []
    for file in files:
        if len(rows) >= limit:
            break
        try:
            if suffix_of(file.name) == ".parquet":
                import pyarrow.parquet as pq  # lazy: not in the submitter's base install

                batch = next(pq.ParquetFile(file).iter_batches(batch_size=limit), None)
                rows += batch.to_pylist()[: limit - len(rows)] if batch is not None else []
                continue
            for _number, row in _json_rows(file):
                if len(rows) >= limit:
                    break
                if not isinstance(row, ValueError):
                    rows.append(row)
        except (_Skip, ImportError) as exc:
            raise ValueError(f"cannot read {file.name} here: {exc}") from None
        except OSError as exc:
            raise ValueError(f"cannot read {file.name}: {exc}") from None
    return rows
