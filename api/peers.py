"""Peer daemons of this one (``daemon.nodes``): channels opened on first use, secured as any
client's connection to a daemon is, and how a failed peer call is described in logs and to
clients.

A peer on TCP is reached over TLS: its server certificate must chain to the CA given (the
system's CAs without one) and name the address's host (or ``serverName``); with a client
certificate and key it is mutual TLS, what a peer listening with ``daemon.tls.clientCA``
requires. TLS comes from the node's own ``tls`` or else the daemon-wide ``nodeTLS``. A TCP
peer without TLS is plaintext, which the daemon refuses to start with unless ``insecure``
says so, as it refuses a TCP listener without TLS. A unix socket peer is reached as it is:
its file mode is its access control.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.exceptions import StreamTerminatedError
from grpclib.protocol import H2Protocol

from config.addresses import ListenAddress, ListenError

__all__ = ["Peer", "PeerError", "PeerPool", "PeerTLS", "describe_error", "peer_problem"]


class PeerError(ListenError):
    """A peer's address or TLS settings are unusable (the message names the node and why)."""


@dataclass(frozen=True)
class PeerTLS:
    """TLS towards peer daemons.

    Args:
        ca: PEM file of the CA the peers' server certificates chain to; None: the system's.
        cert: PEM file of this daemon's client certificate (chain), for mutual TLS.
        key: PEM file of its private key.
        server_name: the name the peers' certificates must carry; None: the address's host.
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def context(self) -> ssl.SSLContext:
        """The client SSL context.

        Raises:
            PeerError: a file cannot be read or is not what it should be (named, with why),
                or only one of cert and key is given.
        """
        if (self.cert is None) != (self.key is None):
            raise PeerError("TLS client certificate and key go together")
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                             cafile=str(self.ca) if self.ca else None)
        except (OSError, ssl.SSLError) as e:
            raise PeerError(f"TLS CA {self.ca}: {e}") from None
        if self.cert is not None:
            try:
                ctx.load_cert_chain(str(self.cert), str(self.key))
            except (OSError, ssl.SSLError) as e:
                raise PeerError(f"TLS client certificate {self.cert} / key {self.key}: {e}"
                                ) from None
        ctx.set_alpn_protocols(["h2"])  # gRPC servers (ours, grpc-go) want ALPN h2
        return ctx


@dataclass(frozen=True)
class Peer:
    """One peer daemon: its address (``unix:///path``, ``host:port``, ``tcp://host:port``)
    and, for TCP, its own TLS settings (None: the pool's default)."""

    address: str
    tls: PeerTLS | None = None


class _PeerChannel(Channel):
    """A grpclib channel that keeps why its last connection was lost.

    grpclib ends the calls of a lost connection with "Connection lost" whatever the cause; the
    cause (a peer refusing this daemon's client certificate, or expecting one: a TLS alert) is
    in the exception the transport closed with, which this keeps for :meth:`PeerPool.describe`.
    """

    lost: BaseException | None = None

    def _protocol_factory(self) -> H2Protocol:
        protocol = super()._protocol_factory()
        close = protocol.connection_lost

        def connection_lost(exc: BaseException | None) -> None:
            if exc is not None:
                self.lost = exc
            close(exc)

        protocol.connection_lost = connection_lost  # type: ignore[method-assign]
        return protocol


class PeerPool:
    """grpclib channels to the peer daemons of this one, opened on first use.

    Args:
        nodes: node name -> address, or a :class:`Peer` with its own TLS.
        tls: TLS for TCP peers without their own (``daemon.nodeTLS``).
        insecure: allow TCP peers without TLS (plaintext).
    """

    def __init__(self, nodes: Mapping[str, str | Peer], tls: PeerTLS | None = None,
                 insecure: bool = False) -> None:
        self.nodes: dict[str, Peer] = {
            name: p if isinstance(p, Peer) else Peer(p) for name, p in nodes.items()}
        self._tls = tls
        self._insecure = insecure
        self._targets: dict[str, tuple[ListenAddress, ssl.SSLContext | None, str | None]] = {}
        self._channels: dict[str, Channel] = {}

    def address(self, node: str) -> str:
        return self.nodes[node].address

    def channel(self, node: str) -> Channel:
        """The channel to ``node`` (KeyError if it is not a configured peer)."""
        ch = self._channels.get(node)
        if ch is None:
            address, ctx, server_name = self._targets.get(node) or self._target(node)
            if address.scheme == "unix":
                ch = _PeerChannel(path=address.path)
            else:
                ch = _PeerChannel(host=address.host, port=address.port, ssl=ctx,
                                  config=Configuration(ssl_target_name_override=server_name))
            self._channels[node] = ch
        return ch

    def _target(self, node: str) -> tuple[ListenAddress, ssl.SSLContext | None, str | None]:
        peer = self.nodes[node]
        try:
            address = ListenAddress.parse_peer(peer.address)
        except ListenError as e:
            raise PeerError(f"node {node!r}: {e}") from None
        if address.scheme == "unix":
            if peer.tls is not None:
                raise PeerError(f"node {node!r}: TLS is for TCP peers; {peer.address} is a "
                                "unix socket")
            return address, None, None
        tls = peer.tls or self._tls
        if tls is None:
            if not self._insecure:
                raise PeerError(f"node {node!r}: TCP peer {peer.address} needs TLS (nodeTLS, or "
                                "tls under the node) or an explicit insecure")
            return address, None, None
        try:
            ctx = tls.context()
        except PeerError as e:
            raise PeerError(f"node {node!r}: {e}") from None
        return address, ctx, tls.server_name

    def start(self) -> None:
        """Checks every peer's address and TLS files, so a bad one stops the daemon at start.

        Raises:
            PeerError: naming the node and the problem.
        """
        self._targets = {node: self._target(node) for node in self.nodes}

    def describe(self, node: str, e: BaseException) -> str:
        """A one-line reason for a failed call to ``node``: :func:`describe_error`, with what
        is known of a connection lost under the call. A TLS peer that drops the connection
        right after the handshake is most often refusing this daemon's client certificate (or
        its absence), which grpclib only reports as "Connection lost"."""
        text = describe_error(e)
        if not isinstance(e, StreamTerminatedError):
            return text
        ch = self._channels.get(node)
        lost = ch.lost if isinstance(ch, _PeerChannel) else None
        if lost is not None:
            text += f" ({describe_error(lost)})"
        target = self._targets.get(node)
        if target is not None and target[1] is not None:
            tls = self.nodes[node].tls or self._tls
            text += ("; the peer closed the TLS connection: does it require a client "
                     "certificate (nodeTLS cert and key)?" if tls is None or tls.cert is None
                     else "; the peer closed the TLS connection: does it accept this "
                     f"daemon's client certificate {tls.cert}?")
        return text

    def stop(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()


def peer_problem(e: BaseException) -> str:
    """"is unavailable" when the peer cannot be reached, "failed" when it answered an error."""
    return "failed" if isinstance(e, GRPCError) else "is unavailable"


def describe_error(e: BaseException) -> str:
    """A one-line reason for a failed peer call."""
    if isinstance(e, GRPCError):
        return f"{e.status.name}: {e.message}"
    text = str(e) or type(e).__name__
    return f"{type(e).__name__}: {text}" if type(e).__name__ not in text else text

