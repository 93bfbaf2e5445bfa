"""An instance's packets: the replay ring and the per-client queue of attached clients.

Packets and ``seq``. An instance numbers every payload packet it produces with an *instance
seq* (1, 2, ...; one packet per record for single data sources, one ``GadgetDataArray`` per
batch for array data sources or when the instance was created with
``operator.grpc.batch-max``). :class:`PacketRing` keeps the last ``eventBufferLength`` of them
for replay; each attached client has an :class:`Attacher`, a bounded drop-newest queue of
:data:`ATTACH_QUEUE` packets. A stream's ``seq`` is ``instance seq - base`` (see
api/instance.py for how an attach stream picks ``base``); packets a slow client lost show as
gaps, are counted in the ledger (stage ``attach``, in packets, reason ``queue_full``) and are
announced to that client by a warn log event.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from api.stream_writer import FramedWriter
from pipeline import wire
from pipeline.batch import Batch
from pipeline.ledger import REASON_QUEUE_FULL, STAGE_ATTACH, Ledger
from pipeline.severity import Severity

__all__ = ["ATTACH_QUEUE", "ATTACH_STAGE", "Attacher", "Chunk", "PacketRing", "node_field",
           "write_replay"]

ATTACH_QUEUE = 1024
"""Live packets one attached client may have waiting before new ones are dropped
(docs/gadget-service.md §3.3)."""
ATTACH_STAGE = STAGE_ATTACH
"""Ledger stage of every attached client of an instance (summed, so sessions that come and go
add no series), counted in packets."""
DROP_REPORT_INTERVAL = 1.0
"""At most one "you lost N events" log event per client per this many seconds."""
_WRITE_BUDGET = 1 << 20
"""Bytes (roughly) one attach write gathers before it goes out."""
_SEQ_MASK = 0xFFFFFFFF
_TAG_NODE = 0x0A  # GadgetData.node and GadgetDataArray.node are both field 1, string


@dataclass(slots=True)
class Chunk:
    """Consecutive payload packets of one data source, numbered from instance seq ``seq``.

    Either ``batch`` (one ``GadgetData`` packet per record, framed on demand with numpy) or
    ``payloads`` (already serialized ``GadgetData``/``GadgetDataArray`` packets) is set.
    """

    seq: int
    ds_id: int
    batch: Batch | None = None
    payloads: list[bytes] | None = None

    @property
    def packets(self) -> int:
        return len(self.batch) if self.batch is not None else len(self.payloads or ())

    @property
    def end(self) -> int:
        """The instance seq after the last packet."""
        return self.seq + self.packets

    @property
    def nbytes(self) -> int:
        if self.batch is not None:
            return self.batch.rows.nbytes + 32 * len(self.batch)
        return sum(len(p) + 16 for p in self.payloads or ())

    def slice(self, start: int, stop: int | None = None) -> Chunk:
        """Packets ``[start, stop)`` of this chunk, keeping their instance seqs."""
        if self.batch is not None:
            b = self.batch
            sub = Batch(b.schema, b.rows[start:stop], tuple(col[start:stop] for col in b.extra))
            return Chunk(self.seq + start, self.ds_id, batch=sub)
        return Chunk(self.seq + start, self.ds_id, payloads=(self.payloads or [])[start:stop])

    def compact(self) -> Chunk:
        """A copy that no longer pins a larger array it was sliced from."""
        if self.batch is not None and self.batch.rows.base is not None:
            b = self.batch
            return Chunk(self.seq, self.ds_id,
                          batch=Batch(b.schema, np.ascontiguousarray(b.rows).copy(), b.extra))
        return self

    def frame(self, base: int) -> bytes:
        """Framed ``GadgetEvent``s with stream seq = instance seq - ``base``."""
        first = self.seq - base
        if self.batch is not None:
            return wire.per_record_events(self.batch, first & _SEQ_MASK, self.ds_id)
        return b"".join(
            wire.grpc_frame(wire.gadget_event(wire.EVENT_TYPE_PAYLOAD, (first + i) & _SEQ_MASK,
                                              p, self.ds_id))
            for i, p in enumerate(self.payloads or ()))


class PacketRing:
    """The last ``capacity`` packets of an instance, oldest first, for replay.

    Args:
        capacity: packets kept; older ones are forgotten.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._chunks: deque[Chunk] = deque()
        self._count = 0
        self.next_seq = 1

    def __len__(self) -> int:
        return self._count

    @property
    def first_seq(self) -> int:
        """Instance seq of the oldest packet kept (``next_seq`` when empty)."""
        return self._chunks[0].seq if self._chunks else self.next_seq

    def append(self, chunk: Chunk) -> None:
        if chunk.packets > self.capacity:
            chunk = chunk.slice(chunk.packets - self.capacity).compact()
        self._chunks.append(chunk)
        self._count += chunk.packets
        self.next_seq = chunk.end
        while self._count > self.capacity:
            head = self._chunks[0]
            excess = self._count - self.capacity
            if head.packets <= excess:
                self._chunks.popleft()
                self._count -= head.packets
            else:
                self._chunks[0] = head.slice(excess).compact()
                self._count -= excess

    def since(self, seq: int) -> list[Chunk]:
        """The kept packets with instance seq ``>= seq``, oldest first."""
        out = []
        for c in self._chunks:
            if c.end <= seq:
                continue
            out.append(c if c.seq >= seq else c.slice(seq - c.seq))
        return out


class Attacher:
    """One attached client: a bounded, drop-newest queue of packets and the task sending them.

    The queue counts packets; a packet offered while ``capacity`` packets wait (including the
    ones being written) is dropped, counted in the ledger and later announced to the client.
    """

    def __init__(self, name: str, capacity: int, ledger: Ledger, label: str) -> None:
        self.name = name
        self.capacity = capacity
        self._ledger = ledger
        self._label = label
        self._items: deque[Chunk] = deque()
        self._logs: deque[bytes] = deque(maxlen=64)
        self._depth = 0
        self._closed = False
        self._wake = asyncio.Event()
        self.dropped = 0
        self.sent = 0
        self._reported = 0
        self._last_report = 0.0

    def offer(self, chunk: Chunk) -> None:
        """Queues what fits of ``chunk``; never blocks."""
        n = chunk.packets
        if self._closed or n == 0:
            return
        self._ledger.produced(self._label, ATTACH_STAGE, n)
        room = max(0, self.capacity - self._depth)
        take = min(n, room)
        if take:
            self._items.append(chunk if take == n else chunk.slice(0, take))
            self._depth += take
            self._wake.set()
        if n > take:
            self.dropped += n - take
            self._ledger.dropped(self._label, ATTACH_STAGE, n - take, REASON_QUEUE_FULL)

    def log(self, severity: int, message: str) -> None:
        """Queues a log event for this client (bounded; the daemon log has them all)."""
        if not self._closed:
            self._logs.append(wire.log_event(severity, message))
            self._wake.set()

    def close(self) -> None:
        """No more packets; :meth:`run` returns once what is queued was written."""
        self._closed = True
        self._wake.set()

    def abandon(self, reason: str) -> None:
        """Forgets what is still queued (the client went away), counting it as dropped."""
        self._closed = True
        if self._depth:
            self._ledger.dropped(self._label, ATTACH_STAGE, self._depth, reason)
        self._items.clear()
        self._depth = 0

    def _drop_report(self, final: bool) -> bytes:
        lost = self.dropped - self._reported
        now = time.monotonic()
        if lost <= 0 or (not final and now - self._last_report < DROP_REPORT_INTERVAL):
            return b""
        self._reported = self.dropped
        self._last_report = now
        return wire.log_event(Severity.WARN, f"this client is too slow: {lost} events were "
                              f"dropped for it ({self.dropped} in total); the seq gaps show where")

    async def run(self, writer: FramedWriter, base: int) -> None:
        """Writes queued packets (stream seq = instance seq - ``base``) until closed and
        drained. Write errors propagate: the client is gone."""
        while True:
            if not self._items and not self._logs:
                if self._closed:
                    await writer.write(self._drop_report(final=True))
                    return
                self._wake.clear()
                # Wake up for a pending drop report even when nothing else arrives.
                timeout = DROP_REPORT_INTERVAL if self.dropped > self._reported else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                if not self._items and not self._logs:
                    await writer.write(self._drop_report(final=False))
                continue
            parts = [self._drop_report(final=False), *self._logs]
            self._logs.clear()
            taken = packets = size = 0
            for chunk in self._items:
                parts.append(chunk.frame(base))
                taken += 1
                packets += chunk.packets
                size += chunk.nbytes
                if size >= _WRITE_BUDGET:
                    break
            # The packets count against the queue until written, so a client that does not
            # read fills its queue and loses the newest packets, not the daemon's memory.
            await writer.write(b"".join(parts))
            for _ in range(taken):
                self._items.popleft()
            self._depth -= packets
            self.sent += packets
            self._ledger.delivered(self._label, ATTACH_STAGE, packets)


async def write_replay(writer: FramedWriter, chunks: list[Chunk], base: int) -> int:
    parts: list[bytes] = []
    size = 0
    sent = 0
    for c in chunks:
        parts.append(c.frame(base))
        size += c.nbytes
        sent += c.packets
        if size >= _WRITE_BUDGET:
            await writer.write(b"".join(parts))
            parts, size = [], 0
    await writer.write(b"".join(parts))
    return sent


def node_field(node: str) -> bytes:
    """``node`` (field 1) as protobuf bytes; prepended to a serialized ``GadgetData`` or
    ``GadgetDataArray`` (which upstream never fills) it sets that message's node."""
    return wire.length_delimited(_TAG_NODE, node.encode())

