"""One output file of sharding (a shard or the eval split): a zstd stream, hashed as written.

The splitter (sharding.py) appends canonical lines to `buffer` and calls `flush` once it
holds FLUSH_BYTES; `close` ends the stream and says what was written (a SplitInfo for the
manifest). zstd level ZSTD_LEVEL, single-threaded, checksum on, streamed, so frames carry
no content size and the same lines always give the same bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cotune.orchestrator.data.manifest import SplitInfo

ZSTD_LEVEL = 3
BYTES_PER_TOKEN = 4  # rough: English BPE tokenizers average about four bytes per token


class SplitWriter:
    """One output file: a zstd stream, hashed as it is written."""

    def __init__(self, path: Path) -> None:
        import zstandard

        self.path = path
        self._file = path.open("wb")
        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, threads=0)
        self._zstd = cctx.compressobj()
        self._sha = hashlib.sha256()
        self.buffer = bytearray()
        self.rows = 0
        self.raw_bytes = 0
        self.bytes = 0

    def _emit(self, data: bytes) -> None:
        if data:
            self._sha.update(data)
            self._file.write(data)
            self.bytes += len(data)

    def flush(self) -> None:
        self.raw_bytes += len(self.buffer)
        self._emit(self._zstd.compress(self.buffer))
        self.buffer.clear()

    def close(self) -> SplitInfo:
        self.flush()
        self._emit(self._zstd.flush())
        self._file.close()
        return SplitInfo(
            name=self.path.name,
            rows=self.rows,
            bytes=self.bytes,
            sha256=self._sha.hexdigest(),
            tokens_estimate=self.raw_bytes // BYTES_PER_TOKEN,
        )

    def abort(self) -> None:
        self._file.close()
