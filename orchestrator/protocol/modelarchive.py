"""A staged base model's archive: one tar of a Hugging Face folder, and its cache by sha256.

The coordinator packs a spec's s3:// or local-folder base model into one archive
(pipeline/modelstage.py) and stores it at models/<sha256>/model.tar; workers (worker/inputs.py)
and the coordinator's own evaluation (pipeline/roundmerge.py) download it and unpack it
into `<models>/<sha256>/`, so a second task on the same model finds it there.

The archive is deterministic, so the same files give the same bytes and the same sha256
(hence one stored copy however many jobs use the model): members sorted by name, regular
files only (mode 0644, mtime 0, uid/gid 0, no owner names), PAX format, names relative to
the folder. Packing refuses symbolic links, anything that is not a regular file or a
folder, and names that could leave the folder (absolute, `..`, empty parts); unpacking
uses tarfile's "data" filter as well, since a reader trusts no archive.

    sha256, size = write_archive(folder_members(Path("llama-3b")), Path("model.tar"))
    folder = cached_model(models, sha256, lambda dest: download(url, dest))
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

MODEL_ARCHIVE = "model.tar"
CONFIG_FILE = "config.json"
COMPLETE_MARKER = ".complete"  # in <models>/<sha256>/: the unpacked copy is whole
# Left out of a local folder: a git clone's history (LFS objects: the weights a second
# time) and huggingface-cli's download bookkeeping.
SKIPPED_FOLDERS = frozenset({".git", ".cache"})
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


class ModelArchiveError(ValueError):
    """A folder that cannot be packed, or an archive that cannot be unpacked; the message
    names the file and says what was wrong."""


@dataclass(frozen=True)
class Member:
    """One file of the archive: its name in the folder, its size, how to read it."""

    name: str
    size: int
    open: Callable[[], IO[bytes]]


def member_name(name: str) -> str:
    """`name` if it is a safe relative path inside the folder (a/b.json); ModelArchiveError
    otherwise (absolute, `..` or `.` parts, empty parts, backslashes, control characters)."""
    parts = name.split("/")
    if (
        not name
        or "\\" in name
        or not name.isprintable()
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise ModelArchiveError(f"{name!r} is not a plain relative path inside the folder")
    return name


def folder_members(folder: Path) -> list[Member]:
    """The regular files of a local folder as members, sorted; ModelArchiveError for a
    missing folder, a symbolic link or a file of another kind (a socket, a device)."""
    if not folder.is_dir():
        raise ModelArchiveError(f"{folder}: no such folder")
    members = []
    for root, dirs, files in os.walk(folder, onerror=_unreadable):
        here = Path(root)
        if here == folder:
            dirs[:] = [d for d in dirs if d not in SKIPPED_FOLDERS]
        for name in sorted(dirs) + sorted(files):
            path = here / name
            info = path.lstat()
            rel = path.relative_to(folder).as_posix()
            if stat.S_ISLNK(info.st_mode):
                raise ModelArchiveError(
                    f"{rel} is a symbolic link: only regular files are staged (a Hugging Face "
                    "cache snapshot is links; `huggingface-cli download --local-dir DIR` "
                    "writes a folder of files)"
                )
            if stat.S_ISDIR(info.st_mode):
                continue
            if not stat.S_ISREG(info.st_mode):
                raise ModelArchiveError(f"{rel} is not a regular file")
            members.append(Member(member_name(rel), info.st_size, _opener(path)))
    return sorted(members, key=lambda m: m.name)


def write_archive(members: Iterable[Member], out: Path) -> tuple[str, int]:
    """Write the deterministic archive of `members` to `out`; its (sha256, size).

    Files stream through in chunks (nothing is held whole in memory). A member whose
    content is not exactly its announced size fails (ModelArchiveError: it changed while
    read); its reader's own errors (OSError, a store's errors) pass through."""
    ordered = sorted(members, key=lambda m: m.name)
    names = [member_name(m.name) for m in ordered]
    twice = sorted({a for a, b in itertools.pairwise(names) if a == b})
    if twice:
        raise ModelArchiveError(f"{twice[0]!r} appears twice")
    with out.open("wb") as raw:
        sink = _Hashing(raw)
        with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for member in ordered:
                info = tarfile.TarInfo(member.name)
                info.size, info.mode, info.mtime = member.size, 0o644, 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with member.open() as stream:
                    tar.addfile(info, _Exact(stream, member))
                    if stream.read(1):
                        raise ModelArchiveError(
                            f"{member.name} changed while read: longer than {member.size} bytes"
                        )
    return sink.digest.hexdigest(), sink.size


def model_folder(root: Path) -> Path:
    """The Hugging Face folder in an unpacked archive: `root` itself when it holds
    config.json, else its one subfolder that does."""
    if (root / CONFIG_FILE).is_file():
        return root
    inner = [p for p in root.iterdir() if (p / CONFIG_FILE).is_file()]
    if len(inner) != 1:
        raise ModelArchiveError("base model archive: no Hugging Face folder (config.json) inside")
    return inner[0]


def cached_model(models: Path, sha256: str, fetch: Callable[[Path], Any]) -> Path:
    """The Hugging Face folder of the archive with this sha256, unpacked under
    `<models>/<sha256>/`; `fetch(dest)` downloads the archive to `dest` (verified) first if
    no whole copy is there.

    Safe under concurrency (merges run side by side): each caller unpacks into a private
    temporary folder and renames it into place; a caller that loses the race drops its copy.
    """
    if not _SHA256.fullmatch(sha256):
        raise ModelArchiveError(f"model sha256 {sha256!r} is not 64 lowercase hex digits")
    final = models / sha256
    if not (final / COMPLETE_MARKER).is_file():
        models.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{sha256[:12]}-", dir=models))
        try:
            archive = tmp / MODEL_ARCHIVE
            fetch(archive)
            unpack_model(archive, tmp / "model")
            (tmp / "model" / COMPLETE_MARKER).touch()
            if final.exists() and not (final / COMPLETE_MARKER).is_file():
                shutil.rmtree(final, ignore_errors=True)  # a copy cut short before
            try:
                os.rename(tmp / "model", final)
            except OSError:
                if not (final / COMPLETE_MARKER).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return model_folder(final)


def unpack_model(archive: Path, folder: Path) -> Path:
    """Extract a model archive into `folder` (see `unpack_tar`)."""
    return unpack_tar(archive, folder, label="base model archive")


def unpack_tar(archive: Path, folder: Path, *, label: str) -> Path:
    """Extract an untrusted tar archive (a staged model, a checkpoint from any worker) into
    `folder` with the "data" filter: no absolute paths, `..`, links out of the folder,
    devices or odd permissions. ModelArchiveError (a ValueError) names `label`."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:") as tar:
            tar.extractall(folder, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise ModelArchiveError(f"{label}: cannot unpack ({exc})") from None
    return folder


def _opener(path: Path) -> Callable[[], IO[bytes]]:
    return lambda: path.open("rb")


def _unreadable(exc: OSError) -> None:
    raise ModelArchiveError(f"cannot read {exc.filename}: {exc.strerror or exc}")


class _Exact:
    """A member's stream read in full-sized chunks, failing if it ends before its size."""

    def __init__(self, stream: IO[bytes], member: Member) -> None:
        self.stream, self.member, self.left = stream, member, member.size

    def read(self, n: int = -1) -> bytes:
        want = self.left if n < 0 else min(n, self.left)
        chunks, got = [], 0
        while got < want:
            chunk = self.stream.read(want - got)
            if not chunk:
                raise ModelArchiveError(
                    f"{self.member.name} changed while read: shorter than {self.member.size} bytes"
                )
            chunks.append(chunk)
            got += len(chunk)
        self.left -= got
        return b"".join(chunks)


class _Hashing:
    """A write-only file that hashes and counts what passes through it to `raw`."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.size
