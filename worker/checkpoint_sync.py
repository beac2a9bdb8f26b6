"""Training checkpoints to and from the object store: archive, background upload, unpack.

A checkpoint folder is packed into one tar archive (the wire protocol's checkpoint unit) on
the training thread, since the trainer may delete the folder once it has a newer one; the
upload runs on a background thread so training is blocked only for the packing. Only the
newest checkpoint matters: one that is superseded before its upload starts is dropped.
Each upload goes to a key not used before (fresh targets come with heartbeat answers), and
the heartbeat reports it to the coordinator. `flush` waits for the newest to be uploaded:
the SIGTERM path needs it before it gives the lease back.
"""

from __future__ import annotations

import logging
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cotune.orchestrator.protocol.modelarchive import unpack_tar
from cotune.orchestrator.protocol.wire import CheckpointRef
from cotune.worker.checkpoint import PICKLE_ONLY_FILES
from cotune.worker.heartbeat import Heartbeat
from cotune.worker.transfer import TransferCancelled, TransferError, Transfers

log = logging.getLogger(__name__)


def pack_checkpoint(folder: Path, archive: Path) -> Path:
    """Write `folder`'s regular files into an uncompressed tar with neutral metadata."""

    def neutral(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        return info

    partial = archive.with_name(archive.name + ".part")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(folder.rglob("*")):
            # Pickles the trainer never reads back must not leave this machine.
            if path.is_symlink() or not path.is_file() or path.name in PICKLE_ONLY_FILES:
                continue
            arcname = path.relative_to(folder).as_posix()
            tar.add(path, arcname=arcname, recursive=False, filter=neutral)
    partial.replace(archive)
    return archive


def unpack_archive(archive: Path, folder: Path) -> Path:
    """Extract a checkpoint archive (from any worker: untrusted) with the shared safe
    extraction; its size was bounded by the upload's policy. Raises ValueError."""
    return unpack_tar(archive, folder, label=f"archive {archive.name}")


@dataclass(frozen=True)
class _Packed:
    step: int
    archive: Path


class CheckpointSync:
    """Uploads checkpoints in the background; `latest` is the newest one the store holds."""

    def __init__(
        self,
        transfers: Transfers,
        heartbeat: Heartbeat,
        staging: Path,
        *,
        abort: threading.Event,
        target_wait_s: float = 30.0,
    ) -> None:
        self._transfers = transfers
        self._heartbeat = heartbeat
        self._staging = staging
        self._abort = abort
        self._target_wait_s = target_wait_s
        self._cond = threading.Condition()
        self._pending: _Packed | None = None
        self._busy: _Packed | None = None
        self._closed = False
        self._used_keys: set[str] = set()
        self.latest: CheckpointRef | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
        staging.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def submit(self, folder: Path, step: int) -> None:
        """Pack `folder` now (the trainer may delete it soon); upload in the background."""
        with self._cond:
            if self.latest is not None and step <= self.latest.step:
                return  # already in the store (a stop checkpoint at a periodic step)
        packed = _Packed(step, pack_checkpoint(folder, self._staging / f"ckpt-{step}.tar"))
        with self._cond:
            superseded = self._pending
            self._pending = packed
            self._cond.notify_all()
        if superseded is not None and superseded.archive != packed.archive:
            superseded.archive.unlink(missing_ok=True)

    def flush(self, timeout_s: float) -> CheckpointRef | None:
        """Wait until the newest submitted checkpoint is uploaded (or given up); the newest
        one in the store."""
        give_up_at = time.monotonic() + timeout_s
        with self._cond:
            while self._pending is not None or self._busy is not None:
                left = give_up_at - time.monotonic()
                if left <= 0 or self._closed:
                    log.warning("checkpoint upload not finished after %.0f s", timeout_s)
                    break
                self._cond.wait(left)
            return self.latest

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                item, self._pending, self._busy = self._pending, None, self._pending
            assert item is not None
            keep = False
            try:
                keep = not self._upload(item)
            except TransferCancelled:
                return
            finally:
                with self._cond:
                    if keep and self._pending is None and not self._closed:
                        self._pending = item  # no target yet: try again, unless superseded
                    else:
                        item.archive.unlink(missing_ok=True)
                    self._busy = None
                    self._cond.notify_all()
            if keep:
                self._abort.wait(1.0)

    def _upload(self, item: _Packed) -> bool:
        """True when done with `item` (uploaded, or failed for good); False to retry it."""
        target = self._heartbeat.checkpoint_target(
            self._used_keys, self._target_wait_s, cancel=self._abort
        )
        if target is None:
            if self._heartbeat.lost or self._abort.is_set():
                return True
            log.warning("checkpoint at step %d waits for an upload target", item.step)
            return False
        label = f"checkpoint step {item.step}"
        try:
            artifact = self._transfers.upload(target, item.archive, label=label, cancel=self._abort)
        except TransferCancelled:
            raise
        except TransferError as e:
            log.error("%s not uploaded: %s", label, e)
            return True
        self._used_keys.add(target.key)
        ref = CheckpointRef(step=item.step, archive=artifact)
        with self._cond:
            if self.latest is None or ref.step > self.latest.step:
                self.latest = ref
        self._heartbeat.report_checkpoint(ref)
        log.info("%s uploaded (%d bytes)", label, artifact.bytes)
        return True
