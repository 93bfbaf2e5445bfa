"""Writes already-framed gRPC messages to a grpclib server stream in one go.

grpclib's public ``send_message`` encodes and writes one message per call; a drained batch of
records is already the concatenation of length-prefixed ``GadgetEvent`` messages, so this adapter
hands it to the HTTP/2 stream as DATA in a single call. That relies on two grpclib internals,
pinned by tests/unit/test_stream_writer.py: ``Stream._stream`` (the protocol stream) and its
``send_data(data, end_stream=False)``, which honours HTTP/2 flow control (so a slow client pushes
back on the writer), and ``Stream._send_initial_metadata_done``.
"""

from __future__ import annotations

from typing import Any


class FramedWriter:
    """The one place that touches grpclib internals to write pre-framed messages."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.bytes_written = 0

    async def write(self, framed: bytes) -> None:
        """Writes one or more complete gRPC messages (flag, length, body each)."""
        if not framed:
            return
        s = self._stream
        if not s._send_initial_metadata_done:
            await s.send_initial_metadata()
        await s._stream.send_data(framed)
        self.bytes_written += len(framed)
