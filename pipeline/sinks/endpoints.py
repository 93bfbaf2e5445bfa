"""Peers a sink's settings name, and whether something accepts connections there.

A sink type lists the endpoints its settings name (:meth:`SinkTypeBase.endpoints`) so that
``gadgetpipe config check`` can try them before anything runs; the probe is the type's
(:meth:`SinkTypeBase.probe`), by default :func:`tcp_probe`. Nothing here opens more than a
TCP connection, which it closes at once.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from urllib.parse import urlparse

__all__ = ["Endpoint", "host_port", "tcp_probe"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A peer named by a sink's settings.

    Args:
        key: the full param key whose value names it (where a problem is reported).
        target: the peer as shown in messages (``10.0.0.1:9092,10.0.0.2:9092``).
        addresses: candidates, ``host:port`` or URLs; one that accepts a connection is enough.
        default_port: the port of an address that names none.
    """

    key: str
    target: str
    addresses: tuple[str, ...]
    default_port: int


def host_port(text: str, default_port: int) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or a URL -> (host, port); http/https URLs default to 80/443.

    Raises:
        ValueError: no host, or a port that is not a number.
    """
    u = urlparse(text if "://" in text else f"tcp://{text}")
    port = u.port
    if port is None:
        port = {"https": 443, "http": 80}.get(u.scheme, default_port)
    if not u.hostname:
        raise ValueError(f"{text!r} has no host")
    return u.hostname, port


def tcp_probe(endpoint: Endpoint, timeout: float) -> str | None:
    """None if one of the endpoint's addresses accepts a TCP connection, else why none does."""
    errors = []
    for address in endpoint.addresses:
        try:
            host, port = host_port(address, endpoint.default_port)
            with socket.create_connection((host, port), timeout=timeout):
                return None
        except (OSError, ValueError) as e:
            errors.append(f"{address}: {e}")
    return "unreachable: " + "; ".join(errors) if errors else "no address given"
