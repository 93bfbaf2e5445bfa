"""Writes already-framed gRPC messages to a grpclib server stream, a window at a time.

grpclib's public ``send_message`` encodes and writes one message per call, and its
``Stream.send_data`` cuts data into frames of the peer's maximum frame size (16 KiB for Go and
grpcio clients), passing each through h2's frame objects (four copies of the bytes) and a socket
``send`` of its own. For 500-byte records that is one syscall and one round of h2 bookkeeping
per 30 records, per attached client: it was the largest per-client cost of a fan-out (bench f).

A drained batch is already the concatenation of length-prefixed ``GadgetEvent`` messages (one
buffer, or several: an attached client's queued chunks), so this writer cuts as much of it as
the flow-control window allows (up to :data:`SPAN` bytes) into DATA frames of 9-byte headers
and views of the messages, tells h2 what it sent (the stream's and the connection's windows,
their state machines), and hands the span to the socket with one gathering ``sendmsg``: the
records are not copied in user space at all (only what the socket did not take is, into the
transport's buffer; TLS transports get one joined buffer). Flow control is honoured exactly as
grpclib does: wait while the transport is paused (``write_ready``) or the window is closed
(``window_updated``), so a slow client pushes back on the writer.

It relies on internals of grpclib 0.4 and h2 4, pinned by tests/unit/test_stream_writer.py:
``server.Stream._stream`` (the protocol stream), its ``id``, ``connection`` (``write_ready``,
``data_sent``, ``data_send_process``), ``_h2_connection``, ``_transport``, ``window_updated``
and ``data_sent``; h2's ``streams``, ``outbound_flow_control_window`` (connection and stream),
``max_outbound_frame_size``, ``state_machine.process_input`` and ``data_to_send``; asyncio's
socket transport's ``_sock`` (written to only while the transport has nothing buffered).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence
from typing import Any

from h2.connection import ConnectionInputs
from h2.stream import StreamInputs

SPAN = 256 * 1024
"""Most bytes of messages written at once: the transport may buffer up to one span per client
beyond its high-water mark, so this bounds a stalled client's memory."""

SEND_BUFFER = 1 << 20
"""Socket send buffer asked for on a connection once it streams records (the kernel doubles
it, capped by net.core.wmem_max). The default (~208 KiB) took a 256 KiB span in parts: a
second syscall from the transport's buffer and a wake-up of the client per part. Measured with
16 attached Go clients (bench f, medians of 3): daemon CPU per record 10.2 -> 8.2 µs; 4 MiB
gained nothing more."""

_DATA_FRAME = 0x0


def _header(length: int, stream_id: int) -> bytes:
    """An HTTP/2 frame header: 24-bit length, type DATA, no flags, stream id (RFC 9113 §4.1)."""
    return length.to_bytes(3, "big") + bytes((_DATA_FRAME, 0)) + stream_id.to_bytes(4, "big")


Buffer = bytes | bytearray | memoryview


class _Cursor:
    """Reads consecutive spans of bytes across several buffers, as views (no copy)."""

    def __init__(self, parts: Sequence[memoryview]) -> None:
        self._parts = parts
        self._i = 0
        self._at = 0

    def take(self, n: int, out: list[Buffer]) -> None:
        """Appends views of the next ``n`` bytes to ``out``."""
        while n:
            part = self._parts[self._i]
            k = min(n, len(part) - self._at)
            out.append(part[self._at:self._at + k])
            self._at += k
            n -= k
            if self._at == len(part):
                self._i += 1
                self._at = 0


def data_frames(cursor: _Cursor, n: int, stream_id: int, max_frame: int) -> list[Buffer]:
    """The next ``n`` bytes of ``cursor`` as consecutive DATA frames of at most ``max_frame``
    bytes each: headers and views of the data, for one gathering write."""
    out: list[Buffer] = []
    full = _header(max_frame, stream_id)
    while n:
        chunk = min(max_frame, n)
        out.append(full if chunk == max_frame else _header(chunk, stream_id))
        cursor.take(chunk, out)
        n -= chunk
    return out


def _views(framed: Buffer | Sequence[Buffer]) -> list[memoryview]:
    if isinstance(framed, bytes | bytearray | memoryview):
        return [memoryview(framed)] if len(framed) else []
    return [memoryview(p) for p in framed if len(p)]


def _grow_send_buffer(transport: Any) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < SEND_BUFFER:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)


def _gather_write(transport: Any, iov: list[Buffer], size: int) -> None:
    """Writes ``iov`` in order: straight to the socket with one ``sendmsg`` when the transport
    has nothing buffered (no copy in user space), the rest through the transport (which buffers
    it, and pauses the protocol past its high-water mark)."""
    sock = getattr(transport, "_sock", None)  # plain socket transports; TLS has none
    if sock is None or transport.get_write_buffer_size() or transport.is_closing():
        transport.write(b"".join(iov))
        return
    try:
        sent = sock.sendmsg(iov)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        transport.write(b"".join(iov))  # the transport reports the broken connection
        return
    if sent == size:
        return
    rest: list[Buffer] = []
    for buf in iov:
        if sent >= len(buf):
            sent -= len(buf)
            continue
        rest.append(memoryview(buf)[sent:] if sent else buf)
        sent = 0
    transport.write(b"".join(rest))


class FramedWriter:
    """The one place that touches grpclib and h2 internals to write pre-framed messages."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.bytes_written = 0
        self.writes = 0
        self.waiting = False
        """True while a write waits for the client (its flow-control window or the socket)."""

    async def write(self, framed: Buffer | Sequence[Buffer]) -> None:
        """Writes one or more complete gRPC messages (flag, length, body each), given as one
        buffer or as consecutive buffers (sent as they are: no joined copy is made)."""
        parts = _views(framed)
        if not parts:
            return
        s = self._stream
        if not s._send_initial_metadata_done:
            await s.send_initial_metadata()
            _grow_send_buffer(s._stream._transport)
        proto = s._stream
        cursor = _Cursor(parts)
        pos, total = 0, sum(len(p) for p in parts)
        while pos < total:
            conn = proto.connection
            if not conn.write_ready.is_set():
                self.waiting = True
                await conn.write_ready.wait()
                self.waiting = False
            h2c = proto._h2_connection
            stream = h2c.streams.get(proto.id)
            if stream is None:  # reset or closed under us: let grpclib raise its error
                rest: list[Buffer] = []
                cursor.take(total - pos, rest)
                await proto.send_data(b"".join(rest))
                return
            window = min(h2c.outbound_flow_control_window, stream.outbound_flow_control_window)
            if window <= 0:
                proto.window_updated.clear()
                self.waiting = True
                await proto.window_updated.wait()
                self.waiting = False
                continue  # other streams may have used the connection window meanwhile
            n = min(window, total - pos, SPAN)
            max_frame = h2c.max_outbound_frame_size
            iov = data_frames(cursor, n, proto.id, max_frame)
            # What h2.send_data would do per frame, once for the span: state checks (they
            # raise if the stream can no longer send) and the two windows.
            h2c.state_machine.process_input(ConnectionInputs.SEND_DATA)
            stream.state_machine.process_input(StreamInputs.SEND_DATA)
            stream.outbound_flow_control_window -= n
            h2c.outbound_flow_control_window -= n
            pending = h2c.data_to_send()  # frames h2 queued (acks): they go first, in order
            if pending:
                iov.insert(0, pending)
            _gather_write(proto._transport, iov,
                          n + 9 * -(-n // max_frame) + len(pending))
            proto.data_sent += n
            conn.data_sent += n
            conn.data_send_process()
            pos += n
            self.writes += 1
        self.bytes_written += total
