"""Deterministic streaming sharding of a dataset into K training shards and an eval split.

    shard_dataset("data.jsonl", fmt="alpaca", shards=4, eval_split=0.05, seed=0, out_dir=out)

The input (see orchestrator/data/datasource.py) is read once, as a stream. Every item is parsed
(orjson) and checked against the declared format (orchestrator/protocol/formats.py); an item
that is not valid JSON or does not fit is a bad row: counted, the first BAD_ROWS_KEPT kept
with their file and line, and skipped. A blank line is neither a row nor a bad row.

Each good row is written as its canonical line: `orjson.dumps(row, OPT_SORT_KEYS)` plus
"\\n" (UTF-8, compact, keys sorted, extra keys kept). Re-serializing costs ~0.15 us a row
and buys output that depends on the rows only, not on the input's key order, spacing or
container (the same rows from JSON lines, a JSON array or parquet give the same shards).
(orjson reads integers beyond 64 bits as floats: in practice only ever an id among the
extra keys, which training ignores.)

Where a row goes, with `seed` any integer (taken modulo 2**64 below):

1. Eval split (when `eval_split` is a fraction f): the row is an eval row iff
   `blake2b(canonical_line, digest_size=8, salt=(seed % 2**64).to_bytes(8, "little")).digest()`,
   read as a big-endian integer, is below `floor(f * 2**64)`. (A salted hash, not a keyed
   one: the key costs an extra compression per row, and independence across seeds is all
   this needs.) Membership depends on the row and the seed only, so it is stable when data
   is appended or reordered, and duplicates of a row all fall on the same side (no eval row
   leaks into training by duplication); the eval size is f of the rows in expectation.
   When `eval_split` is a path, every input row is a training row and that file, read and
   checked the same way, is the eval split.
2. Training row number t (0-based, in input order) goes to shard `t % K`: shards differ in
   size by at most one row and none is empty when there are at least K training rows.
   Appending data never moves an earlier row. Each shard is a stride sample of the input,
   so a sorted input still gives every shard its share of each part.

Outputs, in `out_dir`: `shard-00000.jsonl.zst` ... and `eval.jsonl.zst` (zstd streams, see
splitwriter.py) and `manifest.json` (sorted keys, no timestamps). The same input and seed
give byte-identical files. Memory stays flat in the input size: rows are never held; each
shard has one zstd context and a buffer of at most FLUSH_BYTES (about 3 MB a shard in all).
Output is written into a temporary sibling folder and renamed into place only on success,
so a failure leaves `out_dir` as it was. shardstore.py puts the result in the object store.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cotune.orchestrator.data.datasource import DataSource, Part, SourceError
from cotune.orchestrator.data.manifest import (
    MANIFEST,
    BadRow,
    BadRows,
    EvalInfo,
    Manifest,
    SourceInfo,
)
from cotune.orchestrator.data.splitwriter import SplitWriter
from cotune.orchestrator.protocol.formats import FORMATS, row_checker

if TYPE_CHECKING:
    from cotune.orchestrator.data.objectstore import ObjectStore

FLUSH_BYTES = 256 * 1024
BAD_ROWS_KEPT = 20
EVAL_NAME = "eval.jsonl.zst"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.jsonl.zst"


class ShardingError(ValueError):
    """Sharding cannot go on: the message says which input, what is wrong and what to do."""


# -- splitting ------------------------------------------------------------------------------


@dataclass
class _BadRowLog:
    count: int = 0

    def __post_init__(self) -> None:
        self.first: list[BadRow] = []

    def add(self, file: str, line: int, reason: str) -> None:
        self.count += 1
        if len(self.first) < BAD_ROWS_KEPT:
            self.first.append(BadRow(file=file, line=line, reason=reason))


@dataclass(frozen=True)
class _Router:
    """Sends each canonical line to the eval writer or the next shard (see module docs)."""

    eval_writer: SplitWriter | None
    shard_writers: list[SplitWriter]
    seed: int
    eval_fraction: float


def _split_part(
    part: Part, fmt: str, router: _Router, bad: _BadRowLog, train_seen: int
) -> tuple[int, int]:
    """Route every row of `part`; return (items read, training rows seen so far).

    The hot loop (about 2 us a row): everything it touches is a local name, and per row it
    only parses, checks, serializes, hashes once and appends to a buffer.
    """
    import orjson

    loads, dumps, decode_error = orjson.loads, orjson.dumps, orjson.JSONDecodeError
    options = orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE
    check = row_checker(fmt)
    blake2b, salt = hashlib.blake2b, (router.seed % 2**64).to_bytes(8, "little")
    # Comparing the big-endian digest bytes is comparing the integers, without converting.
    threshold = min(int(router.eval_fraction * 2**64), 2**64 - 1).to_bytes(8, "big")
    eval_writer = router.eval_writer
    eval_buffer = eval_writer.buffer if eval_writer is not None else None
    writers = router.shard_writers
    buffers = [w.buffer for w in writers]
    n_shards = len(writers)
    shard = train_seen % n_shards
    file, decode = part.file, part.kind == "lines"
    items = 0
    for line_no, item in enumerate(part.items, 1):
        if decode:
            try:
                row = loads(item)
            except decode_error as e:
                if item.isspace() or not item:
                    continue
                bad.add(file, line_no, f"not valid JSON: {e}")
                items += 1
                continue
        else:
            row = item
        items += 1
        reason = check(row)
        if reason is not None:
            bad.add(file, line_no, reason)
            continue
        try:
            canonical = dumps(row, option=options)
        except TypeError as e:  # parquet values JSON has no type for (bytes, dates)
            bad.add(file, line_no, f"cannot be written as JSON: {e}")
            continue
        if (
            eval_buffer is not None
            and blake2b(canonical, digest_size=8, salt=salt).digest() < threshold
        ):
            eval_buffer += canonical
            if len(eval_buffer) >= FLUSH_BYTES:
                eval_writer.flush()  # type: ignore[union-attr]
        else:
            buffer = buffers[shard]
            buffer += canonical
            if len(buffer) >= FLUSH_BYTES:
                writers[shard].flush()
            shard += 1
            if shard == n_shards:
                shard = 0
            train_seen += 1
    return items, train_seen


# -- the public API -------------------------------------------------------------------------


def shard_dataset(
    source: str | Path,
    *,
    fmt: str,
    shards: int,
    eval_split: float | str | Path,
    seed: int,
    out_dir: Path,
    max_bad_rows: float = 0.01,
    store: ObjectStore | None = None,
    progress: bool = False,
) -> Manifest:
    """Shard `source` into `out_dir` (see the module docstring); ShardingError on bad input.

    `eval_split` is a fraction in (0, 1) of the rows, or the path / s3:// uri of a separate
    eval file. `max_bad_rows` is the fraction of bad rows tolerated in each input file set.
    """
    _check_arguments(fmt, shards, eval_split, seed, max_bad_rows)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ShardingError(f"{out_dir}: output folder exists and is not empty")
    try:
        data = DataSource(source, store)
        eval_data = None
        if not isinstance(eval_split, float | int):
            eval_data = DataSource(
                eval_split if isinstance(eval_split, str) else Path(eval_split), store
            )
    except SourceError as e:
        raise ShardingError(str(e)) from None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        manifest = _shard_into(
            data, eval_data, fmt, shards, eval_split, seed, tmp, max_bad_rows, progress
        )
        (tmp / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _check_arguments(
    fmt: str, shards: int, eval_split: Any, seed: int, max_bad_rows: float
) -> None:
    if fmt not in FORMATS:
        raise ShardingError(f"format: unknown {fmt!r}; expected one of {', '.join(FORMATS)}")
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ShardingError(f"shards: must be an integer >= 1, got {shards!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ShardingError(f"seed: must be an integer, got {seed!r}")
    if not 0 <= max_bad_rows <= 1:
        raise ShardingError(f"max_bad_rows: must be a fraction in [0, 1], got {max_bad_rows!r}")
    if isinstance(eval_split, bool):
        raise ShardingError(f"eval_split: must be a fraction or a file, got {eval_split!r}")
    if isinstance(eval_split, float | int) and not 0 < eval_split < 1:
        raise ShardingError(
            f"eval_split: a fraction must be in (0, 1), got {eval_split!r} "
            "(the eval split is needed to score merged adapters)"
        )


def _shard_into(
    data: DataSource,
    eval_data: DataSource | None,
    fmt: str,
    shards: int,
    eval_split: float | str | Path,
    seed: int,
    out: Path,
    max_bad_rows: float,
    progress: bool,
) -> Manifest:
    fraction = float(eval_split) if eval_data is None else 0.0  # type: ignore[arg-type]
    writers = [SplitWriter(out / shard_name(i)) for i in range(shards)]
    eval_writer = SplitWriter(out / EVAL_NAME)
    bad = _BadRowLog()
    total = (data.total_bytes or 0) + (eval_data.total_bytes or 0 if eval_data else 0)
    try:
        with _progress_bar(progress, total) as on_bytes:
            router = _Router(eval_writer if eval_data is None else None, writers, seed, fraction)
            rows, train = _read_all(data, fmt, router, bad, on_bytes)
            _check_bad(data.uri, bad, bad.count, rows, max_bad_rows, fmt)
            for i, writer in enumerate(writers):  # round-robin: the first train % K get one more
                writer.rows = train // shards + (i < train % shards)
            if eval_data is None:
                eval_writer.rows = rows - bad.count - train
            eval_rows = 0
            if eval_data is not None:
                bad_before = bad.count
                eval_router = _Router(None, [eval_writer], seed, 0.0)
                eval_rows, eval_writer.rows = _read_all(eval_data, fmt, eval_router, bad, on_bytes)
                _check_bad(eval_data.uri, bad, bad.count - bad_before, eval_rows, max_bad_rows, fmt)
        if train < shards:
            raise ShardingError(
                f"{data.uri}: {train} training rows cannot fill {shards} shards; "
                "use fewer shards or more data"
            )
        if eval_writer.rows == 0:
            where = eval_data.uri if eval_data else f"eval_split={eval_split} of {rows} rows"
            raise ShardingError(
                f"{where}: the eval split is empty; it is needed to score merged adapters "
                "(raise eval_split or give an eval file with rows)"
            )
        shard_infos = [w.close() for w in writers]
        eval_info = EvalInfo(
            **eval_writer.close().model_dump(),
            source=_source_info(eval_data, eval_rows) if eval_data else None,
        )
    except BaseException:
        for w in [*writers, eval_writer]:
            w.abort()
        raise
    return Manifest(
        source=_source_info(data, rows),
        format=fmt,
        seed=seed,
        eval_split=fraction if eval_data is None else eval_data.uri,
        shards=shard_infos,
        eval=eval_info,
        bad_rows=BadRows(count=bad.count, first=bad.first),
    )


def _read_all(
    data: DataSource,
    fmt: str,
    router: _Router,
    bad: _BadRowLog,
    on_bytes: Callable[[int], None] | None,
) -> tuple[int, int]:
    rows = train = 0
    try:
        for part in data.parts(on_bytes):
            items, train = _split_part(part, fmt, router, bad, train)
            rows += items
    except SourceError as e:
        raise ShardingError(str(e)) from None
    if rows == 0:
        raise ShardingError(f"{data.uri}: no rows (the input is empty)")
    return rows, train


def _check_bad(uri: str, bad: _BadRowLog, count: int, rows: int, limit: float, fmt: str) -> None:
    if count <= limit * rows:
        return
    listed = "\n".join(f"  {b.file}:{b.line}: {b.reason}" for b in bad.first)
    raise ShardingError(
        f"{uri}: {count} of {rows} rows ({count / rows:.2%}) are not valid {fmt} rows, "
        f"above max_bad_rows={limit} ({limit:.2%}); fix the data or raise max_bad_rows. "
        f"First bad rows:\n{listed}"
    )


def _source_info(data: DataSource, rows: int) -> SourceInfo:
    return SourceInfo(uri=data.uri, sha256=data.sha256(), bytes=data.bytes_read(), rows=rows)


@contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Callable[[int], None] | None]:
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    columns = (
        TextColumn("sharding"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("read", total=total or None)
        yield lambda n: bar.advance(task, n)
