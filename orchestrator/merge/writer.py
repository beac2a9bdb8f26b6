"""A streaming safetensors writer: header first, then one tensor at a time, in a fixed order.

`safetensors.torch.save_file` needs every tensor in memory at once; a `cat` merge of 32
rank-16 adapters of a 7B model would hold gigabytes. The merge knows every output shape
before it computes anything, so it can write the header up front and stream the data.
Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length,
a JSON header of {name: {dtype, shape, data_offsets}} (padded with spaces to 8 bytes), then
the tensors' bytes back to back in offset order.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


@dataclass(frozen=True)
class TensorSlot:
    """A tensor the file will hold: its name, safetensors dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * DTYPES[self.dtype].itemsize


class StreamingSafetensorsWriter:
    """Writes `slots` in order; `write` each tensor, then `close` checks all arrived."""

    def __init__(self, path: Path, slots: Sequence[TensorSlot], metadata: dict[str, str]):
        self._slots = list(slots)
        self._next = 0
        header: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        for slot in self._slots:
            end = offset + slot.nbytes
            header[slot.name] = {
                "dtype": slot.dtype,
                "shape": list(slot.shape),
                "data_offsets": [offset, end],
            }
            offset = end
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._file: BinaryIO = path.open("wb")
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        slot = self._slots[self._next] if self._next < len(self._slots) else None
        if slot is None or slot.name != name:
            expected = slot.name if slot else "nothing more"
            raise ValueError(f"writer expected tensor {expected!r} next, got {name!r}")
        if tuple(tensor.shape) != slot.shape:
            raise ValueError(f"tensor {name!r} has shape {list(tensor.shape)}, not {slot.shape}")
        data = tensor.detach().to(DTYPES[slot.dtype]).contiguous().view(torch.uint8)
        self._file.write(data.numpy().data)  # little-endian on every platform torch ships
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._slots):
            raise ValueError(
                f"writer closed after {self._next} of {len(self._slots)} tensors; the file is "
                "incomplete"
            )

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
