"""Pins the grpclib behaviour api/stream_writer.py relies on: a pre-framed batch written with
one ``send_data`` reaches an independent (grpcio) client as separate messages, and HTTP/2 flow
control stops the writer when the client does not read."""

from __future__ import annotations

import asyncio
import inspect
import threading
from pathlib import Path
from typing import Any

import grpc
from grpclib.server import Server, Stream

from api.stream_writer import FramedWriter
from pipeline import wire
from pipeline._gen import gadget_service_grpc as svc
from pipeline._gen import gadget_service_pb2 as pb
from pipeline._gen import gadget_service_pb2_grpc as rpc


class _Manager(svc.GadgetManagerBase):
    def __init__(self, frames: bytes, repeat: int) -> None:
        self.frames = frames
        self.repeat = repeat
        self.writer: FramedWriter | None = None
        self.parts: list[bytes] = []
        self.blocked = asyncio.Event()

    async def GetGadgetInfo(self, stream: Stream[Any, Any]) -> None:
        raise NotImplementedError

    async def RunGadget(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        self.writer = FramedWriter(stream)
        if self.parts:
            await self.writer.write(self.parts)
        for _ in range(self.repeat):
            await self.writer.write(self.frames)


def test_grpclib_internals_are_where_the_adapter_expects_them() -> None:
    from grpclib import protocol, server

    assert "send_data" in dir(protocol.Stream)
    params = list(inspect.signature(protocol.Stream.send_data).parameters)
    assert params[:3] == ["self", "data", "end_stream"]
    assert server.Stream._send_initial_metadata_done is False  # class default, set on send
    assert "self._stream = stream" in inspect.getsource(server.Stream.__init__)


async def _serve(path: Path, manager: _Manager) -> Server:
    server = Server([manager])
    await server.start(path=str(path))
    return server


def _read_all(address: str) -> list[pb.GadgetEvent]:
    with grpc.insecure_channel(address) as ch:
        stub = rpc.GadgetManagerStub(ch)
        done = threading.Event()

        def requests() -> Any:
            yield pb.GadgetControlRequest(runRequest=pb.GadgetRunRequest(imageName="x",
                                                                         version=1))
            done.wait(10)

        events = list(stub.RunGadget(requests()))
        done.set()
        return events


async def test_one_write_of_many_framed_messages_reaches_grpcio_as_separate_messages(
        tmp_path: Path) -> None:
    frames = b"".join(wire.grpc_frame(wire.gadget_event(0, i, b"x" * 300)) for i in range(1, 1001))
    manager = _Manager(frames, 3)
    server = await _serve(tmp_path / "s.sock", manager)
    try:
        events = await asyncio.to_thread(_read_all, f"unix://{tmp_path / 's.sock'}")
    finally:
        server.close()
        await server.wait_closed()
    assert [e.seq for e in events] == list(range(1, 1001)) * 3
    assert all(e.payload == b"x" * 300 for e in events)


async def test_messages_given_as_many_buffers_arrive_whole_and_in_order(
        tmp_path: Path) -> None:
    frames = [wire.grpc_frame(wire.gadget_event(0, i, bytes([i % 251]) * (37 * i % 4000)))
              for i in range(1, 801)]
    manager = _Manager(b"", 0)
    manager.parts = [b"".join(frames[k:k + 50]) for k in range(0, 800, 50)]
    server = await _serve(tmp_path / "s.sock", manager)
    try:
        events = await asyncio.to_thread(_read_all, f"unix://{tmp_path / 's.sock'}")
    finally:
        server.close()
        await server.wait_closed()
    assert [e.seq for e in events] == list(range(1, 801))
    assert [e.payload for e in events] == [bytes([i % 251]) * (37 * i % 4000)
                                           for i in range(1, 801)]


async def test_flow_control_stops_the_writer_when_the_client_does_not_read(
        tmp_path: Path) -> None:
    frames = b"".join(wire.grpc_frame(wire.gadget_event(0, i, b"y" * 1000)) for i in range(1000))
    manager = _Manager(frames, 200)  # ~200 MB if nothing pushed back
    server = await _serve(tmp_path / "s.sock", manager)
    channel = grpc.insecure_channel(f"unix://{tmp_path / 's.sock'}")
    try:
        stub = rpc.GadgetManagerStub(channel)
        release = threading.Event()

        def requests() -> Any:
            yield pb.GadgetControlRequest(runRequest=pb.GadgetRunRequest(imageName="x",
                                                                         version=1))
            release.wait(30)

        call = stub.RunGadget(requests())  # started, never iterated: the client reads nothing
        while manager.writer is None or not manager.writer.waiting:
            assert manager.writer is None or manager.writer.bytes_written < 32 << 20, \
                "writer kept going: no back-pressure"
            await asyncio.sleep(0.01)  # polling the writer's state
        # It waits for the client: nothing more goes out while the client does not read.
        assert manager.writer.bytes_written < 32 << 20
        call.cancel()
        release.set()
    finally:
        channel.close()
        server.close()
        await server.wait_closed()


def test_the_h2_internals_the_writer_accounts_in_are_where_it_expects_them() -> None:
    from h2.config import H2Configuration
    from h2.connection import ConnectionInputs, H2Connection
    from h2.stream import StreamInputs

    conn = H2Connection(H2Configuration(client_side=False))
    assert isinstance(conn.outbound_flow_control_window, int)
    assert isinstance(conn.max_outbound_frame_size, int)
    assert hasattr(conn.state_machine, "process_input")
    assert isinstance(conn.streams, dict)
    assert ConnectionInputs.SEND_DATA and StreamInputs.SEND_DATA
    source = inspect.getsource(__import__("h2.stream").stream.H2Stream.send_data)
    assert "outbound_flow_control_window -=" in source  # the accounting the writer repeats
    from grpclib import protocol

    init = inspect.getsource(protocol.Stream.__init__)
    for name in ("self._transport", "self._h2_connection", "self.connection",
                 "self.window_updated"):
        assert name in init, name
    assert protocol.Stream.data_sent == 0 and protocol.Connection.data_sent == 0
    assert "data_send_process" in dir(protocol.Connection)


def test_data_frames_are_valid_http2_frames_of_at_most_the_peers_size() -> None:
    from hyperframe.frame import DataFrame, Frame

    from api.stream_writer import _Cursor, data_frames

    data = bytes(range(256)) * 200  # 51,200 bytes: three full 16 KiB frames and a short one
    # Given as three uneven buffers: frames cross their boundaries.
    parts = [memoryview(data[:1000]), memoryview(data[1000:30000]), memoryview(data[30000:])]
    out = b"".join(bytes(b) for b in data_frames(_Cursor(parts), len(data), 7, 16384))
    bodies, pos = [], 0
    while pos < len(out):
        frame, length = Frame.parse_frame_header(memoryview(out[pos:pos + 9]))
        assert isinstance(frame, DataFrame) and frame.stream_id == 7 and not frame.flags
        assert length <= 16384
        bodies.append(out[pos + 9:pos + 9 + length])
        pos += 9 + length
    assert [len(b) for b in bodies] == [16384, 16384, 16384, 51200 - 3 * 16384]
    assert b"".join(bodies) == data
