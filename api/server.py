"""The gRPC server on grpclib: gadget services, health and reflection, on unix sockets and TCP
(optionally TLS or mutual TLS)."""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import ssl
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from grpclib.health.service import Health
from grpclib.reflection.service import ServerReflection
from grpclib.server import Server

_logger = logging.getLogger(__name__)

DEFAULT_SOCKET = "unix:///var/run/gadgetpipe/gadgetpipe.sock"


class ListenError(ValueError):
    """A listen address or its TLS settings are unusable."""


@dataclass(frozen=True)
class TLSConfig:
    """Server certificate and key; with ``client_ca`` clients must present a certificate."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.cert), str(self.key))
        ctx.set_alpn_protocols(["h2"])  # grpc-go refuses servers without ALPN h2
        if self.client_ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(str(self.client_ca))
        return ctx


@dataclass(frozen=True)
class ListenAddress:
    scheme: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        u = urlparse(text)
        if u.scheme == "unix":
            path = (u.netloc + u.path) if u.netloc else u.path
            if not path:
                raise ListenError(f"{text!r}: unix address needs a path, unix:///run/x.sock")
            return cls("unix", path=path)
        if u.scheme == "tcp":
            if not u.hostname or u.port is None:
                raise ListenError(f"{text!r}: tcp address needs host and port, "
                                  "tcp://127.0.0.1:8080")
            return cls("tcp", host=u.hostname, port=u.port)
        raise ListenError(f"{text!r}: scheme must be unix:// or tcp://")

    def __str__(self) -> str:
        return f"unix://{self.path}" if self.scheme == "unix" else f"tcp://{self.host}:{self.port}"


class GrpcServer:
    """One grpclib server per listen address, all serving the same handlers.

    Args:
        handlers: the gadget service implementations.
        addresses: where to listen.
        tls: TLS for TCP listeners; required unless ``insecure`` is set.
        insecure: allow plain-text TCP.
        socket_group: group owning unix sockets (mode 0660).
    """

    def __init__(self, handlers: Sequence[Any], addresses: Sequence[ListenAddress],
                 tls: TLSConfig | None = None, insecure: bool = False,
                 socket_group: str | int | None = None) -> None:
        if not addresses:
            raise ListenError("no listen address given")
        for a in addresses:
            if a.scheme == "tcp" and tls is None and not insecure:
                raise ListenError(f"{a}: TCP needs TLS (--tls-cert/--tls-key) or an explicit "
                                  "--insecure")
        services = [*handlers, Health()]
        self._handlers = ServerReflection.extend(services)
        self._addresses = addresses
        self._tls = tls
        self._group = socket_group
        self._servers: list[Server] = []
        self.bound: list[str] = []

    async def start(self) -> None:
        try:
            for a in self._addresses:
                server = Server(self._handlers)
                if a.scheme == "unix":
                    path = Path(a.path)
                    path.parent.mkdir(parents=True, exist_ok=True, mode=0o710)
                    with contextlib.suppress(FileNotFoundError):
                        if stat.S_ISSOCK(path.stat().st_mode):
                            path.unlink()  # stale socket from a previous daemon
                    await server.start(path=str(path))
                    self._secure_socket(path)
                    self.bound.append(str(a))
                else:
                    ctx = self._tls.context() if self._tls else None
                    await server.start(a.host, a.port, ssl=ctx)
                    port = a.port or _bound_port(server)
                    self.bound.append(f"tcp://{a.host}:{port}")
                self._servers.append(server)
                _logger.info("listening on %s", self.bound[-1])
        except BaseException:
            await self.stop()
            raise

    def _secure_socket(self, path: Path) -> None:
        gid = 0
        if self._group is not None:
            try:
                gid = int(self._group) if str(self._group).isdigit() else \
                    grp.getgrnam(str(self._group)).gr_gid
            except KeyError:
                raise ListenError(f"socket group {self._group!r} does not exist") from None
        os.chown(path, 0, gid) if os.geteuid() == 0 else None
        os.chmod(path, 0o660)

    async def stop(self, grace: float = 2.0) -> None:
        for s in self._servers:
            s.close()
        for s in self._servers:
            with contextlib.suppress(Exception):
                await s.wait_closed()
        for a in self._addresses:
            if a.scheme == "unix":
                with contextlib.suppress(FileNotFoundError):
                    Path(a.path).unlink()
        self._servers.clear()


def _bound_port(server: Server) -> int:
    """The port the OS picked for a ``tcp://host:0`` listener."""
    inner: Any = server._server  # grpclib keeps the asyncio server private
    return int(inner.sockets[0].getsockname()[1])
