"""Hardware detection on this machine (CPU here; a GPU machine also runs tests/gpu)."""

from __future__ import annotations

import pytest
from cotune.worker.hardware import detect_hardware

torch = pytest.importorskip("torch", reason="hardware detection needs the worker extra")


def test_detects_this_machine() -> None:
    hardware = detect_hardware()
    assert hardware.cpu_count >= 1 and hardware.ram_bytes > 2**28
    assert len(hardware.devices) == torch.cuda.device_count()
    if hardware.devices:
        assert hardware.kind == "cuda"
        assert hardware.memory_bytes == hardware.devices[0].total_memory_bytes > 0
        assert hardware.bf16 == all(d.compute_capability >= (8, 0) for d in hardware.devices)
    else:
        assert hardware.kind == "cpu" and not hardware.bf16
        assert hardware.memory_bytes == hardware.ram_bytes
