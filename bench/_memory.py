"""A process's own peak resident memory, for benchmarks that run each side in a fresh child.

Not getrusage: on Linux `ru_maxrss` survives fork and exec, so a child started by a parent
that once held 900 MB reports at least 900 MB whatever it used itself (a full `make bench`,
where earlier benchmarks grew the runner, showed every sharding input at the same 878 MB).
/proc's VmHWM belongs to the address space, which exec replaces.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

STATUS = Path("/proc/self/status")


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB since its exec (VmHWM; getrusage where /proc is not)."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes there, kB here
