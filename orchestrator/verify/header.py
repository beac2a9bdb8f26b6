"""Parse a safetensors file's header without loading tensors and without trusting it.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length N, N bytes of UTF-8 JSON (an object: tensor key -> {dtype, shape, data_offsets}, plus
an optional "__metadata__" of strings), then the data section, where each tensor's
[begin, end) is relative to the section's start. `parse_header` reads at most 8 + N bytes,
N bounded by `max_header_bytes`, and accepts only a file whose tensors tile the data section
exactly: no gaps, no overlaps, no trailing bytes, each tensor's size matching its shape and
dtype. Anything else is refused with issues naming what was wrong; it never raises on the
file's content.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotune.orchestrator.verify.issues import Issue

#: Bytes per element of the dtypes a LoRA adapter may hold (safetensors' names).
ITEMSIZE: Mapping[str, int] = {"F32": 4, "F16": 2, "BF16": 2}
#: A LoRA header is ~120 bytes per tensor (a 70B model's 1,120 factors: ~140 KiB).
MAX_HEADER_BYTES = 1 << 20
#: LoRA factors are 2-D; a few more dimensions are allowed before the header is refused.
MAX_DIMS = 8
METADATA_KEY = "__metadata__"
_ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}
_LENGTH_BYTES = 8
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOLS = range(2, 6)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header declares it; begin/end are offsets into the data section."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A header that passed every check: its tensors tile the data section exactly."""

    header_bytes: int
    file_bytes: int
    tensors: Mapping[str, TensorEntry]
    metadata: Mapping[str, str]

    @property
    def data_start(self) -> int:
        """The file offset of the data section."""
        return _LENGTH_BYTES + self.header_bytes


@dataclass(frozen=True)
class HeaderCheck:
    """The parsed header (None unless it passed) and every issue found."""

    header: Header | None
    issues: tuple[Issue, ...]

    @property
    def ok(self) -> bool:
        return self.header is not None


class _Refused(Exception):
    """Stops parsing at the first structural fault; carries the issue."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(message)
        self.issue = Issue(where, message)


def parse_header(
    path: Path, *, max_tensors: int, max_header_bytes: int = MAX_HEADER_BYTES
) -> HeaderCheck:
    """Check the header of the safetensors file at `path` (reads no tensor data).

    `max_tensors` bounds the entries (the caller derives it from the key count it expects).
    """
    try:
        with open(path, "rb") as handle:
            file_bytes = os.fstat(handle.fileno()).st_size
            header_bytes, raw = _read_raw(handle, file_bytes, max_header_bytes)
        document = _decode(raw)
    except _Refused as refused:
        return HeaderCheck(None, (refused.issue,))
    except OSError as err:
        return HeaderCheck(None, (Issue("file", f"cannot be read: {err.strerror or err}"),))
    data_bytes = file_bytes - _LENGTH_BYTES - header_bytes
    issues: list[Issue] = []
    metadata = _metadata(document.pop(METADATA_KEY, {}), issues)
    if len(document) > max_tensors:
        issue = Issue(
            "header", f"declares {len(document)} tensors; at most {max_tensors} are expected"
        )
        return HeaderCheck(None, (issue,))
    entries = [e for key, value in document.items() if (e := _entry(key, value, issues))]
    if len(entries) == len(document):
        # With an entry refused, the tiling would only report its consequences (a gap).
        issues += _tiling(entries, data_bytes)
    if issues:
        return HeaderCheck(None, tuple(issues))
    tensors = {e.key: e for e in sorted(entries, key=lambda e: (e.begin, e.end))}
    return HeaderCheck(Header(header_bytes, file_bytes, tensors, metadata), ())


def _read_raw(handle: Any, file_bytes: int, limit: int) -> tuple[int, bytes]:
    head = handle.read(_LENGTH_BYTES)
    if head.startswith(_ZIP_MAGIC):
        raise _Refused(
            "file",
            "a pickle, not safetensors: a zip archive as torch.save writes it (pickled tensors "
            "inside); cotune never unpickles an upload. Save with safetensors instead "
            "(PEFT's save_pretrained does by default)",
        )
    if len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS:
        raise _Refused(
            "file",
            f"a pickle, not safetensors (pickle protocol {head[1]} magic bytes); cotune never "
            "unpickles an upload. Save with safetensors instead",
        )
    if len(head) < _LENGTH_BYTES:
        raise _Refused(
            "file",
            f"truncated: {file_bytes} bytes, but a safetensors file starts with an 8-byte "
            "header length",
        )
    (length,) = struct.unpack("<Q", head)
    if length > limit:
        raise _Refused(
            "header", f"declared length {length:,} bytes is over the limit of {limit:,} bytes"
        )
    if length > file_bytes - _LENGTH_BYTES:
        raise _Refused(
            "header",
            f"declared length {length:,} bytes, but only {file_bytes - _LENGTH_BYTES:,} bytes "
            "follow the length field (truncated file?)",
        )
    raw = handle.read(length)
    if len(raw) < length:
        raise _Refused("file", f"truncated while reading: {len(raw)} of {length} header bytes")
    return length, raw


def _decode(raw: bytes) -> dict[str, Any]:
    if not raw.startswith(b"{"):
        raise _Refused("header", "does not start with '{': not a safetensors JSON header")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _Refused("header", f"not valid UTF-8 (byte {err.start})") from None
    try:
        document = json.loads(text, object_pairs_hook=_object)
    except _Refused:
        raise
    except RecursionError:
        raise _Refused("header", "JSON nested too deeply") from None
    except ValueError as err:  # json.JSONDecodeError, and ints over Python's digit limit
        raise _Refused("header", f"not valid JSON: {err}") from None
    if not isinstance(document, dict):
        raise _Refused("header", f"expected a JSON object, got {type(document).__name__}")
    return document


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique and valid Unicode."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        # json.loads keeps the last of two equal keys silently; a reader that keeps the
        # first would see other tensors than the ones checked.
        if key in seen:
            raise _Refused("header", f"key {key!r} appears twice")
        # JSON escapes can spell unpaired surrogates, which no UTF-8 consumer of the key
        # (logs, the API's error body) could encode.
        if not key.isascii():
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:
                raise _Refused("header", f"key {key!r} is not valid Unicode") from None
        seen[key] = value
    return seen


def _metadata(value: Any, issues: list[Issue]) -> dict[str, str]:
    where = f"header.{METADATA_KEY}"
    if not isinstance(value, dict):
        issues.append(Issue(where, f"expected an object of strings, got {type(value).__name__}"))
        return {}
    bad = sorted(k for k, v in value.items() if not isinstance(v, str))
    if bad:
        issues.append(Issue(where, f"values must be strings; not for {', '.join(bad)}"))
    return {k: v for k, v in value.items() if isinstance(v, str)}


def _entry(key: str, value: Any, issues: list[Issue]) -> TensorEntry | None:
    """The entry, or None with the issues appended."""
    if not isinstance(value, dict):
        issues.append(Issue(key, f"expected an object, got {type(value).__name__}"))
        return None
    fields = set(value)
    if fields != _ENTRY_FIELDS:
        missing, extra = sorted(_ENTRY_FIELDS - fields), sorted(fields - _ENTRY_FIELDS)
        detail = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing)}" if missing else "",
                f"unexpected {', '.join(extra)}" if extra else "",
            )
            if part
        )
        issues.append(Issue(key, f"fields must be dtype, shape, data_offsets: {detail}"))
        return None
    found = len(issues)
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if dtype not in ITEMSIZE:
        issues.append(Issue(key, f"dtype {dtype!r}: expected one of {', '.join(ITEMSIZE)}"))
    if not _int_list(shape) or len(shape) > MAX_DIMS or any(d < 0 for d in shape):
        issues.append(
            Issue(key, f"shape {shape!r}: expected a list of at most {MAX_DIMS} integers >= 0")
        )
    if not _int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        issues.append(
            Issue(key, f"data_offsets {offsets!r}: expected [begin, end] with 0 <= begin <= end")
        )
    if len(issues) > found:
        return None
    begin, end = offsets
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != expected:
        issues.append(
            Issue(
                key,
                f"data_offsets [{begin}, {end}] span {end - begin} bytes, but shape {shape} of "
                f"{dtype} needs {expected}",
            )
        )
        return None
    return TensorEntry(key, dtype, tuple(shape), begin, end)


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    )


def _tiling(entries: list[TensorEntry], data_bytes: int) -> list[Issue]:
    """The entries cover [0, data_bytes) exactly, in some order, without overlap."""
    issues: list[Issue] = []
    cursor, previous = 0, "the start of the data section"
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.begin > cursor:
            issues.append(
                Issue(
                    entry.key,
                    f"starts at data byte {entry.begin}, a gap of {entry.begin - cursor} bytes "
                    f"after {previous} (byte {cursor}): tensors must be contiguous",
                )
            )
        elif entry.begin < cursor:
            issues.append(
                Issue(
                    entry.key,
                    f"data_offsets [{entry.begin}, {entry.end}] overlap the bytes before "
                    f"{previous} (byte {cursor})",
                )
            )
        if entry.end >= cursor:
            cursor, previous = entry.end, f"the end of {entry.key!r}"
    if cursor > data_bytes:
        issues.append(
            Issue(
                "file",
                f"tensors end at data byte {cursor}, but the data section holds {data_bytes} "
                "bytes (truncated file?)",
            )
        )
    elif cursor < data_bytes:
        issues.append(
            Issue(
                "file",
                f"{data_bytes - cursor} bytes after the last tensor; the file size must equal "
                f"8 + header ({data_bytes} data bytes, tensors cover {cursor})",
            )
        )
    return issues
