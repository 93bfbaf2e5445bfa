"""The gRPC server on grpclib: gadget services, health and reflection, on unix sockets and TCP
(optionally TLS or mutual TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import ssl
import stat
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpclib import GRPCError, Status
from grpclib.const import Handler
from grpclib.encoding.proto import ProtoCodec
from grpclib.health.service import Health
from grpclib.reflection.service import ServerReflection
from grpclib.server import Server

from config.addresses import ListenAddress, ListenError

_logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_SOCKET", "GrpcServer", "ListenAddress", "ListenError", "TLSConfig"]

DEFAULT_SOCKET = "unix:///var/run/gadgetpipe/gadgetpipe.sock"
MAX_RECEIVE_MESSAGE = 4 << 20
"""Largest request message handled: grpc-go's default server limit, so upstream's too."""
MAX_STATUS_MESSAGE = 1024
"""Characters of an error status message sent; the rest is cut. Messages quote the request
(``invalid gadget instance id: <id>``), and a status is a trailer: grpc-go and grpcio refuse
trailers over 8-16 KiB, so an echoed 300 KiB id would reach the client as a transport error
instead of the reason."""


class RequestCodec(ProtoCodec):
    """grpclib's protobuf codec, except that a request message that does not parse ends its
    call with INVALID_ARGUMENT naming the message type.

    grpclib decodes inside the handler's ``recv_message``, so a parse error would otherwise
    escape the handler and reach the client as UNKNOWN "Internal Server Error" with a
    traceback in the daemon log.
    """

    def decode(self, data: bytes, message_type: Any) -> Any:
        name = getattr(getattr(message_type, "DESCRIPTOR", None), "full_name", "message")
        try:
            return message_type.FromString(data)
        except Exception as e:  # protobuf's DecodeError; the message says what is wrong
            raise GRPCError(Status.INVALID_ARGUMENT,
                            f"request is not a valid {name}: {e}") from None


class _Calls:
    """The calls being served, so a stopping server can let them end on their own."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.draining = False


class _Guarded:
    """The handlers' method table, each method guarded against what a raw peer can send, and
    its calls tracked for a graceful stop.

    * A unary-request call without its message: grpcio clients always send the one message,
      but any HTTP/2 peer can half-close first; ``recv_message`` then returns None and every
      handler (ours, grpclib's Health) would fail on it with UNKNOWN. Guarded, the call ends
      with INVALID_ARGUMENT saying so.
    * A request message longer than :data:`MAX_RECEIVE_MESSAGE` is refused with
      RESOURCE_EXHAUSTED from its length prefix, before any of it is buffered: grpclib has no
      limit and would take up to 4 GiB into memory for one message.
    * An error message longer than :data:`MAX_STATUS_MESSAGE` is cut.
    * While the server drains, a new call is refused with UNAVAILABLE.
    """

    def __init__(self, handlers: Sequence[Any], calls: _Calls) -> None:
        self._handlers = handlers
        self._calls = calls

    def __mapping__(self) -> Mapping[str, Handler]:
        out: dict[str, Handler] = {}
        for h in self._handlers:
            for path, method in h.__mapping__().items():
                out[path] = method._replace(func=_guard(
                    method.func, self._calls,
                    needs_request=not method.cardinality.client_streaming))
        return out


def _guard(func: Callable[[Any], Awaitable[None]], calls: _Calls, needs_request: bool
           ) -> Callable[[Any], Awaitable[None]]:
    async def handle(stream: Any) -> None:
        if calls.draining:
            raise GRPCError(Status.UNAVAILABLE, "the daemon is shutting down")
        task = asyncio.current_task()
        if task is not None:
            calls.tasks.add(task)
            task.add_done_callback(calls.tasks.discard)
        _limit_messages(stream)
        if needs_request:
            receive = stream.recv_message

            async def recv_message() -> Any:
                message = await receive()
                if message is None:
                    raise GRPCError(Status.INVALID_ARGUMENT,
                                    "the call ended without its request message")
                return message

            stream.recv_message = recv_message  # this stream only: an instance attribute
        try:
            await func(stream)
        except GRPCError as e:
            if e.message is None or len(e.message) <= MAX_STATUS_MESSAGE:
                raise
            cut = len(e.message) - MAX_STATUS_MESSAGE
            raise GRPCError(e.status, f"{e.message[:MAX_STATUS_MESSAGE]}... ({cut} more "
                            "characters cut)", e.details) from None

    return handle


def _limit_messages(stream: Any) -> None:
    """Caps the request messages of one call at :data:`MAX_RECEIVE_MESSAGE` bytes.

    grpclib's ``recv_message`` reads a message's 5-byte prefix with ``recv_data(5)`` from the
    HTTP/2 stream (``Stream._stream``, the same internal api/stream_writer.py relies on), then
    exactly the prefix's length with one more ``recv_data``; this stream's ``recv_data`` refuses
    a length past the limit. The unread data is acknowledged by grpclib when the call ends, so
    the connection's flow-control window is not lost.
    """
    h2_stream = stream._stream
    read = h2_stream.recv_data

    async def recv_data(size: int) -> bytes:
        if size > MAX_RECEIVE_MESSAGE:
            raise GRPCError(Status.RESOURCE_EXHAUSTED, f"request message of {size} bytes is "
                            f"larger than the {MAX_RECEIVE_MESSAGE} bytes accepted")
        data: bytes = await read(size)
        return data

    h2_stream.recv_data = recv_data  # this call's stream only: an instance attribute


@dataclass(frozen=True)
class TLSConfig:
    """Server certificate and key; with ``client_ca`` clients must present a certificate."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def context(self) -> ssl.SSLContext:
        """The server's SSL context.

        Raises:
            ListenError: a file cannot be read or is not what it should be (named, with why).
        """
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(str(self.cert), str(self.key))
        except (OSError, ssl.SSLError) as e:
            raise ListenError(f"TLS certificate {self.cert} / key {self.key}: {e}") from None
        ctx.set_alpn_protocols(["h2"])  # grpc-go refuses servers without ALPN h2
        if self.client_ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            try:
                ctx.load_verify_locations(str(self.client_ca))
            except (OSError, ssl.SSLError) as e:
                raise ListenError(f"TLS client CA {self.client_ca}: {e}") from None
        return ctx


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
        self._calls = _Calls()
        self._handlers = [_Guarded(ServerReflection.extend(services), self._calls)]
        self._addresses = addresses
        self._tls = tls
        self._gid = _group_id(socket_group)
        self._servers: list[Server] = []
        self.bound: list[str] = []

    async def start(self) -> None:
        try:
            for a in self._addresses:
                server = Server(self._handlers, codec=RequestCodec())
                if a.scheme == "unix":
                    path = Path(a.path)
                    self._make_socket_dir(path.parent)
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

    def _make_socket_dir(self, directory: Path) -> None:
        """Creates the socket's directory 0710 root:<socket group> (its parents as mkdir -p
        does): the group must be able to reach the socket, which a 0710 root:root directory
        would keep it from. A directory that exists is left as it is."""
        if directory.exists():
            return
        directory.mkdir(parents=True, exist_ok=True, mode=0o710)
        if os.geteuid() == 0:
            os.chown(directory, 0, self._gid)

    def _secure_socket(self, path: Path) -> None:
        # Connecting needs write permission on the socket: 0660 lets root and the group in.
        if os.geteuid() == 0:
            os.chown(path, 0, self._gid)
        os.chmod(path, 0o660)

    async def drain(self, timeout: float) -> None:
        """Refuses new calls and waits up to ``timeout`` seconds for the current ones to end
        by themselves (the daemon told them to stop); :meth:`stop` cancels the rest."""
        self._calls.draining = True
        pending = {t for t in self._calls.tasks if t is not asyncio.current_task()}
        if pending:
            _, left = await asyncio.wait(pending, timeout=timeout)
            if left:
                _logger.warning("%d call(s) did not end within %.1fs; cancelling them",
                                len(left), timeout)

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


def _group_id(group: str | int | None) -> int:
    """The gid of a socket group given by name or number (0, root's, when None)."""
    if group is None:
        return 0
    if str(group).isdigit():
        return int(group)
    try:
        return grp.getgrnam(str(group)).gr_gid
    except KeyError:
        raise ListenError(f"socket group {group!r} does not exist") from None


def _bound_port(server: Server) -> int:
    """The port the OS picked for a ``tcp://host:0`` listener."""
    inner: Any = server._server  # grpclib keeps the asyncio server private
    return int(inner.sockets[0].getsockname()[1])
