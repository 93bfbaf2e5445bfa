"""Free loopback ports for the peers."""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

_lock = threading.Lock()
_handed_out: set[int] = set()
_LOWEST = 10_000  # below this live the well-known defaults (9090, 9092, 4317...) of real services


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int, host: str) -> bool:
    # No SO_REUSEADDR: a port with connections lingering in TIME_WAIT is refused too, which errs
    # on the safe side.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports on ``host`` that nothing is bound to right now.

    They are drawn at random from outside the kernel's ephemeral range: the kernel never hands
    those to outgoing connections, so between this check and the peer's bind only another test
    process picking the same port out of ~25,000 could take one. A port is never handed out
    twice by one process, so peers started side by side (or restarted) cannot collide.
    """
    lo, hi = _ephemeral_range()
    candidates = [*range(_LOWEST, lo), *range(hi + 1, 65536)]
    ports: list[int] = []
    with _lock:
        rng = random.SystemRandom()
        for _ in range(1000):
            if len(ports) == count:
                return ports
            port = rng.choice(candidates)
            if port in _handed_out or not _bindable(port, host):
                continue
            _handed_out.add(port)
            ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"no {count} free ports on {host} after 1000 tries")


def free_port(host: str = "127.0.0.1") -> int:
    """One port on ``host`` that nothing is bound to right now (see :func:`free_ports`)."""
    return free_ports(1, host)[0]
