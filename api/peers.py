"""Peer daemons of this one (``daemon.nodes``): channels opened on first use, and how a
failed peer call is described in logs and to clients."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlparse

from grpclib import GRPCError
from grpclib.client import Channel

__all__ = ["PeerPool", "describe_error", "peer_problem"]


class PeerPool:
    """grpclib channels to the peer daemons of this one, opened on first use.

    Args:
        nodes: node name -> address (``unix:///path``, ``host:port`` or ``tcp://host:port``).
    """

    def __init__(self, nodes: Mapping[str, str]) -> None:
        self.nodes = dict(nodes)
        self._channels: dict[str, Channel] = {}

    def address(self, node: str) -> str:
        return self.nodes[node]

    def channel(self, node: str) -> Channel:
        """The channel to ``node`` (KeyError if it is not a configured peer)."""
        ch = self._channels.get(node)
        if ch is None:
            ch = self._channels[node] = _open_channel(self.nodes[node])
        return ch

    def start(self) -> None:
        for node, address in self.nodes.items():
            _check_address(node, address)

    def stop(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()


def _check_address(node: str, address: str) -> None:
    u = urlparse(address if "://" in address else f"tcp://{address}")
    if u.scheme == "unix" and (u.netloc + u.path):
        return
    if u.scheme == "tcp" and u.hostname and u.port:
        return
    raise ValueError(f"node {node!r}: address {address!r} is not unix:///path or host:port")


def _open_channel(address: str) -> Channel:
    u = urlparse(address if "://" in address else f"tcp://{address}")
    if u.scheme == "unix":
        return Channel(path=u.netloc + u.path)
    return Channel(host=u.hostname, port=u.port)


def peer_problem(e: BaseException) -> str:
    """"is unavailable" when the peer cannot be reached, "failed" when it answered an error."""
    return "failed" if isinstance(e, GRPCError) else "is unavailable"


def describe_error(e: BaseException) -> str:
    """A one-line reason for a failed peer call."""
    if isinstance(e, GRPCError):
        return f"{e.status.name}: {e.message}"
    text = str(e) or type(e).__name__
    return f"{type(e).__name__}: {text}" if type(e).__name__ not in text else text

