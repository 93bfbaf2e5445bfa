"""Serving one run to one gRPC stream: the GadgetInfo event, then payloads with ``seq``, logs,
stop, timeout, and teardown when either side goes away.

Records travel as the spec wants them for upstream clients, one ``GadgetEvent{GadgetData}`` per
record, but each drained batch is framed in one pass (pipeline.wire) and written in one call.
Clients that ask for ``operator.grpc.batch-max`` get ``GadgetDataArray`` packets instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from api.gadget_info import as_array, sorted_datasources
from api.stream_writer import FramedWriter
from pipeline import wire
from pipeline._gen import gadget_service_pb2 as pb
from pipeline.batch import Batch
from pipeline.graph import Edge, EdgeClosed
from pipeline.schema import DataSourceSchema, DataSourceType

_logger = logging.getLogger(__name__)


MAX_MESSAGE = 4 << 20
"""Upstream clients refuse messages over 4 MiB (grpc-go's default receive limit)."""
_MESSAGE_MARGIN = 1024
LOG_QUEUE = 256


@dataclass(frozen=True, slots=True)
class StreamLayout:
    """What a stream announced: data sources in wire order and the packet mode."""

    schemas: tuple[DataSourceSchema, ...]
    ids: dict[str, int]
    batch_max: int
    linger: float

    @classmethod
    def build(cls, schemas: Sequence[DataSourceSchema], batch_max: int, linger: float,
              linger_text: str) -> StreamLayout:
        ordered = sorted_datasources(schemas)
        if batch_max:
            ordered = [as_array(s, linger_text) if s.type == 1 else s for s in ordered]
        return cls(tuple(ordered), {s.name: i for i, s in enumerate(ordered)}, batch_max, linger)


class StreamSink:
    """Moves batches from one edge to one client, numbering packets with ``seq``.

    In per-record mode a record's seq is its position on the edge plus one, so records the
    edge dropped show as gaps. In batched mode seq counts packets, and dropped records advance
    it by the packets they would have filled.
    """

    def __init__(self, writer: FramedWriter, edge: Edge, layout: StreamLayout,
                 write_lock: asyncio.Lock, seq_offset: int = 0) -> None:
        self._writer = writer
        self._edge = edge
        self._layout = layout
        self._lock = write_lock
        self._seq_offset = seq_offset
        self._next_pos = 0
        self._packets = 0
        self.records_sent = 0

    async def run(self) -> None:
        """Until the edge is closed and drained; write errors propagate (client gone)."""
        while True:
            try:
                pos, batch = await self._edge.get()
            except EdgeClosed:
                return
            if self._layout.batch_max == 0 and batch.schema.type == DataSourceType.ARRAY:
                await self._send_array_batch(batch)
            elif self._layout.batch_max:
                batches = [(pos, batch)]
                if len(batch) < self._layout.batch_max:
                    await self._linger(batches)
                await self._send_arrays(batches)
            else:
                await self._send_records(pos, batch)

    async def _linger(self, batches: list[tuple[int, Batch]]) -> None:
        deadline = time.monotonic() + self._layout.linger
        total = len(batches[0][1])
        while total < self._layout.batch_max:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            item = self._edge.get_nowait()
            if item is None:
                try:
                    item = await asyncio.wait_for(self._edge.get(), left)
                except (TimeoutError, EdgeClosed):
                    return
            batches.append(item)
            total += len(item[1])

    async def _send_records(self, pos: int, batch: Batch) -> None:
        ds_id = self._layout.ids[batch.schema.name]
        data = wire.per_record_events(batch, self._seq_offset + pos + 1, ds_id)
        async with self._lock:
            await self._writer.write(data)
        self._edge.delivered(len(batch))
        self.records_sent += len(batch)

    async def _send_array_batch(self, batch: Batch) -> None:
        """An array data source's batch (a snapshot, one top interval) as one
        ``GadgetDataArray`` packet, split only where it would pass the message limit. Its seq
        counts packets (array-only gadgets; per-record seqs are record positions)."""
        ds_id = self._layout.ids[batch.schema.name]
        widest = batch.schema.record_size + 16 + max(
            (sum(len(col[i]) + 6 for col in batch.extra) for i in range(len(batch))), default=0)
        cap = max(1, (MAX_MESSAGE - _MESSAGE_MARGIN) // widest)
        data, packets = wire.array_events(batch, self._seq_offset + self._packets + 1, ds_id, cap)
        self._packets += packets
        async with self._lock:
            await self._writer.write(data)
        self._edge.delivered(len(batch))
        self.records_sent += len(batch)

    async def _send_arrays(self, items: list[tuple[int, Batch]]) -> None:
        out = []
        sent = 0
        per_packet_cap = self._layout.batch_max
        for pos, batch in items:
            if pos > self._next_pos:  # the edge dropped records: keep seq honest
                self._packets += math.ceil((pos - self._next_pos) / per_packet_cap)
            self._next_pos = pos + len(batch)
            size = max(1, batch.schema.record_size + 16)
            cap = max(1, min(per_packet_cap, (MAX_MESSAGE - _MESSAGE_MARGIN) // size))
            ds_id = self._layout.ids[batch.schema.name]
            data, packets = wire.array_events(batch, self._seq_offset + self._packets + 1, ds_id,
                                              cap)
            self._packets += packets
            out.append(data)
            sent += len(batch)
        async with self._lock:
            await self._writer.write(b"".join(out))
        self._edge.delivered(sent)
        self.records_sent += sent


class LogForwarder:
    """Sends log events at or below the client's level, without ever blocking the run: at
    most :data:`LOG_QUEUE` wait to be written; more are dropped (counted in ``dropped``; the
    daemon's own log has them all). Every stream consumer forwards its run's logs with one."""

    def __init__(self, writer: FramedWriter, lock: asyncio.Lock, level: int) -> None:
        self._writer = writer
        self._lock = lock
        self._level = level
        self._pending: set[asyncio.Task[None]] = set()
        self.dropped = 0

    def __call__(self, severity: int, message: str) -> None:
        if severity > self._level or severity <= 0:
            return
        if len(self._pending) >= LOG_QUEUE:
            self.dropped += 1  # the daemon's own log still has it
            return
        task = asyncio.create_task(self._send(severity, message))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _send(self, severity: int, message: str) -> None:
        with contextlib.suppress(Exception):
            async with self._lock:
                await self._writer.write(wire.log_event(severity, message))

    async def flush(self, timeout: float) -> None:
        """Waits up to ``timeout`` seconds for the log events on their way out."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)

    async def close(self) -> None:
        for t in list(self._pending):
            t.cancel()
        self._pending.clear()


async def read_control(stream: object) -> str:
    """Reads the rest of a run stream; returns why the run should stop.

    Half-close and receive errors mean stop, as upstream treats them (docs/gadget-service.md §3.2).
    """
    while True:
        try:
            msg = await stream.recv_message()  # type: ignore[attr-defined]
        except Exception:
            return "client gone"
        if msg is None:
            return "client closed its send side"
        if msg.WhichOneof("Event") == "stopRequest":
            return "stop requested"
        _logger.info("received unexpected request on a running stream; ignoring it")


def info_event(info: pb.GadgetInfo) -> bytes:
    return wire.info_event(info.SerializeToString())
