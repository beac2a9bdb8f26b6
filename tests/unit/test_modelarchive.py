"""The staged base model archive (protocol/modelarchive.py): deterministic bytes, regular files
only, no way out of the folder, and a cache by sha256 that downloads once."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from cotune.orchestrator.protocol.modelarchive import (
    COMPLETE_MARKER,
    Member,
    ModelArchiveError,
    cached_model,
    folder_members,
    member_name,
    unpack_model,
    write_archive,
)

FILES = {
    "config.json": b'{"model_type": "llama"}\n',
    "model.safetensors": bytes(range(256)) * 64,
    "tokenizer/tokenizer.json": b'{"version": "1.0"}\n',
    "tokenizer/special_tokens_map.json": b"{}\n",
}


def make_folder(root: Path, files: dict[str, bytes] = FILES) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def pack(folder: Path, out: Path) -> tuple[str, int]:
    return write_archive(folder_members(folder), out)


def test_the_same_files_give_the_same_archive_whatever_their_metadata(tmp_path: Path) -> None:
    first = make_folder(tmp_path / "a")
    # The same files written in another order, with other times and permissions.
    second = make_folder(tmp_path / "b", dict(reversed(list(FILES.items()))))
    os.utime(second / "config.json", (1_700_000_000, 1_700_000_000))
    (second / "model.safetensors").chmod(0o600)
    sha_a, size_a = pack(first, tmp_path / "a.tar")
    sha_b, size_b = pack(second, tmp_path / "b.tar")
    assert (sha_a, size_a) == (sha_b, size_b)
    # The announced digest and size are the file's.
    data = (tmp_path / "a.tar").read_bytes()
    assert (hashlib.sha256(data).hexdigest(), len(data)) == (sha_a, size_a)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_the_archive_holds_sorted_relative_regular_files_with_neutral_metadata(
    tmp_path: Path,
) -> None:
    folder = make_folder(tmp_path / "m")
    (folder / ".git" / "lfs").mkdir(parents=True)  # a git clone's history is left out
    (folder / ".git" / "lfs" / "object").write_bytes(b"weights again")
    (folder / "empty").mkdir()
    pack(folder, tmp_path / "m.tar")
    with tarfile.open(tmp_path / "m.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == sorted(FILES)
        for m in members:
            assert m.isreg() and (m.mode, m.mtime, m.uid, m.gid) == (0o644, 0, 0, 0)
            assert (m.uname, m.gname) == ("", "")
            extracted = tar.extractfile(m)
            assert extracted is not None and extracted.read() == FILES[m.name]


@pytest.mark.parametrize(
    "change",
    [
        {"model.safetensors": bytes(range(256)) * 63 + bytes([1]) + bytes(range(1, 256))},
        {"config.json": b'{"model_type": "mistral"}\n'},
        {"tokenizer/extra.txt": b""},  # one file more, even an empty one
    ],
)
def test_different_content_gives_a_different_sha256(
    tmp_path: Path, change: dict[str, bytes]
) -> None:
    base, _ = pack(make_folder(tmp_path / "a"), tmp_path / "a.tar")
    changed, _ = pack(make_folder(tmp_path / "b", {**FILES, **change}), tmp_path / "b.tar")
    assert changed != base


def test_a_renamed_file_gives_a_different_sha256(tmp_path: Path) -> None:
    base, _ = pack(make_folder(tmp_path / "a"), tmp_path / "a.tar")
    renamed = {
        ("tokenizer/other.json" if k == "tokenizer/tokenizer.json" else k): v
        for k, v in FILES.items()
    }
    assert pack(make_folder(tmp_path / "b", renamed), tmp_path / "b.tar")[0] != base


@pytest.mark.parametrize("target", ["model.safetensors", "tokenizer", "/etc/hostname"])
def test_a_symbolic_link_is_refused_by_name(tmp_path: Path, target: str) -> None:
    folder = make_folder(tmp_path / "m")
    (folder / "tokenizer" / "link").symlink_to(folder / target if target[0] != "/" else target)
    with pytest.raises(ModelArchiveError, match=r"tokenizer/link is a symbolic link"):
        folder_members(folder)


def test_a_file_that_is_not_regular_is_refused(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "m")
    os.mkfifo(folder / "pipe")
    with pytest.raises(ModelArchiveError, match="pipe is not a regular file"):
        folder_members(folder)


def test_a_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelArchiveError, match="no such folder"):
        folder_members(tmp_path / "nothing")


@pytest.mark.parametrize(
    "name", ["../evil", "a/../../evil", "/etc/passwd", "a//b", "./a", "a/.", "a\\b", "a\nb", ""]
)
def test_no_member_name_can_leave_the_folder(tmp_path: Path, name: str) -> None:
    with pytest.raises(ModelArchiveError, match="not a plain relative path"):
        member_name(name)
    member = Member(name, 1, lambda: io.BytesIO(b"x"))
    with pytest.raises(ModelArchiveError):
        write_archive([member], tmp_path / "evil.tar")


def test_an_archive_that_points_outside_is_not_unpacked(tmp_path: Path) -> None:
    """A reader trusts no archive: one made by hand with a `..` member is refused."""
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(ModelArchiveError, match="cannot unpack"):
        unpack_model(evil, tmp_path / "out")
    assert not (tmp_path / "outside.txt").exists()


def test_a_file_that_changes_while_read_fails_the_archive(tmp_path: Path) -> None:
    short = Member("config.json", 10, lambda: io.BytesIO(b"{}"))
    with pytest.raises(ModelArchiveError, match="shorter than 10 bytes"):
        write_archive([short], tmp_path / "a.tar")
    long = Member("config.json", 2, lambda: io.BytesIO(b"{}{}"))
    with pytest.raises(ModelArchiveError, match="longer than 2 bytes"):
        write_archive([long], tmp_path / "b.tar")
    twice = [Member("a", 1, lambda: io.BytesIO(b"x"))] * 2
    with pytest.raises(ModelArchiveError, match="appears twice"):
        write_archive(twice, tmp_path / "c.tar")


def test_the_cache_downloads_once_and_finds_the_folder(tmp_path: Path) -> None:
    source = tmp_path / "source.tar"
    sha, _ = pack(make_folder(tmp_path / "m"), source)
    fetched: list[Path] = []

    def fetch(dest: Path) -> None:
        fetched.append(dest)
        shutil.copyfile(source, dest)

    models = tmp_path / "models"
    folder = cached_model(models, sha, fetch)
    assert folder == models / sha and (folder / COMPLETE_MARKER).is_file()
    assert (folder / "tokenizer" / "tokenizer.json").read_bytes() == FILES[
        "tokenizer/tokenizer.json"
    ]
    assert cached_model(models, sha, fetch) == folder
    assert len(fetched) == 1
    assert sorted(p.name for p in models.iterdir()) == [sha]  # no temporary folder left


def test_the_cache_replaces_a_copy_cut_short_and_finds_an_inner_folder(tmp_path: Path) -> None:
    inner = make_folder(tmp_path / "src" / "tiny-llama")
    archive = tmp_path / "inner.tar"
    with tarfile.open(archive, "w") as tar:  # the shape `tar -cf x.tar tiny-llama` makes
        tar.add(inner, arcname="tiny-llama")
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    models = tmp_path / "models"
    (models / sha).mkdir(parents=True)
    (models / sha / "half-written").write_text("x")  # no marker: a copy cut short
    folder = cached_model(models, sha, lambda dest: shutil.copyfile(archive, dest))
    assert folder == models / sha / "tiny-llama"
    assert not (models / sha / "half-written").exists()


def test_the_cache_refuses_a_digest_that_is_not_one(tmp_path: Path) -> None:
    with pytest.raises(ModelArchiveError, match="64 lowercase hex"):
        cached_model(tmp_path, "../" + "0" * 61, lambda dest: None)
