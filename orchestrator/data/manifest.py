"""The manifest of a sharded dataset: `manifest.json`, written next to the shards.

It names every output file with its rows, size and sha256, where the data came from, and
the bad rows that were skipped. `to_json()` is canonical (sorted keys, no timestamps), so
sharding the same input with the same seed gives a byte-identical manifest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cotune.orchestrator.protocol.formats import FormatName
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """A manifest, or the files it lists, is missing or does not match: names the file."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Count = Field(ge=0)
Sha256 = Field(pattern="^[0-9a-f]{64}$")


class SourceInfo(_Model):
    uri: str
    sha256: str = Sha256  # see orchestrator/data/datasource.py for folders and prefixes
    bytes: int = Count
    rows: int = Count  # items read: good rows plus bad rows


class SplitInfo(_Model):
    name: str
    rows: int = Count
    bytes: int = Count  # size of the compressed file
    sha256: str = Sha256  # of the compressed file
    tokens_estimate: int = Count  # a rough guess: canonical JSON bytes / 4

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        # The name becomes a path and an object key: no folders, nothing hidden.
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"must be a plain file name, got {name!r}")
        return name


class EvalInfo(SplitInfo):
    source: SourceInfo | None = None  # set when the eval split came from its own file


class BadRow(_Model):
    file: str
    line: int = Field(ge=1)  # JSON lines: the line; JSON array: the element; parquet: the row
    reason: str


class BadRows(_Model):
    count: int = Count
    first: list[BadRow]


class Manifest(_Model):
    """What sharding produced; `manifest.json` is its `to_json()`."""

    version: int = 1
    source: SourceInfo
    format: FormatName
    seed: int
    eval_split: float | str  # the fraction, or the eval file's uri
    shards: list[SplitInfo]
    eval: EvalInfo
    bad_rows: BadRows

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, *, origin: str = MANIFEST) -> Manifest:
        try:
            return cls.model_validate_json(text)
        except ValidationError as e:
            raise ManifestError(f"{origin}: not a valid sharding manifest:\n{e}") from None

    def files(self) -> list[SplitInfo]:
        return [*self.shards, self.eval]


def load_manifest(out_dir: Path) -> Manifest:
    """The manifest in a sharded folder; ManifestError naming the file if absent or invalid."""
    path = Path(out_dir) / MANIFEST
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ManifestError(f"{path}: cannot read the manifest: {e.strerror or e}") from None
    return Manifest.from_json(text, origin=str(path))


def verify_files(out_dir: Path, manifest: Manifest) -> None:
    """ManifestError unless every file of `manifest` is in `out_dir` with its size and sha256."""
    for info in manifest.files():
        path = Path(out_dir) / info.name
        try:
            digest = _file_sha256(path)
        except OSError as e:
            raise ManifestError(f"{path}: cannot read: {e.strerror or e}") from None
        if digest != info.sha256 or path.stat().st_size != info.bytes:
            raise ManifestError(f"{path}: does not match {MANIFEST} (size or sha256 differ)")


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()
