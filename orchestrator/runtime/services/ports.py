"""Free TCP ports on the loopback interface for the embedded services."""

from __future__ import annotations

import socket
import threading

LOOPBACK = "127.0.0.1"

# Ports this process already handed out: the kernel may offer a port again once its probe
# socket is closed, and two services of one process must never be given the same port.
_issued: set[int] = set()
_issued_lock = threading.Lock()


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """`count` distinct ports that were free on `host` a moment ago.

    A port can still be taken by another process before the service binds it; callers
    retry with fresh ports when a service reports "address already in use".
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    probes: list[socket.socket] = []
    ports: list[int] = []
    try:
        with _issued_lock:
            tries = 0
            while len(ports) < count:
                tries += 1
                if tries > count * 100:
                    raise OSError(
                        f"no {count} free TCP ports on {host}: the ephemeral range is spent"
                    )
                probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                probes.append(probe)  # kept open until all are chosen, so all differ
                probe.bind((host, 0))
                port = probe.getsockname()[1]
                if port in _issued:
                    continue
                _issued.add(port)
                ports.append(port)
    finally:
        for probe in probes:
            probe.close()
    return ports


def free_port(host: str = LOOPBACK) -> int:
    """One port that was free on `host` a moment ago."""
    return free_ports(1, host)[0]


def ports_free(ports: list[int], host: str = LOOPBACK) -> bool:
    """True when every port can be bound on `host` right now (as a server would bind it)."""
    for port in ports:
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # Servers set SO_REUSEADDR, so a port in TIME_WAIT is free for them too.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
        except OSError:
            return False
        finally:
            probe.close()
    return True
