"""What this machine trains on: CUDA devices (name, memory, bf16), or the CPU fallback."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    total_memory_bytes: int
    compute_capability: tuple[int, int]
    bf16: bool


@dataclass(frozen=True)
class Hardware:
    """The accelerators a worker offers; no CUDA devices means CPU training (tests, CI)."""

    devices: tuple[CudaDevice, ...]
    cpu_count: int
    ram_bytes: int

    @property
    def kind(self) -> str:
        return "cuda" if self.devices else "cpu"

    @property
    def bf16(self) -> bool:
        """bf16 compute is available (every CUDA device supports it; CPU training uses fp32)."""
        return bool(self.devices) and all(d.bf16 for d in self.devices)

    @property
    def label(self) -> str:
        """What it trains on, for people: the GPUs' names, or "CPU (8 cores)"."""
        return ", ".join(d.name for d in self.devices) or f"CPU ({self.cpu_count} cores)"

    @property
    def memory_bytes(self) -> int:
        """Memory of the device training runs on: the first GPU's, else system RAM."""
        return self.devices[0].total_memory_bytes if self.devices else self.ram_bytes


def detect_hardware() -> Hardware:
    """Probe CUDA through torch and RAM through psutil."""
    import psutil
    import torch

    devices: list[CudaDevice] = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            capability = (props.major, props.minor)
            devices.append(
                CudaDevice(
                    index=index,
                    name=props.name,
                    total_memory_bytes=int(props.total_memory),
                    compute_capability=capability,
                    # bf16 tensor cores arrive with Ampere (compute capability 8.0).
                    bf16=capability >= (8, 0),
                )
            )
    return Hardware(
        devices=tuple(devices),
        cpu_count=os.cpu_count() or 1,
        ram_bytes=int(psutil.virtual_memory().total),
    )
