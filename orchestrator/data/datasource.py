"""Dataset inputs read as one stream: local files, folders and s3:// objects, sha256 on the way.

A source is one of:

- a local file: `.jsonl` / `.ndjson` (JSON lines), `.json` (JSON lines, or a JSON array when
  its first non-blank byte is `[`), `.parquet`; JSON files may be compressed (`.gz`, `.zst`);
- a local folder: every such file below it (recursively, hidden names skipped, other files
  ignored), in sorted order of their relative paths;
- `s3://bucket/key` (one object, streamed) or `s3://bucket/prefix/` (every supported object
  under the prefix, sorted), read through an ObjectStore bound to that bucket.

JSON lines stream with flat memory. A JSON array must be loaded whole, so it is accepted up
to MAX_JSON_ARRAY_BYTES (decompressed); convert larger ones to JSON lines. Parquet is read
with pyarrow's `iter_batches` (flat memory); its footer sits at the end, so a parquet object
on S3 is downloaded to a temporary file first.

`SourceInfo.sha256` is the sha256 of the file's bytes as stored (compressed, if it is) for a
single file; for a folder or prefix it is the sha256 of the lines `<sha256>  <relative
path>\\n` of its files in order, which is what `sha256sum` prints there.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

if TYPE_CHECKING:
    from cotune.orchestrator.data.objectstore import ObjectStore

MAX_JSON_ARRAY_BYTES = 256 * 1024 * 1024
READ_CHUNK = 1024 * 1024
PARQUET_BATCH_ROWS = 8192
_JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
_COMPRESSIONS = ("", ".gz", ".zst")
_ARRAY_SUFFIXES = tuple(".json" + c for c in _COMPRESSIONS)
SUPPORTED_SUFFIXES: tuple[str, ...] = (
    *(s + c for s in _JSON_SUFFIXES for c in _COMPRESSIONS),
    ".parquet",
)

OnBytes = Callable[[int], None]


class SourceError(ValueError):
    """A dataset input that cannot be read: the message names the file and what is wrong."""


@dataclass(frozen=True)
class FileRef:
    """One input file: where it is (a local path or a key in the store) and its name."""

    name: str  # relative to the source, for messages ("part-1.jsonl", "" for a single file)
    uri: str
    path: Path | None = None
    key: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class Part:
    """The items of one file: raw JSON lines (`kind="lines"`) or decoded rows (`"rows"`).

    Item i (from 1) is line i of a JSON lines file, element i of a JSON array, row i of a
    parquet file; that number is what bad-row reports call `line`.
    """

    file: str
    kind: Literal["lines", "rows"]
    items: Iterable[Any]


def suffix_of(name: str) -> str | None:
    """The supported suffix `name` ends with, or None."""
    lower = name.lower()
    # Longest first, so "x.jsonl.gz" is not taken for ".gz"-less ".jsonl".
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return suffix
    return None


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key`; SourceError when malformed."""
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise SourceError(f"{uri}: expected s3://bucket/key or s3://bucket/prefix/")
    return bucket, key


class _MeteredReader(io.RawIOBase):
    """Passes a byte stream through, feeding sha256, a byte count and a progress callback."""

    def __init__(self, raw: BinaryIO, on_bytes: OnBytes | None) -> None:
        super().__init__()
        self._raw = raw
        self._on_bytes = on_bytes
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        # read() rather than readinto(): object-store bodies do not all implement readinto.
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        if n:
            self.sha256.update(data)
            self.bytes += n
            if self._on_bytes is not None:
                self._on_bytes(n)
        return n

    def drain(self) -> None:
        """Read what is left (bytes after a JSON array's end), so the hash covers the file."""
        while self.readinto(bytearray(READ_CHUNK)):
            pass


@dataclass
class FileDigest:
    """What was read of one file: filled in when its part has been consumed."""

    name: str
    sha256: str = ""
    bytes: int = 0


class DataSource:
    """A resolved dataset input. `parts()` streams each file once, in order, and records
    each file's sha256 and size into `digests` as it finishes."""

    def __init__(self, source: str | Path, store: ObjectStore | None = None) -> None:
        self.store = store
        self.uri, self.files = _resolve(source, store)
        self.digests: list[FileDigest] = []

    @property
    def total_bytes(self) -> int | None:
        """Sum of the files' sizes when all are known (for a progress bar)."""
        sizes = [f.size for f in self.files]
        return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)

    def sha256(self) -> str:
        """sha256 of the source (see module docstring); valid once every part was consumed."""
        if len(self.files) == 1 and self.files[0].name == "":
            return self.digests[0].sha256
        listing = "".join(f"{d.sha256}  {d.name}\n" for d in self.digests)
        return hashlib.sha256(listing.encode()).hexdigest()

    def bytes_read(self) -> int:
        return sum(d.bytes for d in self.digests)

    def parts(self, on_bytes: OnBytes | None = None) -> Iterator[Part]:
        for ref in self.files:
            digest = FileDigest(ref.name or PurePosixPath(ref.uri).name)
            self.digests.append(digest)
            with ExitStack() as stack:
                if suffix_of(ref.uri) == ".parquet":
                    yield self._parquet_part(ref, digest, stack, on_bytes)
                else:
                    part, metered = self._json_part(ref, stack, on_bytes)
                    yield part
                    # Only after a full read (not when the consumer stopped on an error).
                    metered.drain()
                    digest.sha256, digest.bytes = metered.sha256.hexdigest(), metered.bytes

    def _open(self, ref: FileRef, stack: ExitStack) -> BinaryIO:
        if ref.path is not None:
            try:
                return stack.enter_context(ref.path.open("rb"))
            except OSError as e:
                raise SourceError(f"{ref.uri}: cannot read: {e.strerror or e}") from None
        assert self.store is not None and ref.key is not None
        stream = self.store.open_stream(ref.key)
        stack.callback(stream.close)
        return stream

    def _json_part(
        self, ref: FileRef, stack: ExitStack, on_bytes: OnBytes | None
    ) -> tuple[Part, _MeteredReader]:
        name = ref.name or PurePosixPath(ref.uri).name
        metered = _MeteredReader(self._open(ref, stack), on_bytes)
        stream: io.BufferedReader[Any] = io.BufferedReader(metered, READ_CHUNK)
        lower = ref.uri.lower()
        if lower.endswith(".gz"):
            stream = io.BufferedReader(_GzipChecked(ref.uri, stream), READ_CHUNK)
        elif lower.endswith(".zst"):
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
            stream = io.BufferedReader(_ZstdChecked(ref.uri, reader), READ_CHUNK)
        head = stream.peek(4)[:3]
        if head == b"\xef\xbb\xbf":  # a UTF-8 byte order mark would make line 1 invalid JSON
            stream.read(3)
        if suffix_of(lower) in _ARRAY_SUFFIXES and _first_non_blank(stream) == b"[":
            return Part(name, "rows", _json_array(ref.uri, stream)), metered
        return Part(name, "lines", stream), metered

    def _parquet_part(
        self, ref: FileRef, digest: FileDigest, stack: ExitStack, on_bytes: OnBytes | None
    ) -> Part:
        path = ref.path
        if path is None:  # parquet needs random access: stage the object in a temp file
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cotune-pq-")))
            path = tmp / "source.parquet"
            assert self.store is not None and ref.key is not None
            self.store.get_file(ref.key, path)
        # A separate sequential pass for the hash: pyarrow reads the file in random order.
        metered = _MeteredReader(stack.enter_context(path.open("rb")), on_bytes)
        metered.drain()
        digest.sha256, digest.bytes = metered.sha256.hexdigest(), metered.bytes
        return Part(digest.name, "rows", _parquet_rows(ref.uri, path))


def _first_non_blank(stream: io.BufferedReader[Any]) -> bytes:
    peeked = stream.peek(READ_CHUNK)
    stripped = peeked.lstrip()
    return stripped[:1]


class _GzipChecked(io.RawIOBase):
    """gzip reading whose errors name the file."""

    def __init__(self, uri: str, raw: io.BufferedReader[Any]) -> None:
        super().__init__()
        self._uri = uri
        self._gz = gzip.GzipFile(fileobj=raw, mode="rb")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            return self._gz.readinto(buffer)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise SourceError(f"{self._uri}: not a valid gzip file: {e}") from None


class _ZstdChecked(io.RawIOBase):
    """zstd reading whose errors name the file."""

    def __init__(self, uri: str, reader: Any) -> None:
        super().__init__()
        self._uri = uri
        self._reader = reader

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        import zstandard

        try:
            return int(self._reader.readinto(buffer))
        except zstandard.ZstdError as e:
            raise SourceError(f"{self._uri}: not a valid zstd file: {e}") from None


def _json_array(uri: str, stream: io.BufferedReader[Any]) -> Iterator[Any]:
    import orjson

    data = stream.read(MAX_JSON_ARRAY_BYTES + 1)
    if len(data) > MAX_JSON_ARRAY_BYTES:
        raise SourceError(
            f"{uri}: a JSON array larger than {MAX_JSON_ARRAY_BYTES >> 20} MiB cannot be "
            "streamed; convert it to JSON lines (one object per line, .jsonl)"
        )
    try:
        rows = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise SourceError(f"{uri}: not valid JSON: {e}") from None
    del data
    yield from rows


def _parquet_rows(uri: str, path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{uri}: not a readable parquet file: {e}") from None


def _resolve(source: str | Path, store: ObjectStore | None) -> tuple[str, list[FileRef]]:
    if isinstance(source, str) and source.startswith("s3://"):
        return source, _resolve_s3(source, store)
    path = Path(source)
    uri = str(path)
    if path.is_dir():
        files = []
        for child in sorted(path.rglob("*"), key=lambda p: p.relative_to(path).as_posix()):
            rel = child.relative_to(path).as_posix()
            hidden = any(part.startswith(".") for part in PurePosixPath(rel).parts)
            if child.is_file() and not hidden and suffix_of(rel) is not None:
                files.append(FileRef(rel, str(child), path=child, size=child.stat().st_size))
        if not files:
            raise SourceError(
                f"{uri}: folder holds no dataset files ({', '.join(SUPPORTED_SUFFIXES)})"
            )
        return uri, files
    if not path.exists():
        raise SourceError(f"{uri}: no such file or folder")
    if suffix_of(path.name) is None:
        raise SourceError(
            f"{uri}: unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    return uri, [FileRef("", uri, path=path, size=path.stat().st_size)]


def _resolve_s3(uri: str, store: ObjectStore | None) -> list[FileRef]:
    bucket, key = parse_s3_uri(uri)
    if store is None:
        raise SourceError(f"{uri}: an s3:// source needs an object store (none was given)")
    if bucket != store.bucket:
        raise SourceError(
            f"{uri}: the object store is bound to bucket {store.bucket!r}, not {bucket!r}"
        )
    if key.endswith("/"):
        listed = sorted(store.list(key), key=lambda o: o.key)
        files = [
            FileRef(o.key[len(key) :], f"s3://{bucket}/{o.key}", key=o.key, size=o.size)
            for o in listed
            if suffix_of(o.key) is not None
        ]
        if not files:
            raise SourceError(
                f"{uri}: prefix holds no dataset files ({len(listed)} objects, none with "
                f"a suffix in {', '.join(SUPPORTED_SUFFIXES)})"
            )
        return files
    if suffix_of(key) is None:
        raise SourceError(
            f"{uri}: unsupported object type; expected one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    info = store.head(key)
    if info is None:
        raise SourceError(f"{uri}: no such object")
    return [FileRef("", uri, key=key, size=info.size)]
