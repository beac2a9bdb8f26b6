"""Hostile safetensors files: each kind is refused by the header checks with an issue that
names it, without loading tensors and without raising."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from cotune.orchestrator.verify.expected import ExpectedAdapter
from cotune.orchestrator.verify.header import MAX_HEADER_BYTES, parse_header

from tests.unit.verify.conftest import forge, honest_tensors, layout, write_tensors

KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _issues(path: Path, max_tensors: int = 64) -> list[str]:
    check = parse_header(path, max_tensors=max_tensors)
    assert check.ok is (not check.issues)
    return [str(issue) for issue in check.issues]


def _one(path: Path, *needles: str, max_tensors: int = 64) -> str:
    issues = _issues(path, max_tensors)
    assert len(issues) == 1, issues
    for needle in needles:
        assert needle in issues[0], issues[0]
    return issues[0]


@pytest.fixture
def honest(tmp_path: Path, expected: ExpectedAdapter) -> Path:
    return write_tensors(tmp_path / "honest.safetensors", honest_tensors(expected))


def test_an_honest_file_parses_with_every_tensor(honest: Path, expected: ExpectedAdapter) -> None:
    check = parse_header(honest, max_tensors=len(expected.shapes))
    assert check.issues == ()
    assert check.header is not None
    assert set(check.header.tensors) == set(expected.shapes)
    assert {k: e.shape for k, e in check.header.tensors.items()} == dict(expected.shapes)
    assert check.header.metadata == {"format": "pt"}
    assert check.header.data_start + sum(
        e.end - e.begin for e in check.header.tensors.values()
    ) == os.path.getsize(honest)


def test_truncated_file(honest: Path, tmp_path: Path) -> None:
    raw = honest.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) - 10])
    _one(cut, "file:", "tensors end at data byte", "truncated file?")
    cut.write_bytes(raw[:5])
    _one(cut, "file:", "truncated: 5 bytes")
    cut.write_bytes(raw[:100])
    _one(cut, "header:", "only 92 bytes follow", "truncated file?")


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    _one(empty, "truncated: 0 bytes")


def test_random_garbage(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    garbage = tmp_path / "garbage.safetensors"
    refused = 0
    for _ in range(50):
        garbage.write_bytes(rng.bytes(int(rng.integers(0, 4096))))
        assert _issues(garbage), "random bytes passed as safetensors"
        refused += 1
    # Garbage with a plausible length field still fails on the JSON.
    garbage.write_bytes(struct.pack("<Q", 100) + rng.bytes(200))
    message = " ".join(_issues(garbage))
    assert "header" in message
    print(f"{refused} random files refused")


def test_header_bomb(tmp_path: Path) -> None:
    """A declared length far over the limit is refused before anything is read."""
    bomb = forge(tmp_path / "bomb.safetensors", b"{}", b"", length=1 << 62)
    _one(bomb, "header:", f"over the limit of {MAX_HEADER_BYTES:,} bytes")
    # A file that is really that big is refused the same way (sparse: no disk used).
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as handle:
        handle.write(struct.pack("<Q", 2 * MAX_HEADER_BYTES))
        handle.truncate(3 * MAX_HEADER_BYTES)
    _one(big, "over the limit")


def test_too_many_tensors(tmp_path: Path) -> None:
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(65)}
    _one(forge(tmp_path / "many.safetensors", header, b""), "declares 65 tensors; at most 64")


def test_pickle_bytes(tmp_path: Path) -> None:
    path = tmp_path / "adapter_model.safetensors"
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        path.write_bytes(pickle.dumps({"lora_A": [1.0, 2.0]}, protocol=protocol))
        _one(path, "file:", "a pickle, not safetensors", f"protocol {protocol}")


def test_a_torch_bin_zip(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="writing a .bin checkpoint needs torch")
    path = tmp_path / "adapter_model.bin"
    torch.save({KEY_A: torch.zeros(3, 16)}, path)
    _one(path, "file:", "a pickle, not safetensors", "zip archive")


def test_header_not_json_or_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    _one(forge(path, b'{"a": ', b""), "header:", "not valid JSON")
    _one(forge(path, b'{"\xff\xfe": 1}', b""), "header:", "not valid UTF-8")
    _one(forge(path, b"[1, 2]", b""), "header:", "does not start with '{'")
    _one(forge(path, b"{" * 4096, b""), "header:")  # nesting: JSON error or too deep
    _one(forge(path, b'{"a": ' + b"9" * 5000 + b"}", b""), "header:", "not valid JSON")


def test_duplicate_keys(tmp_path: Path) -> None:
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    raw = f'{{"{KEY_A}": {entry}, "{KEY_A}": {entry}}}'.encode()
    _one(forge(tmp_path / "dup.safetensors", raw, b"\0" * 4), "appears twice")


def test_unpaired_surrogate_key(tmp_path: Path) -> None:
    raw = b'{"\\ud800": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'
    _one(forge(tmp_path / "s.safetensors", raw, b""), "not valid Unicode")


def test_metadata_must_be_strings(honest: Path, tmp_path: Path) -> None:
    header, data = layout(honest)
    header["__metadata__"] = {"format": "pt", "steps": 10}
    _one(forge(tmp_path / "m.safetensors", header, data), "header.__metadata__:", "steps")


@pytest.mark.parametrize("dtype", ["I32", "F64", "U8", "I64", "BOOL"])
def test_wrong_dtype(honest: Path, tmp_path: Path, dtype: str) -> None:
    header, data = layout(honest)
    header[KEY_A]["dtype"] = dtype
    issue = _one(forge(tmp_path / "d.safetensors", header, data), KEY_A, f"dtype '{dtype}'")
    assert "F32, F16, BF16" in issue


def test_overlapping_offsets(honest: Path, tmp_path: Path) -> None:
    header, data = layout(honest)
    entries = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )
    second = header[entries[1]]
    begin, end = second["data_offsets"]
    second["data_offsets"] = [begin - 4, end - 4]  # shifts into the first tensor
    issues = _issues(forge(tmp_path / "o.safetensors", header, data))
    assert any(entries[1] in i and "overlap" in i for i in issues), issues


def test_gapped_offsets(honest: Path, tmp_path: Path) -> None:
    header, data = layout(honest)
    entries = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )
    for key in entries[1:]:  # every tensor after the first moves 8 bytes on
        header[key]["data_offsets"] = [o + 8 for o in header[key]["data_offsets"]]
    first_end = header[entries[0]]["data_offsets"][1]
    gapped = data[:first_end] + b"\0" * 8 + data[first_end:]
    issue = _one(forge(tmp_path / "g.safetensors", header, gapped), entries[1], "a gap of 8 bytes")
    assert "contiguous" in issue


def test_trailing_bytes(honest: Path, tmp_path: Path) -> None:
    header, data = layout(honest)
    _one(forge(tmp_path / "t.safetensors", header, data + b"x" * 12), "12 bytes after the last")


def test_span_does_not_match_shape(honest: Path, tmp_path: Path) -> None:
    header, data = layout(honest)
    header[KEY_A]["shape"] = [3, 15]
    issues = _issues(forge(tmp_path / "s.safetensors", header, data))
    assert any(KEY_A in i and "needs 180" in i for i in issues), issues


@pytest.mark.parametrize(
    ("field", "value"),
    [("shape", [3, -16]), ("shape", [3, 16.0]), ("shape", "3x16"), ("data_offsets", [8, 4])],
)
def test_malformed_entries(
    honest: Path, tmp_path: Path, field: str, value: object, expected: ExpectedAdapter
) -> None:
    header, data = layout(honest)
    header[KEY_A][field] = value
    issues = _issues(forge(tmp_path / "e.safetensors", header, data))
    assert any(i.startswith(KEY_A) and field in i for i in issues), issues


def test_entry_with_extra_fields(honest: Path, tmp_path: Path) -> None:
    header, data = layout(honest)
    header[KEY_A]["exec"] = "rm -rf /"
    _one(forge(tmp_path / "x.safetensors", header, data), KEY_A, "unexpected exec")


def test_missing_file_is_an_issue(tmp_path: Path) -> None:
    _one(tmp_path / "absent.safetensors", "file:", "cannot be read")


def test_header_padding_is_allowed(honest: Path, tmp_path: Path) -> None:
    """safetensors pads its header with spaces to an 8-byte boundary: that is valid."""
    header, data = layout(honest)
    raw = json.dumps(header).encode() + b" " * 5
    assert _issues(forge(tmp_path / "p.safetensors", raw, data)) == []
