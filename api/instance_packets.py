"""An instance's packets: the replay ring and the per-client queue of attached clients.

Packets and ``seq``. An instance numbers every payload packet it produces with an *instance
seq* (1, 2, ...; one packet per record for single data sources, one ``GadgetDataArray`` per
batch for array data sources or when the instance was created with
``operator.grpc.batch-max``). :class:`PacketRing` keeps the last ``eventBufferLength`` of them
for replay; each attached client has an :class:`Attacher`, a bounded drop-newest queue of
``operator.grpc.attach-queue`` packets (:data:`ATTACH_QUEUE` by default; pipeline/wire.py
declares the param). A stream's ``seq`` is
``instance seq - base`` (see api/instance.py for how an attach stream picks ``base``); packets a
slow client lost show as gaps, are counted in the ledger (stage ``attach``, in packets, reason
``queue_full``) and are announced to that client by a warn log event.

One encoding for everyone. A batch becomes a :class:`Chunk` once: its packets framed as
``GadgetEvent`` messages, ready for the wire, with each ``seq`` written as a five-byte varint (a
varint may carry redundant continuation bytes, and every protobuf decoder reads them: gRPC's
Go and Python runtimes, protowire) holding the instance seq. The replay ring and every client's
queue hold that same object. A client numbered from base 0 (a resuming one, and every client of
an instance whose ring has not wrapped yet) is sent the chunk's bytes as they are; any other
gets a copy with its five seq bytes per packet rewritten in one numpy pass.

Compact buffers. A record's large C string fields (trace_exec's 5 KiB ``args`` and its 512-byte
paths) are kept without the bytes after each string's end; they are zeros on the wire (and the
record's stale ring bytes there never leave the daemon), put back when a client's copy is made.
So the ring and the queues hold the used part of such records, not their maximum size.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from api.stream_writer import FramedWriter
from pipeline import wire
from pipeline.batch import Batch
from pipeline.ledger import REASON_QUEUE_FULL, STAGE_ATTACH, Ledger
from pipeline.schema import DataSourceSchema, Kind
from pipeline.severity import Severity

__all__ = ["ATTACH_QUEUE", "ATTACH_QUEUE_BYTES", "ATTACH_STAGE", "Attacher", "Chunk",
           "PacketRing", "node_field", "write_replay"]

ATTACH_QUEUE = wire.ATTACH_QUEUE_DEFAULT
"""Live packets one attached client may have waiting before new ones are dropped, by default.
Upstream keeps 1024 (docs/gadget-service.md §3.3); here one drain at the kernel-side limit is
already ~1000-2000 records. Measured (bench/fanout.py's workload, 200,000 opens; four
upstream-style Go clients): with 65536 they were lossless at 200k opens/s and lost 25-65 % at
300k/s, what one client alone takes; with 262144 none lost at 300k/s nor unthrottled (880k/s).
The queue holds references to the chunks the ring and the other clients hold, so its length
costs memory only while a client is behind, and :data:`ATTACH_QUEUE_BYTES` bounds that."""
ATTACH_QUEUE_BYTES = 128 << 20
"""Encoded bytes one attached client may have waiting (262144 trace_open packets are ~136 MB,
trace_exec's compact ones ~1-3 KB each): whichever bound is reached first drops."""
ATTACH_STAGE = STAGE_ATTACH
"""Ledger stage of every attached client of an instance (summed, so sessions that come and go
add no series), counted in packets."""
DROP_REPORT_INTERVAL = 1.0
"""At most one "you lost N events" log event per client per this many seconds."""
COMPACT_FIELD = 512
"""A C string field of payload 0 this large or larger is kept only up to its end (see
above): trace_exec's args (5 KiB) and paths (512 bytes each)."""
_WRITE_BUDGET = 1 << 20
"""Bytes (roughly) one attach write gathers before it goes out."""
_SEQ_MASK = 0xFFFFFFFF
_TAG_NODE = 0x0A  # GadgetData.node and GadgetDataArray.node are both field 1, string
_TAG_SEQ = 0x10  # GadgetEvent.seq, varint
_TAG_PAYLOAD = 0x1A  # GadgetEvent.payload, GadgetData.data: field 3, bytes
_TAG_DSID = 0x20  # GadgetEvent.dataSourceID, varint
_SEQ_AT = 6
"""Where a packet's seq bytes start: after the gRPC prefix (5 bytes) and the seq tag."""
_SEQ_LEN = len(wire.SEQ_PLACEHOLDER)


def _frame_head(body_len: int) -> bytes:
    """gRPC prefix and seq field (seq bytes zero until numbered) of a GadgetEvent whose other
    fields take ``body_len`` bytes."""
    return (b"\x00" + (1 + _SEQ_LEN + body_len).to_bytes(4, "big") + bytes([_TAG_SEQ])
            + wire.SEQ_PLACEHOLDER)


def _dsid_tail(ds_id: int) -> bytes:
    return bytes([_TAG_DSID]) + wire.varint(ds_id) if ds_id else b""


def _cut_fields(schema: DataSourceSchema) -> list[tuple[int, int]]:
    """(offset, size) of payload 0's C string fields worth keeping only in part."""
    return sorted((f.offs, f.size) for f in schema.fields
                  if f.payload_index == 0 and f.has_value and not f.is_array
                  and f.base_kind is Kind.CSTRING and f.size >= COMPACT_FIELD)


def _put_seqs(buf: npt.NDArray[np.uint8], at: npt.NDArray[np.intp],
              seqs: npt.NDArray[np.uint64]) -> None:
    """Writes each seq as a five-byte varint at ``at`` (the seq bytes of each packet)."""
    for k in range(_SEQ_LEN):
        byte = (seqs >> np.uint64(7 * k)) & np.uint64(0x7F)
        if k < _SEQ_LEN - 1:
            byte |= np.uint64(0x80)
        buf[at + k] = byte.astype(np.uint8)


class Chunk:
    """Consecutive payload packets of one data source, numbered from instance seq ``seq``:
    a window ``[lo, hi)`` onto packets framed once (see the module docstring).

    Build one with :meth:`from_records` or :meth:`from_payloads`, number it with
    :meth:`number`; slices share the encoded bytes.
    """

    __slots__ = ("_data", "_gap_at", "_gap_len", "_starts", "ds_id", "hi", "lo", "seq")

    def __init__(self, data: bytearray, starts: npt.NDArray[np.intp], ds_id: int,
                 gap_at: npt.NDArray[np.intp] | None = None,
                 gap_len: npt.NDArray[np.intp] | None = None, seq: int = 0, lo: int = 0,
                 hi: int | None = None) -> None:
        self._data = data
        self._starts = starts
        """Where each packet starts in ``_data`` (one more entry: the end)."""
        self._gap_at = gap_at
        """Per packet and cut field, where (from the full packet's start) the zeros that were
        cut go back; None: no cut."""
        self._gap_len = gap_len
        self.ds_id = ds_id
        self.lo = lo
        self.hi = len(starts) - 1 if hi is None else hi
        self.seq = seq
        """Instance seq of the window's first packet (0 until numbered)."""

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def from_records(cls, batch: Batch, ds_id: int) -> Chunk:
        """One ``GadgetEvent{GadgetData}`` packet per record, every payload included; large C
        strings of payload 0 kept up to their NUL (see the module docstring)."""
        n = len(batch)
        cuts: list[wire.Cut] = []
        for offs, size in _cut_fields(batch.schema) if n else ():
            field = batch.rows[:, offs: offs + size]
            nul = field.argmin(axis=1)  # the first NUL (0 is the least byte), if there is one
            has_nul = field[np.arange(n), nul] == 0
            used = np.where(has_nul, nul + 1, size).astype(np.int64)  # the NUL is kept
            if not bool((used == size).all()):
                cuts.append((offs, size, used))
        data, lens, head_len = wire.framed_records(batch, None, ds_id, cuts)
        starts = np.zeros(n + 1, dtype=np.intp)
        np.cumsum(lens, out=starts[1:])
        if not cuts:
            return cls(data, starts, ds_id)
        gap_at = np.stack([head_len + offs + used for offs, _, used in cuts], axis=1)
        gap_len = np.stack([size - used for _, size, used in cuts], axis=1)
        return cls(data, starts, ds_id, gap_at.astype(np.intp), gap_len.astype(np.intp))

    @classmethod
    def from_payloads(cls, payloads: Sequence[bytes], ds_id: int) -> Chunk:
        """One ``GadgetEvent`` per already serialized ``GadgetData``/``GadgetDataArray``."""
        tail = _dsid_tail(ds_id)
        parts: list[bytes] = []
        starts = [0]
        for p in payloads:
            body = bytes([_TAG_PAYLOAD]) + wire.varint(len(p))
            frame = _frame_head(len(body) + len(p) + len(tail)) + body + p + tail
            parts.append(frame)
            starts.append(starts[-1] + len(frame))
        return cls(bytearray(b"".join(parts)), np.array(starts, dtype=np.intp), ds_id)

    def number(self, seq: int) -> None:
        """Gives the packets instance seqs ``seq, seq+1, ...`` (written into the frames)."""
        self.seq = seq
        if self.packets:
            at = self._starts[self.lo: self.hi] + _SEQ_AT
            seqs = (np.arange(self.packets, dtype=np.uint64) + np.uint64(seq)) & np.uint64(
                _SEQ_MASK)
            _put_seqs(np.frombuffer(self._data, dtype=np.uint8), at, seqs)

    # -- reading ----------------------------------------------------------------------------

    @property
    def packets(self) -> int:
        return self.hi - self.lo

    @property
    def end(self) -> int:
        """The instance seq after the last packet."""
        return self.seq + self.packets

    @property
    def nbytes(self) -> int:
        """Bytes this window holds (its share of the encoded bytes)."""
        return int(self._starts[self.hi] - self._starts[self.lo])

    def fitting(self, budget: int) -> int:
        """How many of the window's first packets take at most ``budget`` bytes."""
        if self.nbytes <= budget:
            return self.packets
        ends = self._starts[self.lo + 1: self.hi + 1] - self._starts[self.lo]
        return int(np.searchsorted(ends, budget, side="right"))

    @property
    def encoded(self) -> bytearray:
        """The encoded bytes behind this window: the same object for every slice of a chunk
        (what the ring and the clients' queues share)."""
        return self._data

    def slice(self, start: int, stop: int | None = None) -> Chunk:
        """Packets ``[start, stop)`` of this window, keeping their instance seqs (no copy)."""
        lo, hi, _ = slice(start, stop).indices(self.packets)
        return Chunk(self._data, self._starts, self.ds_id, self._gap_at, self._gap_len,
                     self.seq + lo, self.lo + lo, self.lo + max(lo, hi))

    def compact(self) -> Chunk:
        """A copy holding only this window's bytes (no longer pinning the rest)."""
        a, b = int(self._starts[self.lo]), int(self._starts[self.hi])
        if a == 0 and b == len(self._data):
            return self
        gaps = (None, None) if self._gap_at is None or self._gap_len is None else (
            self._gap_at[self.lo: self.hi].copy(), self._gap_len[self.lo: self.hi].copy())
        return Chunk(self._data[a:b], self._starts[self.lo: self.hi + 1] - a, self.ds_id,
                     gaps[0], gaps[1], self.seq)

    def frame(self, base: int) -> bytes | memoryview:
        """The window's packets for the wire, with stream seq = instance seq - ``base``."""
        a, b = int(self._starts[self.lo]), int(self._starts[self.hi])
        if base == 0 and self._gap_at is None:
            return memoryview(self._data)[a:b]
        buf = np.frombuffer(self._data, dtype=np.uint8)[a:b].copy()
        rel = self._starts[self.lo: self.hi] - a
        if base:
            seqs = (np.arange(self.packets, dtype=np.uint64)
                    + np.uint64((self.seq - base) & _SEQ_MASK)) & np.uint64(_SEQ_MASK)
            _put_seqs(buf, rel + _SEQ_AT, seqs)
        if self._gap_at is None or self._gap_len is None:
            return buf.tobytes()
        return _refill(buf, rel, self._gap_at[self.lo: self.hi], self._gap_len[self.lo: self.hi])


def _refill(buf: npt.NDArray[np.uint8], rel: npt.NDArray[np.intp], gap_at: npt.NDArray[np.intp],
            gap_len: npt.NDArray[np.intp]) -> bytes:
    """The packets with their cut zeros put back: packet i's gap k at ``gap_at[i, k]`` from its
    start (in the full packet), ``gap_len[i, k]`` long."""
    n = len(rel)
    full = np.diff(np.append(rel, len(buf))) + gap_len.sum(axis=1)
    out_starts = np.zeros(n, dtype=np.intp)
    np.cumsum(full[:-1], out=out_starts[1:])
    total = int(full.sum())
    # +1 at each gap's start, -1 at its end; the running sum marks the zeros.
    marks = np.zeros(total + 1, dtype=np.int32)
    np.add.at(marks, (out_starts[:, None] + gap_at).ravel(), 1)
    np.add.at(marks, (out_starts[:, None] + gap_at + gap_len).ravel(), -1)
    zero = np.cumsum(marks[:-1]) > 0
    out = np.zeros(total, dtype=np.uint8)
    out[~zero] = buf
    return out.tobytes()


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

    The queue counts packets and their bytes; a packet offered while ``capacity`` packets or
    ``max_bytes`` bytes wait (including the ones being written) is dropped, counted in the
    ledger and later announced to the client.
    """

    def __init__(self, name: str, capacity: int, ledger: Ledger, label: str,
                 max_bytes: int = ATTACH_QUEUE_BYTES) -> None:
        self.name = name
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._ledger = ledger
        self._label = label
        self._items: deque[Chunk] = deque()
        self._logs: deque[bytes] = deque(maxlen=64)
        self._depth = 0
        self._bytes = 0
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
        take = min(n, max(0, self.capacity - self._depth),
                   chunk.fitting(max(0, self.max_bytes - self._bytes)))
        if take:
            part = chunk if take == n else chunk.slice(0, take)
            self._items.append(part)
            self._depth += take
            self._bytes += part.nbytes
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
        self._bytes = 0

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
            parts: list[bytes | memoryview] = [self._drop_report(final=False), *self._logs]
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
            await writer.write(parts)  # gathered by the writer: no joined copy per client
            for _ in range(taken):
                self._bytes -= self._items.popleft().nbytes
            self._depth -= packets
            self.sent += packets
            self._ledger.delivered(self._label, ATTACH_STAGE, packets)


async def write_replay(writer: FramedWriter, chunks: list[Chunk], base: int) -> int:
    parts: list[bytes | memoryview] = []
    size = 0
    sent = 0
    for c in chunks:
        parts.append(c.frame(base))
        size += c.nbytes
        sent += c.packets
        if size >= _WRITE_BUDGET:
            await writer.write(parts)
            parts, size = [], 0
    await writer.write(parts)
    return sent


def node_field(node: str) -> bytes:
    """``node`` (field 1) as protobuf bytes; prepended to a serialized ``GadgetData`` or
    ``GadgetDataArray`` (which upstream never fills) it sets that message's node."""
    return wire.length_delimited(_TAG_NODE, node.encode())

