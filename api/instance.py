"""One gadget instance: a headless run that outlives its clients (docs/gadget-service.md §3.3,
§5.4 and §6).

An instance is a :class:`~pipeline.run.GadgetRun` started from a ``CreateGadgetInstanceRequest``
and kept running by the daemon: its sinks (``ctx.sinks``) get every record, and the last
``eventBufferLength`` payload packets (1024 when 0) stay in memory (api/instance_packets.py)
so a client that attaches later first sees what happened before it came.

An attach stream announces the GadgetInfo (``id`` and ``name`` set), replays the buffer, then
follows live packets through its own bounded queue. Without the extension below a stream's
``base`` is chosen so the replay is ``1..N`` and live packets go on from ``N+1``
(docs/gadget-service.md §3.3).

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
import time
from dataclasses import dataclass, field
from typing import Any

from grpclib import GRPCError, Status
from grpclib.client import Channel

from api.context import ServiceContext
from api.gadget_info import gadget_info
from api.gadget_manager import check_version
from api.instance_packets import (
    ATTACH_QUEUE,
    Attacher,
    Chunk,
    PacketRing,
    node_field,
    write_replay,
)
from api.peers import PeerPool, peer_problem
from api.ready import READY_SEVERITY, is_ready, ready_message
from api.run_session import REMOVED_INSTANCES, RunSession, new_run
from api.run_stream import MAX_MESSAGE, StreamLayout, info_event
from api.stream_writer import FramedWriter
from pipeline import wire
from pipeline._gen import gadget_service_grpc as svc
from pipeline._gen import gadget_service_pb2 as pb
from pipeline.batch import Batch
from pipeline.gadget import GadgetError, GadgetSpec
from pipeline.graph import Edge, EdgeClosed, Overflow
from pipeline.ledger import REASON_CLIENT_GONE, REASON_QUEUE_FULL, STAGE_ATTACH
from pipeline.params import redact
from pipeline.run import GadgetRun, RunIdentity
from pipeline.schema import DataSourceType
from pipeline.severity import Severity
from pipeline.wire import ATTACH_QUEUE as ATTACH_QUEUE_KEY
from pipeline.wire import BATCH_LINGER, BATCH_MAX

__all__ = [
    "DEFAULT_EVENT_BUFFER",
    "FROM_SEQ_METADATA",
    "MAX_EVENT_BUFFER",
    "READY_WAIT",
    "SEQ_BASE_METADATA",
    "Instance",
    "InstanceStatus",
]

_logger = logging.getLogger(__name__)

FROM_SEQ_METADATA = "gadgetpipe-from-seq"
"""Attach request metadata: replay from this instance seq on (see the module docstring)."""
SEQ_BASE_METADATA = "gadgetpipe-seq-base"
"""Attach response initial metadata: instance seq = stream seq + this."""
DEFAULT_EVENT_BUFFER = 1024
"""Packets an instance keeps for replay when ``eventBufferLength`` is 0
(docs/gadget-service.md §6.4)."""
MAX_EVENT_BUFFER = 65536
"""Largest ``eventBufferLength`` accepted: the buffer lives in the daemon's memory."""
READY_WAIT = 10.0
"""Seconds GetGadgetInfo (flag 1) and attach wait for an instance that is still starting."""
PEER_CALL_TIMEOUT = 10.0
PEER_RETRY_MIN = 0.5
PEER_RETRY_MAX = 10.0
INSTANCE_EDGE = 1 << 16
"""Records the instance's own edge may hold; it blocks (never drops): its consumer only copies
references into the buffer and the client queues."""
NOT_TRACING_YET = "starting: not tracing yet (compiling and attaching its programs)"
"""The state message of an instance whose programs are not attached yet."""
_MESSAGE_MARGIN = 1024
_LOG_SHIFT = wire.EVENT_LOG_SHIFT


@dataclass(frozen=True, slots=True)
class InstanceStatus:
    """What metrics and the CLI need to know about an instance."""

    id: str
    name: str
    gadget: str
    status: str  # "Starting" | "Running" | "Error"
    message: str
    attached: int
    buffered: int
    nodes: tuple[str, ...] = ()
    tracing: bool = False
    """Its programs are attached (on every node it runs on) and records flow."""
    ready_seconds: float | None = None
    """Seconds from its launch (create or restore) to tracing."""


@dataclass
class Member:
    """One peer node of a multi-node instance."""

    node: str
    address: str
    state: str = "connecting"  # connecting | up | down | ended
    message: str = ""
    tracing: bool = False
    """The instance there has said it traces (api/ready.py) since this daemon followed it."""
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Instance:
    """One gadget instance: its run, its replay buffer, its attached clients and its peers.

    Lifecycle: :meth:`launch` starts it in the background (``started`` is set when it runs
    or failed, ``tracing`` once its programs are attached on every node it runs on);
    :meth:`stop` stops the gadget, closes every client and frees the BPF programs. A restored
    instance is not tracing until its programs are attached again.
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
        self.started = asyncio.Event()
        """Set when the start ended, either way (the GadgetInfo is known, or it failed)."""
        self.tracing = asyncio.Event()
        """Set when its programs are attached on every node it runs on (api/ready.py)."""
        self.failed = asyncio.Event()
        self.ended = asyncio.Event()
        self.launched = time.monotonic()
        self.ready_seconds: float | None = None
        size = request.eventBufferLength or DEFAULT_EVENT_BUFFER
        self.ring = PacketRing(min(max(size, 1), MAX_EVENT_BUFFER))
        self._attachers: set[Attacher] = set()
        self._attach_names = itertools.count(1)
        self._run: GadgetRun | None = None
        self._session: RunSession | None = None
        self._layout: StreamLayout | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._start_task: asyncio.Task[None] | None = None
        self._members: dict[str, Member] = {}
        self._node_tag = b""
        self._attach_queue = ATTACH_QUEUE
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
        """Running once started (StatusRunning), with a message while it does not trace yet
        or a peer node is down; StatusInvalid with "starting: ..." before; StatusError."""
        message = self.message
        if self.status == pb.StatusInvalid and not self.failed.is_set():
            message = NOT_TRACING_YET
        elif self.status == pb.StatusRunning:
            down = [f"node {m.node}: {m.message}" for m in self._members.values()
                    if m.state == "down"]
            waiting = [m.node for m in self._members.values()
                       if not m.tracing and m.state != "down"]
            if down:
                message = "; ".join(down)
            elif waiting and not self.tracing.is_set():
                message = f"not tracing yet on node(s) {', '.join(waiting)}"
        return pb.GadgetInstanceState(status=self.status, message=message)

    def to_proto(self) -> pb.GadgetInstance:
        """The instance as clients see it: secret param values (OTLP headers …) read
        ``<redacted>``; the store and peer daemons get the request itself."""
        gi = pb.GadgetInstance()
        gi.CopyFrom(self.request.gadgetInstance)
        gi.state.CopyFrom(self.state())
        values = gi.gadgetConfig.paramValues
        specs = self.run.param_specs if self.run is not None else (
            self._ctx.sinks.params() if self._ctx.sinks is not None else ())
        shown = redact(dict(values), specs)
        values.clear()
        values.update(shown)
        return gi

    def summary(self) -> InstanceStatus:
        return InstanceStatus(self.id, self.name, self.image,
                              {pb.StatusRunning: "Running", pb.StatusError: "Error"}
                              .get(self.status, "Starting"),
                              self.state().message, len(self._attachers), len(self.ring),
                              tuple(self.nodes), self.tracing.is_set(), self.ready_seconds)

    def _fail(self, message: str) -> None:
        self.status = pb.StatusError
        self.message = message
        self.failed.set()
        _logger.error("instance %s (%s): %s", self.name, self.id, message)

    async def wait_tracing(self, timeout: float) -> bool:
        """Waits up to ``timeout`` seconds for the instance to trace; False if it failed or
        does not trace yet."""
        if not self.tracing.is_set() and not self.failed.is_set():
            waiters = {asyncio.ensure_future(self.tracing.wait()),
                       asyncio.ensure_future(self.failed.wait())}
            try:
                await asyncio.wait(waiters, timeout=timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
        return self.tracing.is_set()

    def _check_tracing(self) -> None:
        """Sets ``tracing`` once every node it runs on traces (peers that are down aside),
        and tells attached clients."""
        if self.tracing.is_set() or self.status == pb.StatusError:
            return
        local = not self.nodes or self._ctx.node in self.nodes
        if local and (self._session is None or not self._session.ready):
            return
        # A peer that cannot be reached does not hold the others back (the state names it).
        if any(not m.tracing and m.state != "down" for m in self._members.values()):
            return
        self.ready_seconds = time.monotonic() - self.launched
        self.tracing.set()
        text = self._ready_text()
        self.log(Severity.INFO, f"{text} ({self.ready_seconds:.2f} s after it was launched)")
        for a in tuple(self._attachers):
            a.log(READY_SEVERITY, text)

    def _ready_text(self) -> str:
        run = self._run
        return ready_message(run.attach_seconds if run is not None else None)

    def log(self, severity: int, message: str) -> None:
        """An instance message: to the daemon log, and to attached clients when warn or worse."""
        _logger.log(Severity.of(severity).python_level, "instance %s (%s): %s", self.name,
                    self.id[:12], message)
        if Severity.PANIC < severity <= Severity.WARN:
            for a in tuple(self._attachers):
                a.log(severity, message)

    # -- start / stop -----------------------------------------------------------------------

    def launch(self) -> None:
        """Starts the instance in the background; ``started`` is set when done either way."""
        self.launched = time.monotonic()
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
            self.started.set()

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
        identity = RunIdentity(spec.name, self.label, self.id, self.name)
        return new_run(self._ctx, spec, dict(gc.paramValues), self.label, identity)

    async def _start_inner(self) -> None:
        run = self.prepare()
        batch_max = int(run.values.get(BATCH_MAX) or 0)
        self._attach_queue = max(1, int(run.values.get(ATTACH_QUEUE_KEY) or ATTACH_QUEUE))
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
                self._members[node] = Member(node, self._peers.address(node))
        self.status = pb.StatusRunning
        for m in self._members.values():
            m.task = asyncio.create_task(self._follow(m), name=f"peer:{self.name}:{m.node}")
        self._check_tracing()

    async def _start_local(self, run: GadgetRun) -> None:
        # Every client's packets count in one attach stage: its rows exist from the start.
        self._ctx.ledger.declare_drops(self.label, STAGE_ATTACH,
                                       (REASON_QUEUE_FULL, REASON_CLIENT_GONE))
        session = RunSession(self._ctx, run, None, REMOVED_INSTANCES)
        self._session = session
        self._run = run
        edge = session.subscribe(f"instance:{self.id[:12]}", INSTANCE_EDGE, Overflow.BLOCK)
        session.add_log_listener(self._forward_run_log)
        await session.start()
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
            self.log(Severity.INFO, "gadget ended")
            await run.stop()

    def _forward_run_log(self, severity: int, message: str) -> None:
        # GadgetRun.log already wrote the daemon log; clients hear about warnings only.
        if Severity.PANIC < severity <= Severity.WARN:
            for a in tuple(self._attachers):
                a.log(severity, message)

    async def _release(self) -> None:
        """Frees what a failed start left behind (the source already stopped itself)."""
        session, self._session = self._session, None
        self._run = None
        if session is not None:
            await session.close()

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
                self._publish(Chunk.from_payloads(self._array_packets(batch), ds_id))
            elif self._node_tag:
                tag = self._node_tag
                self._publish(Chunk.from_payloads([tag + p for p in wire.gadget_data(batch)],
                                                  ds_id))
            else:
                self._publish(Chunk.from_records(batch, ds_id))
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

    def _publish(self, chunk: Chunk, gap: int = 0) -> None:
        """Numbers ``chunk`` with the next instance seqs (after ``gap`` lost ones), buffers it
        and hands it to every attached client."""
        chunk.number(self.ring.next_seq + gap)
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
            if self._session is not None and self._session.waiting_for_turn:
                # Still in the compile queue: it leaves it, nothing was loaded.
                self._start_task.cancel()
            # Else the start may be inside a BPF load in a thread: let it finish so the
            # programs it loads are freed here.
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._start_task)
        for m in self._members.values():
            if m.task is not None:
                m.task.cancel()
        for m in self._members.values():
            if m.task is not None:
                with contextlib.suppress(BaseException):
                    await m.task
        session, self._session = self._session, None
        self._run = None
        if session is not None:
            await session.stop()  # the source drains into the buffer and the sinks' edges
        for t in self._tasks:
            if not t.done():
                with contextlib.suppress(TimeoutError, Exception):
                    await asyncio.wait_for(asyncio.shield(t), drain)
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self._tasks.clear()
        if session is not None:
            await session.close(drain)
        self._end_clients()
        self.started.set()

    # -- attach -----------------------------------------------------------------------------

    async def serve_attach(self, stream: Any, from_seq: int | None) -> None:
        """Serves one attach stream until the client goes away or the instance ends."""
        if self.info is None:
            raise GRPCError(Status.FAILED_PRECONDITION,
                            f"gadget instance {self.id} failed: {self.message}")
        client = Attacher(f"attach-{next(self._attach_names)}", self._attach_queue,
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
        # Tracing now: the client hears it after the GadgetInfo; else when it happens.
        tracing = self.tracing.is_set()
        if self.ended.is_set():
            client.close()
        writer = FramedWriter(stream)
        try:
            await stream.send_initial_metadata(metadata={SEQ_BASE_METADATA: str(base)})
            await writer.write(info_event(self.info))
            if tracing:
                await writer.write(wire.log_event(READY_SEVERITY, self._ready_text()))
            for note in notes:
                await writer.write(wire.log_event(Severity.WARN, note))
            for m in self._members.values():
                if m.state == "down":
                    await writer.write(wire.log_event(Severity.WARN, f"node {m.node!r} "
                                                      f"({m.address}) is unavailable: {m.message}"))
            await write_replay(writer, replay, base)
            # The daemon stopping ends the stream cleanly: what is queued goes out, then OK.
            closer = asyncio.create_task(self._close_on_shutdown(client))
            try:
                await client.run(writer, base)
            finally:
                closer.cancel()
        finally:
            self._attachers.discard(client)
            client.abandon(REASON_CLIENT_GONE)

    async def _close_on_shutdown(self, client: Attacher) -> None:
        await self._ctx.shutting_down.wait()
        client.close()

    # -- peers ------------------------------------------------------------------------------

    def _peer_request(self) -> pb.CreateGadgetInstanceRequest:
        req = pb.CreateGadgetInstanceRequest()
        req.CopyFrom(self.request)
        del req.gadgetInstance.nodes[:]
        req.gadgetInstance.ClearField("state")
        return req

    async def _follow(self, m: Member) -> None:
        """Keeps the instance on peer ``m`` and merges its packets, reconnecting with backoff."""
        backoff = PEER_RETRY_MIN
        next_seq = 1
        while True:
            try:
                channel = self._peers.channel(m.node)
                await self._ensure_on_peer(channel)
                next_seq = await self._stream_from(m, channel, next_seq)
                m.state, m.message = "ended", ""
                self.log(Severity.INFO, f"node {m.node!r}: the instance ended there")
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                reason = self._peers.describe(m.node, e)
                if m.state != "down" or m.message != reason:
                    self.log(Severity.WARN, f"node {m.node!r} ({m.address}) {peer_problem(e)}: "
                             f"{reason}; the other nodes continue")
                if m.state == "up":
                    backoff = PEER_RETRY_MIN
                m.state, m.message = "down", reason
                self._check_tracing()
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

    async def _stream_from(self, m: Member, channel: Channel, from_seq: int) -> int:
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
                        self.log(Severity.INFO if m.state == "connecting" else Severity.WARN,
                                 f"node {m.node!r} ({m.address}) is connected")
                    m.state, m.message = "up", ""
                elif ev.type == wire.EVENT_TYPE_PAYLOAD:
                    # With from-seq the stream carries the peer's instance seqs: a jump is
                    # packets lost there, a step back is a peer that restarted.
                    gap = ev.seq - expected if ev.seq > expected else 0
                    expected = ev.seq + 1
                    ds = ds_map.get(ev.dataSourceID)
                    if ds is not None:
                        self._publish(Chunk.from_payloads([tag + ev.payload], ds), gap)
                elif ev.type >= 1 << _LOG_SHIFT:
                    text = ev.payload.decode("utf-8", "replace")
                    if is_ready(ev.type >> _LOG_SHIFT, text):
                        m.tracing = True
                        self._check_tracing()
                    self.log(ev.type >> _LOG_SHIFT, f"node {m.node}: {text}")

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
                failures.append(f"node {m.node}: {self._peers.describe(m.node, e)}")
        return failures

