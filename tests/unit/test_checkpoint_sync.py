"""Checkpoint archives: what leaves the machine, and what an untrusted archive may not do."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from cotune.worker.checkpoint_sync import pack_checkpoint, unpack_archive


def test_pack_then_unpack_gives_the_same_files_without_pickles(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-4"
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"\x00weights")
    (folder / "trainer_state.json").write_text('{"global_step": 4}')
    (folder / "sub" / "extra.json").write_text("{}")
    (folder / "training_args.bin").write_bytes(b"pickle")  # never read back: never shipped
    (folder / "link").symlink_to(folder / "trainer_state.json")

    archive = pack_checkpoint(folder, tmp_path / "ckpt.tar")
    out = unpack_archive(archive, tmp_path / "out")

    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["adapter_model.safetensors", "sub/extra.json", "trainer_state.json"]
    assert (out / "adapter_model.safetensors").read_bytes() == b"\x00weights"


def test_the_same_folder_packs_to_the_same_bytes(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "a.json").write_text("1")
    first = pack_checkpoint(folder, tmp_path / "1.tar").read_bytes()
    (folder / "a.json").touch()  # a new mtime must not change the archive
    assert pack_checkpoint(folder, tmp_path / "2.tar").read_bytes() == first


def _archive_with(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    return path


def test_an_archive_cannot_climb_out_of_its_folder(tmp_path: Path) -> None:
    archive = _archive_with(tmp_path, tarfile.TarInfo("../escaped.txt"), b"x")
    with pytest.raises(ValueError, match="cannot unpack"):
        unpack_archive(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


def test_absolute_names_land_inside_the_folder(tmp_path: Path) -> None:
    archive = _archive_with(tmp_path, tarfile.TarInfo("/tmp/cotune-test-escape"), b"x")
    out = unpack_archive(archive, tmp_path / "out")
    assert (out / "tmp" / "cotune-test-escape").read_bytes() == b"x"
    assert not Path("/tmp/cotune-test-escape").exists()


def test_an_archive_cannot_plant_a_link_out(tmp_path: Path) -> None:
    link = tarfile.TarInfo("adapter_model.safetensors")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    with pytest.raises(ValueError, match="cannot unpack"):
        unpack_archive(_archive_with(tmp_path, link), tmp_path / "out")


def test_a_broken_archive_is_refused(tmp_path: Path) -> None:
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(ValueError, match=r"broken\.tar: cannot unpack"):
        unpack_archive(broken, tmp_path / "out")
