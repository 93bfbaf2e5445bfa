"""Writes already-framed gRPC messages to a grpclib server stream, a window at a time.

grpclib's public ``send_message`` encodes and writes one message per call, and its
``Stream.send_data`` cuts data into frames of the peer's maximum frame size (16 KiB for Go and
grpcio clients), passing each through h2's frame objects (four copies of the bytes) and a socket
``send`` of its own. For 500-byte records that is one syscall and one round of h2 bookkeeping
per 30 records, per attached client: it was the largest per-client cost of a fan-out (bench f).

A drained batch is already the concatenation of length-prefixed ``GadgetEvent`` messages, so
this writer lays out the HTTP/2 DATA frames for as much of it as the flow-control window allows
(up to :data:`SPAN` bytes) in one buffer, with one copy of the records, tells h2 what it sent
(the stream's and the connection's windows, their state machines), and writes the span with
one ``transport.write``. Flow control is honoured exactly as grpclib does: wait while the
transport is paused (``write_ready``) or the window is closed (``window_updated``), so a slow
client pushes back on the writer.

It relies on internals of grpclib 0.4 and h2 4, pinned by tests/unit/test_stream_writer.py:
``server.Stream._stream`` (the protocol stream), its ``id``, ``connection`` (``write_ready``,
``data_sent``, ``data_send_process``), ``_h2_connection``, ``_transport``, ``window_updated``
and ``data_sent``; h2's ``streams``, ``outbound_flow_control_window`` (connection and stream),
``max_outbound_frame_size``, ``state_machine.process_input`` and ``data_to_send``.
"""

from __future__ import annotations

from typing import Any

from h2.connection import ConnectionInputs
from h2.stream import StreamInputs

SPAN = 256 * 1024
"""Most bytes of messages laid out and written at once: the transport may buffer one span per
client beyond its high-water mark, so this bounds a stalled client's memory."""

_DATA_FRAME = 0x0


def _header(length: int, stream_id: int) -> bytes:
    """An HTTP/2 frame header: 24-bit length, type DATA, no flags, stream id (RFC 9113 §4.1)."""
    return length.to_bytes(3, "big") + bytes((_DATA_FRAME, 0)) + stream_id.to_bytes(4, "big")


def data_frames(data: memoryview, stream_id: int, max_frame: int) -> bytearray:
    """``data`` as consecutive DATA frames of at most ``max_frame`` bytes each."""
    n = len(data)
    count = -(-n // max_frame)
    out = bytearray(n + 9 * count)
    o = 0
    full = _header(max_frame, stream_id)
    for start in range(0, n, max_frame):
        chunk = min(max_frame, n - start)
        out[o:o + 9] = full if chunk == max_frame else _header(chunk, stream_id)
        out[o + 9:o + 9 + chunk] = data[start:start + chunk]
        o += 9 + chunk
    return out


class FramedWriter:
    """The one place that touches grpclib and h2 internals to write pre-framed messages."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.bytes_written = 0
        self.writes = 0

    async def write(self, framed: bytes | bytearray | memoryview) -> None:
        """Writes one or more complete gRPC messages (flag, length, body each)."""
        if not framed:
            return
        s = self._stream
        if not s._send_initial_metadata_done:
            await s.send_initial_metadata()
        proto = s._stream
        view = memoryview(framed)
        pos, total = 0, len(view)
        while pos < total:
            conn = proto.connection
            await conn.write_ready.wait()
            h2c = proto._h2_connection
            stream = h2c.streams.get(proto.id)
            if stream is None:  # reset or closed under us: let grpclib raise its error
                await proto.send_data(bytes(view[pos:]))
                return
            window = min(h2c.outbound_flow_control_window, stream.outbound_flow_control_window)
            if window <= 0:
                proto.window_updated.clear()
                await proto.window_updated.wait()
                continue  # other streams may have used the connection window meanwhile
            n = min(window, total - pos, SPAN)
            frames = data_frames(view[pos:pos + n], proto.id, h2c.max_outbound_frame_size)
            # What h2.send_data would do per frame, once for the span: state checks (they
            # raise if the stream can no longer send) and the two windows.
            h2c.state_machine.process_input(ConnectionInputs.SEND_DATA)
            stream.state_machine.process_input(StreamInputs.SEND_DATA)
            stream.outbound_flow_control_window -= n
            h2c.outbound_flow_control_window -= n
            pending = h2c.data_to_send()  # frames h2 queued (acks): they go first, in order
            transport = proto._transport
            if pending:
                transport.write(pending)
            transport.write(frames)
            proto.data_sent += n
            conn.data_sent += n
            conn.data_send_process()
            pos += n
            self.writes += 1
        self.bytes_written += total
