"""Gadget instances: headless runs that outlive their clients (spec 3.3, 5.4 and 6).

An instance is a :class:`~pipeline.run.GadgetRun` started from a ``CreateGadgetInstanceRequest``
and kept running by the daemon: its sinks (``ctx.sinks``) get every record, and the last
``eventBufferLength`` payload packets (1024 when 0) stay in memory so a client that attaches
later first sees what happened before it came. Instances are persisted by
:class:`api.store.InstanceStore` and restarted, with an empty buffer, when the daemon starts.

Packets and ``seq``. The instance numbers every payload packet it produces with an *instance
seq* (1, 2, ...; one packet per record for single data sources, one ``GadgetDataArray`` per
batch for array data sources or when the instance was created with
``operator.grpc.batch-max``). An attach stream announces the GadgetInfo (``id`` and ``name``
set), replays the buffer, then follows live packets through its own queue of
:data:`ATTACH_QUEUE` packets (drop-newest). A stream's ``seq`` is ``instance seq - base``:
without the extension below ``base`` is chosen so the replay is ``1..N`` and live packets go
on from ``N+1`` (spec 3.3); packets a slow client lost show as gaps, are counted in the ledger
(stage ``attach``, in packets, reason ``queue_full``) and are announced to that client by a warn
log event.

Extension (gadgetpipe only; upstream clients neither send nor need it):

* request metadata ``gadgetpipe-from-seq: <N>`` on an attach (``RunGadget`` with an
  ``attachRequest``): replay only packets whose instance seq is ``>= N``, and number the
  stream with instance seqs (``base = 0``). A client that saw instance seq ``S`` reconnects
  with ``N = S + 1`` and misses nothing still buffered, with no duplicates. If packets from
  ``N`` on are no longer buffered, a warn log says how many are gone and the gap shows. An
  ``N`` beyond the instance's next seq means the instance was restarted since (seqs start
  over): the whole buffer is replayed, after a warn log.
* response initial metadata ``gadgetpipe-seq-base: <base>`` on every attach stream: instance
  seq = stream seq + base (so a client attached the upstream way can resume too).

Multi-node. ``GadgetInstance.nodes`` names nodes of this daemon's ``nodes`` setting (name ->
address of a peer daemon) and/or this daemon's own node name. The instance then runs locally
only if its own node is listed, and for each peer it creates the same instance there (same id
and name, ``nodes`` cleared), attaches to it (resuming with ``gadgetpipe-from-seq`` after a
reconnect) and merges the peer's packets into its own buffer, with ``GadgetData.node`` /
``GadgetDataArray.node`` set on every packet. A peer that is down is logged (and reported to
attached clients with a warn log event naming it) and retried with backoff; the others go on.
Removing the instance removes it on the peers too.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from grpclib import GRPCError, Status
from grpclib.client import Channel

from api._gen import gadget_service_grpc as svc
from api._gen import gadget_service_pb2 as pb
from api.context import ServiceContext
from api.gadget_info import gadget_info
from api.gadget_manager import check_version, new_run
from api.run_stream import MAX_MESSAGE, StreamLayout, info_event
from api.store import InstanceStore, StoreProblem
from api.stream_writer import FramedWriter
from pipeline import wire
from pipeline.batch import Batch
from pipeline.gadget import GadgetError, GadgetSpec
from pipeline.graph import Edge, EdgeClosed, Overflow
from pipeline.ledger import Ledger
from pipeline.run import GadgetRun
from pipeline.schema import DataSourceType
from pipeline.wire import BATCH_LINGER, BATCH_MAX

__all__ = [
    "ATTACH_QUEUE",
    "DEFAULT_EVENT_BUFFER",
    "FROM_SEQ_METADATA",
    "SEQ_BASE_METADATA",
    "GadgetInstanceManager",
    "InstanceManager",
    "InstanceStatus",
    "PeerPool",
]

_logger = logging.getLogger(__name__)

FROM_SEQ_METADATA = "gadgetpipe-from-seq"
"""Attach request metadata: replay from this instance seq on (see the module docstring)."""
SEQ_BASE_METADATA = "gadgetpipe-seq-base"
"""Attach response initial metadata: instance seq = stream seq + this."""
DEFAULT_EVENT_BUFFER = 1024
"""Packets an instance keeps for replay when ``eventBufferLength`` is 0 (spec 6.4)."""
MAX_EVENT_BUFFER = 65536
"""Largest ``eventBufferLength`` accepted: the buffer lives in the daemon's memory."""
ATTACH_QUEUE = 1024
"""Live packets one attached client may have waiting before new ones are dropped (spec 3.3)."""
ATTACH_STAGE = "attach"
"""Ledger stage of every attached client of an instance (summed, so sessions that come and go
add no series), counted in packets."""
READY_WAIT = 10.0
"""Seconds GetGadgetInfo (flag 1) and attach wait for an instance that is still starting."""
DROP_REPORT_INTERVAL = 1.0
"""At most one "you lost N events" log event per client per this many seconds."""
PEER_CALL_TIMEOUT = 10.0
PEER_RETRY_MIN = 0.5
PEER_RETRY_MAX = 10.0
INSTANCE_EDGE = 1 << 16
"""Records the instance's own edge may hold; it blocks (never drops): its consumer only copies
references into the buffer and the client queues."""
_WRITE_BUDGET = 1 << 20
"""Bytes (roughly) one attach write gathers before it goes out."""
_MESSAGE_MARGIN = 1024
_SEQ_MASK = 0xFFFFFFFF
_TAG_NODE = 0x0A  # GadgetData.node and GadgetDataArray.node are both field 1, string
_LOG_SHIFT = wire.EVENT_LOG_SHIFT
_WARN = 3

ID_RE = re.compile(r"^[a-f0-9]{32}$")
NAME_RE = re.compile(r"^[a-z0-9-_]{1,32}$")

_ADJECTIVES = (
    "admiring", "amazing", "awesome", "blissful", "bold", "brave", "busy", "charming",
    "clever", "cool", "dazzling", "determined", "eager", "ecstatic", "elegant", "epic",
    "festive", "focused", "friendly", "funny", "gallant", "gifted", "happy", "hopeful",
    "jolly", "keen", "kind", "laughing", "lucid", "magical", "modest", "nice", "nifty",
    "optimistic", "peaceful", "practical", "quirky", "relaxed", "serene", "sharp", "stoic",
    "tender", "trusting", "upbeat", "vibrant", "wizardly", "youthful", "zealous",
)
_SURNAMES = (
    "agnesi", "albattani", "allen", "archimedes", "babbage", "bartik", "bell", "bhabha",
    "borg", "curie", "darwin", "dijkstra", "einstein", "euler", "fermat", "feynman",
    "franklin", "galileo", "gauss", "goldberg", "hamilton", "hawking", "hopper", "hypatia",
    "johnson", "kepler", "knuth", "lamport", "lovelace", "mayer", "mccarthy", "meitner",
    "newton", "noether", "pascal", "perlman", "ritchie", "shannon", "sinoussi", "thompson",
    "torvalds", "turing", "wilson", "wozniak", "yalow", "zhukovsky",
)


def random_name(taken: Iterable[str]) -> str:
    """A Docker-style ``adjective_surname`` not in ``taken`` (a digit is added on a clash)."""
    used = set(taken)
    for attempt in range(64):
        name = f"{secrets.choice(_ADJECTIVES)}_{secrets.choice(_SURNAMES)}"
        if attempt > 8:
            name = f"{name[:30]}{secrets.randbelow(100)}"
        if name not in used and NAME_RE.match(name):
            return name
    return secrets.token_hex(8)


# ---------------------------------------------------------------------------------------------
# packets, the replay buffer, the per-client queue


@dataclass(slots=True)
class _Chunk:
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

    def slice(self, start: int, stop: int | None = None) -> _Chunk:
        """Packets ``[start, stop)`` of this chunk, keeping their instance seqs."""
        if self.batch is not None:
            b = self.batch
            sub = Batch(b.schema, b.rows[start:stop], tuple(col[start:stop] for col in b.extra))
            return _Chunk(self.seq + start, self.ds_id, batch=sub)
        return _Chunk(self.seq + start, self.ds_id, payloads=(self.payloads or [])[start:stop])

    def compact(self) -> _Chunk:
        """A copy that no longer pins a larger array it was sliced from."""
        if self.batch is not None and self.batch.rows.base is not None:
            b = self.batch
            return _Chunk(self.seq, self.ds_id,
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
        self._chunks: deque[_Chunk] = deque()
        self._count = 0
        self.next_seq = 1

    def __len__(self) -> int:
        return self._count

    @property
    def first_seq(self) -> int:
        """Instance seq of the oldest packet kept (``next_seq`` when empty)."""
        return self._chunks[0].seq if self._chunks else self.next_seq

    def append(self, chunk: _Chunk) -> None:
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

    def since(self, seq: int) -> list[_Chunk]:
        """The kept packets with instance seq ``>= seq``, oldest first."""
        out = []
        for c in self._chunks:
            if c.end <= seq:
                continue
            out.append(c if c.seq >= seq else c.slice(seq - c.seq))
        return out


class _Attacher:
    """One attached client: a bounded, drop-newest queue of packets and the task sending them.

    The queue counts packets; a packet offered while ``capacity`` packets wait (including the
    ones being written) is dropped, counted in the ledger and later announced to the client.
    """

    def __init__(self, name: str, capacity: int, ledger: Ledger, label: str) -> None:
        self.name = name
        self.capacity = capacity
        self._ledger = ledger
        self._label = label
        self._items: deque[_Chunk] = deque()
        self._logs: deque[bytes] = deque(maxlen=64)
        self._depth = 0
        self._closed = False
        self._wake = asyncio.Event()
        self.dropped = 0
        self.sent = 0
        self._reported = 0
        self._last_report = 0.0

    def offer(self, chunk: _Chunk) -> None:
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
            self._ledger.dropped(self._label, ATTACH_STAGE, n - take, "queue_full")

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
        return wire.log_event(_WARN, f"this client is too slow: {lost} events were dropped for "
                              f"it ({self.dropped} in total); the seq gaps show where")

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


async def _write_replay(writer: FramedWriter, chunks: list[_Chunk], base: int) -> int:
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


# ---------------------------------------------------------------------------------------------
# peers


class PeerPool:
    """grpclib channels to the peer daemons of this one, opened on first use.

    Args:
        nodes: node name -> address (``unix:///path``, ``host:port`` or ``tcp://host:port``).
    """

    def __init__(self, nodes: Mapping[str, str]) -> None:
        self.nodes = dict(nodes)
        self._channels: dict[str, Channel] = {}

    def address(self, node: str) -> str:
        return self.nodes[node]

    def channel(self, node: str) -> Channel:
        """The channel to ``node`` (KeyError if it is not a configured peer)."""
        ch = self._channels.get(node)
        if ch is None:
            ch = self._channels[node] = _open_channel(self.nodes[node])
        return ch

    def start(self) -> None:
        for node, address in self.nodes.items():
            _check_address(node, address)

    def stop(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()


def _check_address(node: str, address: str) -> None:
    u = urlparse(address if "://" in address else f"tcp://{address}")
    if u.scheme == "unix" and (u.netloc + u.path):
        return
    if u.scheme == "tcp" and u.hostname and u.port:
        return
    raise ValueError(f"node {node!r}: address {address!r} is not unix:///path or host:port")


def _open_channel(address: str) -> Channel:
    u = urlparse(address if "://" in address else f"tcp://{address}")
    if u.scheme == "unix":
        return Channel(path=u.netloc + u.path)
    return Channel(host=u.hostname, port=u.port)


def peer_problem(e: BaseException) -> str:
    """"is unavailable" when the peer cannot be reached, "failed" when it answered an error."""
    return "failed" if isinstance(e, GRPCError) else "is unavailable"


def describe_error(e: BaseException) -> str:
    """A one-line reason for a failed peer call."""
    if isinstance(e, GRPCError):
        return f"{e.status.name}: {e.message}"
    text = str(e) or type(e).__name__
    return f"{type(e).__name__}: {text}" if type(e).__name__ not in text else text


# ---------------------------------------------------------------------------------------------
# instances


@dataclass(frozen=True, slots=True)
class InstanceStatus:
    """What metrics and the CLI need to know about an instance."""

    id: str
    name: str
    gadget: str
    status: str  # "Running" | "Error" | "Invalid"
    message: str
    attached: int
    buffered: int
    nodes: tuple[str, ...] = ()


@dataclass
class _Member:
    """One peer node of a multi-node instance."""

    node: str
    address: str
    state: str = "connecting"  # connecting | up | down | ended
    message: str = ""
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Instance:
    """One gadget instance: its run, its replay buffer, its attached clients and its peers.

    Lifecycle: :meth:`launch` starts it in the background (``ready`` is set when it runs or
    failed); :meth:`stop` stops the gadget, closes every client and frees the BPF programs.
    """

    def __init__(self, ctx: ServiceContext, request: pb.CreateGadgetInstanceRequest,
                 peers: PeerPool) -> None:
        self._ctx = ctx
        self.request = request
        self._peers = peers
        gi = request.gadgetInstance
        self.id: str = gi.id
        self.name: str = gi.name
        self.image: str = gi.gadgetConfig.imageName
        self.status = pb.StatusInvalid
        self.message = ""
        self.info: pb.GadgetInfo | None = None
        self.ready = asyncio.Event()
        self.ended = asyncio.Event()
        size = request.eventBufferLength or DEFAULT_EVENT_BUFFER
        self.ring = PacketRing(min(max(size, 1), MAX_EVENT_BUFFER))
        self._attachers: set[_Attacher] = set()
        self._attach_names = itertools.count(1)
        self._run: GadgetRun | None = None
        self._layout: StreamLayout | None = None
        self._sinks: Any = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._start_task: asyncio.Task[None] | None = None
        self._members: dict[str, _Member] = {}
        self._node_tag = b""
        self._stopping = False

    # -- state ------------------------------------------------------------------------------

    @property
    def label(self) -> str:
        """The instance's ledger label."""
        return f"instance:{self.name}"

    @property
    def nodes(self) -> list[str]:
        return list(self.request.gadgetInstance.nodes)

    @property
    def run(self) -> GadgetRun | None:
        """The local run while it exists (None for peer-only or failed instances)."""
        return self._run

    def state(self) -> pb.GadgetInstanceState:
        message = self.message
        down = [f"node {m.node}: {m.message}" for m in self._members.values()
                if m.state == "down"]
        if down and self.status == pb.StatusRunning:
            message = "; ".join(down)
        return pb.GadgetInstanceState(status=self.status, message=message)

    def to_proto(self) -> pb.GadgetInstance:
        gi = pb.GadgetInstance()
        gi.CopyFrom(self.request.gadgetInstance)
        gi.state.CopyFrom(self.state())
        return gi

    def summary(self) -> InstanceStatus:
        return InstanceStatus(self.id, self.name, self.image,
                              {pb.StatusRunning: "Running", pb.StatusError: "Error"}
                              .get(self.status, "Invalid"),
                              self.state().message, len(self._attachers), len(self.ring),
                              tuple(self.nodes))

    def _fail(self, message: str) -> None:
        self.status = pb.StatusError
        self.message = message
        _logger.error("instance %s (%s): %s", self.name, self.id, message)

    def log(self, severity: int, message: str) -> None:
        """An instance message: to the daemon log, and to attached clients when warn or worse."""
        _logger.log({1: logging.CRITICAL, 2: logging.ERROR, 3: logging.WARNING}
                    .get(severity, logging.INFO if severity == 4 else logging.DEBUG),
                    "instance %s (%s): %s", self.name, self.id[:12], message)
        if 0 < severity <= _WARN:
            for a in tuple(self._attachers):
                a.log(severity, message)

    # -- start / stop -----------------------------------------------------------------------

    def launch(self) -> None:
        """Starts the instance in the background; ``ready`` is set when done either way."""
        self._start_task = asyncio.create_task(self._start(), name=f"instance-start:{self.name}")

    async def _start(self) -> None:
        try:
            await self._start_inner()
        except GRPCError as e:
            self._fail(e.message or e.status.name)
            await self._release()
        except Exception as e:  # the source's errors name their cause (missing hook, ...)
            self._fail(str(e) or type(e).__name__)
            await self._release()
        finally:
            self.ready.set()

    def prepare(self) -> GadgetRun:
        """Resolves the gadget and builds the run without starting it (validation and info).

        Raises:
            GRPCError: unknown gadget, wrong version, bad params or unknown node.
        """
        gc = self.request.gadgetInstance.gadgetConfig
        check_version(gc.version)
        if gc.timeout < 0:
            raise GRPCError(Status.INVALID_ARGUMENT, f"timeout: must be >= 0 ns, got {gc.timeout}")
        for node in self.nodes:
            if node != self._ctx.node and node not in self._peers.nodes:
                known = sorted({self._ctx.node, *self._peers.nodes})
                raise GRPCError(Status.INVALID_ARGUMENT,
                                f"unknown node {node!r} (known: {', '.join(known)})")
        try:
            spec: GadgetSpec = self._ctx.catalog.resolve(gc.imageName)
        except GadgetError as e:
            raise GRPCError(Status.NOT_FOUND, str(e)) from None
        return new_run(self._ctx, spec, dict(gc.paramValues), self.label)

    async def _start_inner(self) -> None:
        run = self.prepare()
        batch_max = int(run.values.get(BATCH_MAX) or 0)
        linger = float(run.values.get(BATCH_LINGER) or 0.02)
        self._layout = StreamLayout.build(run.schemas, batch_max, linger,
                                          f"{round(linger * 1000)}ms")
        self.info = gadget_info(run.spec, self.image, self._layout.schemas, run.param_specs,
                                with_ids=True, instance_id=self.id, instance_name=self.name)
        if self.nodes:
            # Merged instances tag every packet with its node, local ones included.
            self._node_tag = node_field(self._ctx.node)
        if not self.nodes or self._ctx.node in self.nodes:
            await self._start_local(run)
        for node in self.nodes:
            if node != self._ctx.node:
                m = _Member(node, self._peers.address(node))
                self._members[node] = m
                m.task = asyncio.create_task(self._follow(m), name=f"peer:{self.name}:{node}")
        self.status = pb.StatusRunning

    async def _start_local(self, run: GadgetRun) -> None:
        edge = run.subscribe(f"instance:{self.id[:12]}", INSTANCE_EDGE, Overflow.BLOCK)
        run.add_log_listener(self._forward_run_log)
        self._run = run
        if self._ctx.sinks is not None:
            self._sinks = await self._ctx.sinks.attach(run)
        await run.start()
        self._tasks.append(asyncio.create_task(self._pump(edge), name=f"instance:{self.name}"))
        self._tasks.append(asyncio.create_task(self._watch(run), name=f"watch:{self.name}"))

    async def _watch(self, run: GadgetRun) -> None:
        """Stops the run when its source ends by itself or its timeout passes."""
        timeout = self.request.gadgetInstance.gadgetConfig.timeout / 1e9
        waiter = asyncio.ensure_future(run.wait())
        try:
            if timeout > 0:
                await asyncio.wait({waiter}, timeout=timeout)
            else:
                await waiter
        finally:
            waiter.cancel()
        if not self._stopping:
            self.log(4, "gadget ended")
            await run.stop()

    def _forward_run_log(self, severity: int, message: str) -> None:
        # GadgetRun.log already wrote the daemon log; clients hear about warnings only.
        if 0 < severity <= _WARN:
            for a in tuple(self._attachers):
                a.log(severity, message)

    async def _release(self) -> None:
        """Frees what a failed start left behind (the source already stopped itself)."""
        run, self._run = self._run, None
        if run is not None:
            with contextlib.suppress(Exception):
                await run.stop()
            run.remove_log_listener(self._forward_run_log)
        if self._sinks is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._sinks.close(), self._ctx.drain_deadline)
            self._sinks = None

    async def _pump(self, edge: Edge) -> None:
        assert self._layout is not None
        ids = self._layout.ids
        types = {s.name: s.type for s in self._layout.schemas}
        while True:
            try:
                _, batch = await edge.get()
            except EdgeClosed:
                break
            edge.delivered(len(batch))
            ds_id = ids[batch.schema.name]
            if types[batch.schema.name] == DataSourceType.ARRAY:
                self._publish(_Chunk(0, ds_id, payloads=self._array_packets(batch)))
            elif self._node_tag:
                tag = self._node_tag
                self._publish(_Chunk(0, ds_id, payloads=[tag + p for p in wire.gadget_data(batch)]))
            else:
                self._publish(_Chunk(0, ds_id, batch=batch))
        self._end_clients()

    def _array_packets(self, batch: Batch) -> list[bytes]:
        assert self._layout is not None
        # The widest record bounds the packet: payload 0 plus any operator-added payloads.
        size = batch.schema.record_size + 16 + max(
            (sum(len(col[i]) + 6 for col in batch.extra) for i in range(len(batch))), default=0)
        cap = max(1, (MAX_MESSAGE - _MESSAGE_MARGIN) // size)
        if self._layout.batch_max:
            cap = min(cap, self._layout.batch_max)
        out = []
        for start in range(0, max(len(batch), 1), cap):
            part = Batch(batch.schema, batch.rows[start: start + cap],
                         tuple(col[start: start + cap] for col in batch.extra))
            out.append(self._node_tag + wire.gadget_data_array(part))
        return out

    def _publish(self, chunk: _Chunk, gap: int = 0) -> None:
        """Numbers ``chunk`` with the next instance seqs (after ``gap`` lost ones), buffers it
        and hands it to every attached client."""
        chunk.seq = self.ring.next_seq + gap
        self.ring.append(chunk)
        for a in tuple(self._attachers):
            a.offer(chunk)

    def _end_clients(self) -> None:
        self.ended.set()
        for a in tuple(self._attachers):
            a.close()

    async def stop(self, drain: float = 5.0) -> None:
        """Stops the gadget (its source drains into the buffer and sinks first), ends every
        attach stream, stops following peers and frees everything. Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        if self._start_task is not None and not self._start_task.done():
            # The start may be inside a BPF load in a thread: let it finish so the programs it
            # loads are ours to free, rather than orphaned by a cancel.
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._start_task)
        for m in self._members.values():
            if m.task is not None:
                m.task.cancel()
        for m in self._members.values():
            if m.task is not None:
                with contextlib.suppress(BaseException):
                    await m.task
        run, self._run = self._run, None
        if run is not None:
            with contextlib.suppress(Exception):
                await run.stop()
            run.remove_log_listener(self._forward_run_log)
        for t in self._tasks:
            if not t.done():
                with contextlib.suppress(TimeoutError, Exception):
                    await asyncio.wait_for(asyncio.shield(t), drain)
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self._tasks.clear()
        if self._sinks is not None:
            try:
                await asyncio.wait_for(self._sinks.close(), drain)
            except Exception as e:
                _logger.warning("instance %s: closing its sinks: %s", self.name, describe_error(e))
            self._sinks = None
        self._end_clients()
        self.ready.set()

    # -- attach -----------------------------------------------------------------------------

    async def serve_attach(self, stream: Any, from_seq: int | None) -> None:
        """Serves one attach stream until the client goes away or the instance ends."""
        if self.info is None:
            raise GRPCError(Status.FAILED_PRECONDITION,
                            f"gadget instance {self.id} failed: {self.message}")
        client = _Attacher(f"attach-{next(self._attach_names)}", ATTACH_QUEUE,
                           self._ctx.ledger, self.label)
        # Snapshot the buffer and subscribe in one step (no await in between), so every packet
        # is either replayed or queued live, exactly once.
        notes: list[str] = []
        if from_seq is None:
            replay = self.ring.since(0)
            base = (replay[0].seq if replay else self.ring.next_seq) - 1
        elif from_seq > self.ring.next_seq:
            notes.append(f"{FROM_SEQ_METADATA} {from_seq} is ahead of this instance (next "
                         f"seq {self.ring.next_seq}): it restarted since; replaying its "
                         "whole buffer")
            replay = self.ring.since(0)
            base = 0
        else:
            replay = self.ring.since(from_seq)
            first = replay[0].seq if replay else self.ring.next_seq
            if first > from_seq:
                notes.append(f"{first - from_seq} events from seq {from_seq} on are no longer "
                             f"buffered (the buffer holds {self.ring.capacity})")
            base = 0
        self._attachers.add(client)
        if self.ended.is_set():
            client.close()
        writer = FramedWriter(stream)
        try:
            await stream.send_initial_metadata(metadata={SEQ_BASE_METADATA: str(base)})
            await writer.write(info_event(self.info))
            for note in notes:
                await writer.write(wire.log_event(_WARN, note))
            for m in self._members.values():
                if m.state == "down":
                    await writer.write(wire.log_event(
                        _WARN, f"node {m.node!r} ({m.address}) is unavailable: {m.message}"))
            await _write_replay(writer, replay, base)
            # The daemon stopping ends the stream cleanly: what is queued goes out, then OK.
            closer = asyncio.create_task(self._close_on_shutdown(client))
            try:
                await client.run(writer, base)
            finally:
                closer.cancel()
        finally:
            self._attachers.discard(client)
            client.abandon("client_gone")

    async def _close_on_shutdown(self, client: _Attacher) -> None:
        await self._ctx.shutting_down.wait()
        client.close()

    # -- peers ------------------------------------------------------------------------------

    def _peer_request(self) -> pb.CreateGadgetInstanceRequest:
        req = pb.CreateGadgetInstanceRequest()
        req.CopyFrom(self.request)
        del req.gadgetInstance.nodes[:]
        req.gadgetInstance.ClearField("state")
        return req

    async def _follow(self, m: _Member) -> None:
        """Keeps the instance on peer ``m`` and merges its packets, reconnecting with backoff."""
        backoff = PEER_RETRY_MIN
        next_seq = 1
        while True:
            try:
                channel = self._peers.channel(m.node)
                await self._ensure_on_peer(channel)
                next_seq = await self._stream_from(m, channel, next_seq)
                m.state, m.message = "ended", ""
                self.log(4, f"node {m.node!r}: the instance ended there")
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                reason = describe_error(e)
                if m.state != "down" or m.message != reason:
                    self.log(_WARN, f"node {m.node!r} ({m.address}) {peer_problem(e)}: {reason}; "
                             "the other nodes continue")
                if m.state == "up":
                    backoff = PEER_RETRY_MIN
                m.state, m.message = "down", reason
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, PEER_RETRY_MAX)

    async def _ensure_on_peer(self, channel: Channel) -> None:
        stub = svc.GadgetInstanceManagerStub(channel)
        try:
            await stub.CreateGadgetInstance(self._peer_request(), timeout=PEER_CALL_TIMEOUT)
        except GRPCError as e:
            # The same id there is this instance from an earlier connection (or an earlier
            # daemon start): attach to it.
            if e.status is not Status.ALREADY_EXISTS or not (e.message or "").startswith(
                    "gadget with id"):
                raise
        gm = svc.GadgetManagerStub(channel)
        # Waits there until the instance started, and fails with its error if it did not.
        await gm.GetGadgetInfo(pb.GetGadgetInfoRequest(imageName=self.id, version=1, flags=1),
                               timeout=READY_WAIT + PEER_CALL_TIMEOUT)

    async def _stream_from(self, m: _Member, channel: Channel, from_seq: int) -> int:
        """Attaches to the peer's instance from ``from_seq``; returns the next seq to ask for
        when the stream ends normally."""
        assert self._layout is not None
        local_ids = self._layout.ids
        tag = node_field(m.node)
        gm = svc.GadgetManagerStub(channel)
        expected = from_seq
        async with gm.RunGadget.open(metadata={FROM_SEQ_METADATA: str(from_seq)}) as st:
            await st.send_message(pb.GadgetControlRequest(
                attachRequest=pb.GadgetAttachRequest(id=self.id, version=1)))
            ds_map: dict[int, int] = {}
            while True:
                ev = await st.recv_message()
                if ev is None:
                    # grpclib checks the status on exit, and only once our side ended too.
                    await st.end()
                    return expected
                if ev.type == wire.EVENT_TYPE_INFO:
                    info = pb.GadgetInfo.FromString(ev.payload)
                    ds_map = {ds.id: local_ids[ds.name] for ds in info.dataSources
                              if ds.name in local_ids}
                    if m.state != "up":
                        self.log(4 if m.state == "connecting" else _WARN,
                                 f"node {m.node!r} ({m.address}) is connected")
                    m.state, m.message = "up", ""
                elif ev.type == wire.EVENT_TYPE_PAYLOAD:
                    # With from-seq the stream carries the peer's instance seqs: a jump is
                    # packets lost there, a step back is a peer that restarted.
                    gap = ev.seq - expected if ev.seq > expected else 0
                    expected = ev.seq + 1
                    ds = ds_map.get(ev.dataSourceID)
                    if ds is not None:
                        self._publish(_Chunk(0, ds, payloads=[tag + ev.payload]), gap)
                elif ev.type >= 1 << _LOG_SHIFT:
                    self.log(ev.type >> _LOG_SHIFT,
                             f"node {m.node}: {ev.payload.decode('utf-8', 'replace')}")

    async def remove_on_peers(self) -> list[str]:
        """Removes the instance on every peer node; returns the failures."""
        failures = []
        for m in self._members.values():
            stub = svc.GadgetInstanceManagerStub(self._peers.channel(m.node))
            try:
                resp = await stub.RemoveGadgetInstance(pb.GadgetInstanceId(id=self.id),
                                                       timeout=PEER_CALL_TIMEOUT)
                if resp.result != 0 and "not found" not in resp.message:
                    failures.append(f"node {m.node}: {resp.message}")
            except Exception as e:
                failures.append(f"node {m.node}: {describe_error(e)}")
        return failures


# ---------------------------------------------------------------------------------------------
# the manager and its servicer


class InstanceManager:
    """All gadget instances of the daemon, their store and their peers.

    Args:
        ctx: the daemon's service context (catalog, ledger, sinks, node name).
        state_dir: where instances are persisted (``<state_dir>/gadgets``).
        nodes: peer daemons by node name, for multi-node instances and legacy fan-out.
        ready_wait: seconds GetGadgetInfo/attach wait for a starting instance.
    """

    def __init__(self, ctx: ServiceContext, state_dir: Path,
                 nodes: Mapping[str, str] | None = None, ready_wait: float = READY_WAIT) -> None:
        self._ctx = ctx
        self.store = InstanceStore(state_dir)
        self.peers = PeerPool(nodes or {})
        self._ready_wait = ready_wait
        self._instances: dict[str, Instance] = {}
        self._names: dict[str, str] = {}  # name -> id

    async def start(self) -> None:
        """Opens the store and starts every persisted instance (in the background)."""
        self.peers.start()
        await asyncio.to_thread(self.store.start)
        requests = await asyncio.to_thread(self.store.load_all)
        for req in requests:
            inst = Instance(self._ctx, req, self.peers)
            if inst.name in self._names:
                # A hand-edited store: keep the first, report the other as an error.
                inst._fail(f"gadget with name {inst.name!r} already exists")
                inst.ready.set()
            else:
                self._names[inst.name] = inst.id
                inst.launch()
            self._instances[inst.id] = inst
        _logger.info("restored %d gadget instance(s) from %s (%d unreadable)", len(requests),
                     self.store.directory, len(self.store.problems()))

    async def stop(self) -> None:
        """Stops every instance (their files stay, so the next start restores them)."""
        await asyncio.gather(*(i.stop(self._ctx.drain_deadline)
                               for i in self._instances.values()), return_exceptions=True)
        self.peers.stop()
        self.store.stop()

    def problems(self) -> list[StoreProblem]:
        return self.store.problems()

    def list_states(self) -> list[InstanceStatus]:
        """One summary per instance, in id order (for metrics and the CLI)."""
        return [self._instances[k].summary() for k in sorted(self._instances)]

    def runs(self) -> list[GadgetRun]:
        """The local runs of the instances (self-metrics read their kernel losses)."""
        return [i.run for i in self._instances.values() if i.run is not None]

    # -- RPC bodies -------------------------------------------------------------------------

    async def create(self, req: pb.CreateGadgetInstanceRequest) -> pb.CreateGadgetInstanceResponse:
        """Validates, persists and starts an instance.

        Raises:
            GRPCError: the request is invalid (nothing persisted) or the store failed.
        """
        stored = pb.CreateGadgetInstanceRequest()
        stored.CopyFrom(req)
        gi = stored.gadgetInstance
        if not gi.id:
            gi.id = secrets.token_hex(16)
        elif not ID_RE.match(gi.id):
            raise GRPCError(Status.INVALID_ARGUMENT, f"invalid gadget instance id: {gi.id}")
        if not gi.name:
            gi.name = random_name(self._names)
        elif not NAME_RE.match(gi.name):
            raise GRPCError(Status.INVALID_ARGUMENT, f"invalid gadget instance name: {gi.name}")
        if gi.id in self._instances:
            raise GRPCError(Status.ALREADY_EXISTS, f'gadget with id "{gi.id}" already exists')
        if gi.name in self._names:
            raise GRPCError(Status.ALREADY_EXISTS, f'gadget with name "{gi.name}" already exists')
        if stored.eventBufferLength < 0 or stored.eventBufferLength > MAX_EVENT_BUFFER:
            raise GRPCError(Status.INVALID_ARGUMENT, f"eventBufferLength: must be 0..."
                            f"{MAX_EVENT_BUFFER}, got {stored.eventBufferLength}")
        if not gi.timeCreated:
            gi.timeCreated = int(time.time())
        gi.ClearField("state")  # runtime state is never persisted
        inst = Instance(self._ctx, stored, self.peers)
        inst.prepare()  # raises with the reason: unknown gadget, bad params, unknown node
        # Reserve id and name before the first await so a concurrent create cannot take them.
        self._instances[gi.id] = inst
        self._names[gi.name] = gi.id
        try:
            await asyncio.to_thread(self.store.save, stored)
        except Exception as e:
            del self._instances[gi.id]
            del self._names[gi.name]
            raise GRPCError(Status.INTERNAL, f"persisting gadget instance: {e}") from None
        inst.launch()
        _logger.info("created gadget instance %s (%s) of %s", gi.name, gi.id,
                     gi.gadgetConfig.imageName)
        return pb.CreateGadgetInstanceResponse(result=0, gadgetInstance=inst.to_proto())

    def list(self) -> list[pb.GadgetInstance]:
        return [self._instances[k].to_proto() for k in sorted(self._instances)]

    def get(self, instance_id: str) -> pb.GadgetInstance:
        if not ID_RE.match(instance_id):
            raise GRPCError(Status.INVALID_ARGUMENT, f"invalid gadget instance id: {instance_id}")
        inst = self._instances.get(instance_id)
        if inst is None:
            path = self.store.path(instance_id)
            raise GRPCError(Status.NOT_FOUND, "getting gadget instance from store: loading "
                            f'gadget: gadget instance not found at "{path}"')
        return inst.to_proto()

    async def remove(self, instance_id: str) -> pb.StatusResponse:
        """Stops and forgets an instance; an unknown id is ``result=1`` (spec 6.2)."""
        if not ID_RE.match(instance_id):
            raise GRPCError(Status.INVALID_ARGUMENT, f"invalid gadget instance id: {instance_id}")
        inst = self._instances.get(instance_id)
        if inst is None:
            return pb.StatusResponse(result=1, message="gadget instance not found at "
                                     f'"{self.store.path(instance_id)}"')
        # The file goes first: when it cannot be removed (a read-only state dir) the instance
        # keeps running untouched, rather than stopped here yet restored at the next start.
        try:
            await asyncio.to_thread(self.store.delete, instance_id)
        except Exception as e:
            return pb.StatusResponse(result=1, message=f"removing gadget instance: {e}")
        await inst.stop(self._ctx.drain_deadline)
        failures = await inst.remove_on_peers()
        if self._instances.get(instance_id) is inst:
            del self._instances[instance_id]
            if self._names.get(inst.name) == instance_id:
                del self._names[inst.name]
        self._ctx.ledger.forget(inst.label)
        _logger.info("removed gadget instance %s (%s)", inst.name, inst.id)
        return pb.StatusResponse(result=0, message="; ".join(failures))

    def resolve(self, ref: str) -> Instance | None:
        """By exact id, then exact name, then id prefix (first in id order), as upstream."""
        if not ref:
            return None
        inst = self._instances.get(ref)
        if inst is None and ref in self._names:
            inst = self._instances.get(self._names[ref])
        if inst is None:
            inst = next((self._instances[k] for k in sorted(self._instances)
                         if k.startswith(ref)), None)
        return inst

    async def gadget_info(self, ref: str) -> pb.GadgetInfo:
        """GetGadgetInfo with flag 1: the instance's GadgetInfo once it has started.

        Raises:
            GRPCError: NOT_FOUND (``instance <ref> not found``), FAILED_PRECONDITION with the
                instance's error, or UNAVAILABLE if it is still starting after the wait.
        """
        inst = self.resolve(ref)
        if inst is None:
            raise GRPCError(Status.NOT_FOUND, f"instance {ref} not found")
        await self._wait_ready(inst)
        if inst.status == pb.StatusError:
            raise GRPCError(Status.FAILED_PRECONDITION,
                            f"gadget instance {inst.id} failed: {inst.message}")
        if inst.info is None:
            raise GRPCError(Status.UNAVAILABLE, f"gadget instance {inst.id} is still starting")
        out = pb.GadgetInfo()
        out.CopyFrom(inst.info)
        return out

    async def _wait_ready(self, inst: Instance) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(inst.ready.wait(), self._ready_wait)

    async def attach(self, stream: Any, req: pb.GadgetAttachRequest) -> None:
        """Serves an attach stream (spec 3.3); the caller checked the version."""
        inst = self._instances.get(req.id)
        if inst is None:
            raise GRPCError(Status.NOT_FOUND, f"gadget {req.id} not found")
        from_seq = _from_seq(stream)
        await self._wait_ready(inst)
        if inst.status == pb.StatusError:
            raise GRPCError(Status.FAILED_PRECONDITION,
                            f"gadget instance {inst.id} failed: {inst.message}")
        if inst.info is None:
            raise GRPCError(Status.UNAVAILABLE, f"gadget instance {inst.id} is still starting")
        await inst.serve_attach(stream, from_seq)


def _from_seq(stream: Any) -> int | None:
    md = getattr(stream, "metadata", None)
    raw = md.get(FROM_SEQ_METADATA) if md is not None else None
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    if not text.strip().isdigit() or int(text) < 1:
        raise GRPCError(Status.INVALID_ARGUMENT,
                        f"{FROM_SEQ_METADATA}: want an integer >= 1, got {text!r}")
    return int(text)


class GadgetInstanceManager(svc.GadgetInstanceManagerBase):
    """``api.GadgetInstanceManager`` over an :class:`InstanceManager`."""

    def __init__(self, manager: InstanceManager) -> None:
        self._m = manager

    async def CreateGadgetInstance(self, stream: Any) -> None:
        req: pb.CreateGadgetInstanceRequest = await stream.recv_message()
        await stream.send_message(await self._m.create(req))

    async def ListGadgetInstances(self, stream: Any) -> None:
        await stream.recv_message()
        await stream.send_message(pb.ListGadgetInstanceResponse(gadgetInstances=self._m.list()))

    async def GetGadgetInstance(self, stream: Any) -> None:
        req: pb.GadgetInstanceId = await stream.recv_message()
        await stream.send_message(self._m.get(req.id))

    async def RemoveGadgetInstance(self, stream: Any) -> None:
        req: pb.GadgetInstanceId = await stream.recv_message()
        await stream.send_message(await self._m.remove(req.id))
