"""``BuiltInGadgetManager.RunBuiltInGadget``: the pre-v0.42 built-in gadget API
(docs/gadget-service.md §3.7).

A legacy client names a gadget by category and name (``trace``/``exec``); every gadget folder
whose gadget.yaml carries ``category`` and ``legacyName`` answers to that pair. The
conversation:

1. the first message must be a ``runRequest`` (else ``expected first control message to be
   gadget run request``); an unknown pair fails with ``gadget not found: <category>/<name>``;
2. params: a gadget's own params under their bare key (``ignore-failed``, ``pid``), runtime
   params as ``runtime.<key>``, operator params as ``operator.<Operator>.<key>`` (passed on
   as they are; full wire keys are accepted too). Keys that match nothing are ignored with a
   warn log, as upstream ignores unknown params;
3. the server sends a ``type=3`` event carrying a random UUID (the job id), then payload events
   (``type=0``) whose payload is **JSON**: one object per record, or one JSON array per batch
   for array data sources. Objects are nested by parent (``{"proc": {"comm": ...}}``), skip
   fields annotated ``json.skip`` and carry the producing node under ``"node"``. ``seq``
   counts payload events from 1 and still advances over dropped ones. Logs at or below
   ``logLevel`` are sent as they happen;
4. the run ends on ``stopRequest``, half-close, the ``timeout`` (ns) or when every node's
   gadget ended; then one ``type=1`` result event per node, whose payload is the JSON object
   ``{"node": ..., "records": <sent>, "error": "<empty or why that node failed>"}``, and the
   RPC returns OK. A client that vanishes ends everything without results.

Fan-out (gadgetpipe; upstream servers ignored these fields): ``nodes`` lists node names of the
daemon's peers and/or its own node; ``fanOut`` with no ``nodes`` means this node and every
peer. The request is forwarded to each peer (``nodes`` cleared, ``fanOut`` false) over a
grpclib channel and the peers' events are merged into this stream: their records already carry
their ``node``, their logs are prefixed with ``node <name>:``, their job ids are dropped and
their results forwarded. A peer that cannot be reached or fails is reported by a warn log event
naming it, and the other nodes continue.

JSON is the sinks' encoder's (pipeline/sinks/encode.py, the same JSON a Kafka or JSON-lines
sink writes for the record), built per batch column by column, with ``node`` added. The local
run is a :class:`api.run_session.RunSession` like any other; its params are logged at debug
level as the client sent them (secret ones redacted, pipeline/params.py), and once every node
traces an info log event says so (api/ready.py), before the local node's first record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from grpclib import GRPCError, Status

from api.context import ServiceContext
from api.peers import PeerPool, peer_problem
from api.ready import READY_SEVERITY, is_ready, ready_message
from api.run_session import CLIENT_DROP_REASONS, DIRECT_RUNS, RunSession, client_key, new_run
from api.run_stream import LogForwarder, read_control
from api.stream_writer import FramedWriter
from pipeline import wire
from pipeline._gen import gadget_service_grpc as svc
from pipeline._gen import gadget_service_pb2 as pb
from pipeline.gadget import RUNTIME_PREFIX, GadgetError, GadgetSpec
from pipeline.graph import Edge, EdgeClosed, Overflow
from pipeline.ledger import REASON_CLIENT_GONE
from pipeline.run import OPERATOR_PARAMS, GadgetRun
from pipeline.schema import DataSourceSchema, DataSourceType
from pipeline.severity import Severity
from pipeline.sinks.encode import JsonEncoder, PerSchema

__all__ = ["legacy_json_encoder", "legacy_params", "run_builtin", "select_nodes"]

_logger = logging.getLogger(__name__)

EVENT_TYPE_RESULT = 1
EVENT_TYPE_JOB_ID = 3
NODE_KEY = "node"
RUNTIME_KEY_PREFIX = "runtime."
_SEQ_MASK = 0xFFFFFFFF



def legacy_json_encoder(schema: DataSourceSchema, node: str) -> JsonEncoder:
    """The JSON of a legacy payload: the sinks' JSON of the record, plus ``node``."""
    return JsonEncoder(schema, {NODE_KEY: node})


def legacy_params(spec: GadgetSpec, params: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Legacy param keys mapped to wire keys; returns the values and the keys ignored.

    ``operator.*`` keys (and any full wire key) pass unchanged; ``runtime.<key>`` maps to the
    runtime param ``<key>``; a bare key maps to the gadget param with that key.
    """
    specs = [*spec.params, *OPERATOR_PARAMS]
    full = {p.full_key for p in specs}
    bare: dict[str, str] = {}
    for p in specs:
        bare.setdefault(p.key, p.full_key)
        if p.alternative_key:
            bare.setdefault(p.alternative_key, p.full_key)
    runtime = {p.key: p.full_key for p in spec.params if p.prefix == RUNTIME_PREFIX}
    out: dict[str, str] = {}
    ignored: list[str] = []
    for key, value in params.items():
        if key in full or key.startswith("operator."):
            out[key] = value
        elif key.startswith(RUNTIME_KEY_PREFIX) and key[len(RUNTIME_KEY_PREFIX):] in runtime:
            out[runtime[key[len(RUNTIME_KEY_PREFIX):]]] = value
        elif key in bare:
            out[bare[key]] = value
        else:
            ignored.append(key)
    return out, ignored


def select_nodes(local_node: str, peers: PeerPool, nodes: Sequence[str],
                 fan_out: bool) -> tuple[bool, list[str]]:
    """Which nodes a legacy run covers: (run locally?, peer node names).

    Raises:
        GRPCError: a named node is neither this one nor a configured peer.
    """
    names = list(dict.fromkeys(nodes))
    if not names and fan_out:
        names = [local_node, *sorted(peers.nodes)]
    if not names:
        return True, []
    unknown = [n for n in names if n != local_node and n not in peers.nodes]
    if unknown:
        known = sorted({local_node, *peers.nodes})
        raise GRPCError(Status.INVALID_ARGUMENT,
                        f"unknown node(s) {', '.join(unknown)} (known: {', '.join(known)})")
    return local_node in names, [n for n in names if n != local_node]


@dataclass
class NodeResult:
    node: str
    records: int = 0
    error: str = ""

    def payload(self) -> bytes:
        return orjson.dumps({"node": self.node, "records": self.records, "error": self.error})


async def run_builtin(ctx: ServiceContext, stream: Any) -> None:
    """Serves one RunBuiltInGadget stream (see the module docstring)."""
    req: pb.BuiltInGadgetControlRequest | None = await stream.recv_message()
    if req is None:
        return
    if req.WhichOneof("Event") != "runRequest":
        raise GRPCError(Status.INVALID_ARGUMENT,
                        "expected first control message to be gadget run request")
    rr = req.runRequest
    if rr.timeout < 0:
        raise GRPCError(Status.INVALID_ARGUMENT, f"timeout: must be >= 0 ns, got {rr.timeout}")
    try:
        spec = ctx.catalog.legacy(rr.gadgetCategory, rr.gadgetName)
    except GadgetError as e:
        raise GRPCError(Status.NOT_FOUND, str(e)) from None
    peers: PeerPool = getattr(ctx.instances, "peers", None) or PeerPool({})
    local, remote = select_nodes(ctx.node, peers, list(rr.nodes), rr.fanOut)
    values, ignored = legacy_params(spec, rr.params)
    # Validated even when only peers run it: a bad request fails here, once, not per node.
    run = new_run(ctx, spec, values, ctx.next_run_name())
    session = _Session(ctx, stream, rr, peers)
    await session.serve(run if local else None, values, remote, ignored)


class _Session:
    """One legacy stream: the merged, numbered output of the local run and the peers."""

    def __init__(self, ctx: ServiceContext, stream: Any, rr: pb.BuiltInGadgetRunRequest,
                 peers: PeerPool) -> None:
        self._ctx = ctx
        self._stream = stream
        self._rr = rr
        self._peers = peers
        self._writer = FramedWriter(stream)
        self._lock = asyncio.Lock()
        self._seq = 0
        self._stop = asyncio.Event()
        self.log = LogForwarder(self._writer, self._lock, rr.logLevel)
        """Log events to the client (the one bounded forwarder every stream uses)."""
        self._waiting_ready: set[str] = set()
        self._ready_text = ""  # set once a node traces

    async def _write(self, data: bytes) -> None:
        async with self._lock:
            await self._writer.write(data)

    async def _emit(self, payloads: Sequence[bytes], gap: int) -> None:
        """Payload events numbered in arrival order; ``gap`` lost ones advance seq first."""
        if not payloads:
            return
        async with self._lock:
            first = self._seq + gap + 1
            self._seq = first + len(payloads) - 1
            data = b"".join(
                wire.grpc_frame(wire.gadget_event(wire.EVENT_TYPE_PAYLOAD,
                                                  (first + i) & _SEQ_MASK, p))
                for i, p in enumerate(payloads))
            await self._writer.write(data)

    async def _node_ready(self, node: str, failed: bool = False, text: str = "") -> None:
        """Notes that ``node`` traces (or failed); once every node does, the client hears
        the ready event (api/ready.py)."""
        if node not in self._waiting_ready:
            return
        self._waiting_ready.discard(node)
        if not failed:
            self._ready_text = text or self._ready_text or ready_message()
        if not self._waiting_ready and self._ready_text and self._rr.logLevel >= READY_SEVERITY:
            await self._write(wire.log_event(READY_SEVERITY, self._ready_text))

    async def serve(self, run: GadgetRun | None, values: Mapping[str, str], remote: list[str],
                    ignored: list[str]) -> None:
        job = str(uuid.uuid4())
        await self._write(wire.grpc_frame(wire.gadget_event(EVENT_TYPE_JOB_ID, 0, job.encode())))
        for key in ignored:
            self.log(Severity.WARN, f"ignoring unknown parameter {key!r}")
        nodes: dict[str, asyncio.Task[NodeResult]] = {}
        self._waiting_ready = {*([self._ctx.node] if run is not None else []), *remote}
        if run is not None:
            nodes[self._ctx.node] = asyncio.create_task(
                self._run_local(run, values, only=not remote), name=f"legacy:{self._ctx.node}")
        for node in remote:
            nodes[node] = asyncio.create_task(self._run_peer(node), name=f"legacy:{node}")
        control = asyncio.create_task(read_control(self._stream), name="legacy-control")
        # The daemon stopping ends the session as a stop request does: results, then OK.
        shutdown = asyncio.create_task(self._ctx.shutting_down.wait(), name="legacy-shutdown")
        waiters: set[asyncio.Future[Any]] = {control, shutdown, *nodes.values()}
        timer = None
        if self._rr.timeout > 0:
            timer = asyncio.create_task(asyncio.sleep(self._rr.timeout / 1e9))
            waiters.add(timer)
        client_gone = False
        try:
            pending = set(nodes.values())
            while pending:
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                waiters -= done
                pending -= done
                for t in done & set(nodes.values()):
                    if not t.cancelled() and isinstance(t.exception(), GRPCError):
                        raise t.exception()  # type: ignore[misc]
                if control in done:
                    client_gone = control.result() == "client gone"
                    break
                if (timer is not None and timer in done) or shutdown in done:
                    break
            self._stop.set()
            if client_gone:
                return
            # Nodes drain what they have and report; a node that cannot, within the deadline,
            # is reported as such.
            await asyncio.wait(set(nodes.values()), timeout=self._ctx.drain_deadline + 5)
            results = []
            for node, task in nodes.items():
                if not task.done() or task.cancelled():
                    results.append(NodeResult(node, error="did not stop in time"))
                elif task.exception() is not None:
                    results.append(NodeResult(node, error=str(task.exception())))
                else:
                    results.append(task.result())
            await self.log.flush(self._ctx.drain_deadline)
            for r in results:
                await self._write(wire.grpc_frame(wire.gadget_event(EVENT_TYPE_RESULT, 0,
                                                                    r.payload())))
        finally:
            self._stop.set()
            for t in [control, shutdown, *nodes.values(), *([timer] if timer else [])]:
                t.cancel()
            for t in [control, shutdown, *nodes.values(), *([timer] if timer else [])]:
                with contextlib.suppress(BaseException):
                    await t
            await self.log.close()

    async def _run_local(self, run: GadgetRun, values: Mapping[str, str], only: bool
                         ) -> NodeResult:
        result = NodeResult(self._ctx.node)
        session = RunSession(self._ctx, run, client_key(self._stream), DIRECT_RUNS)
        sender: asyncio.Task[None] | None = None
        edge: Edge | None = None
        try:
            try:
                session.reserve()
                edge = session.subscribe(f"legacy:{run.instance}",
                                         self._ctx.events_buffer_length, Overflow.DROP_NEWEST,
                                         CLIENT_DROP_REASONS)
                session.add_log_listener(self.log)
                session.log_params(values)
                await session.start()
            except Exception as e:
                message = e.message if isinstance(e, GRPCError) and e.message else str(e)
                if only:
                    raise GRPCError(e.status if isinstance(e, GRPCError)
                                    else Status.FAILED_PRECONDITION, message) from None
                result.error = message
                self.log(Severity.ERROR, f"node {self._ctx.node}: {message}")
                await self._node_ready(self._ctx.node, failed=True)
                return result
            await self._node_ready(self._ctx.node, text=session.ready_text())
            sender = asyncio.create_task(self._send_local(edge, result))
            stop = asyncio.create_task(self._stop.wait())
            ended = asyncio.create_task(run.wait())
            try:
                await asyncio.wait({stop, ended, sender}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                ended.cancel()
            await session.stop()  # drains the source into the edge, then closes it
            try:
                await asyncio.wait_for(asyncio.shield(sender), self._ctx.drain_deadline)
            except TimeoutError:
                result.error = "did not drain in time"
            return result
        finally:
            await session.stop()
            if sender is not None:
                sender.cancel()
                with contextlib.suppress(BaseException):
                    await sender
            if edge is not None:
                edge.discard_pending(REASON_CLIENT_GONE)
            await session.close()

    async def _send_local(self, edge: Edge, result: NodeResult) -> None:
        node = self._ctx.node
        encoders = PerSchema(lambda schema: legacy_json_encoder(schema, node))
        expected = 0
        while True:
            try:
                pos, batch = await edge.get()
            except EdgeClosed:
                return
            enc = encoders.get(batch.schema)
            if batch.schema.type == DataSourceType.ARRAY:
                payloads = [enc.encode_array(batch)]
                gap = 1 if pos > expected else 0
            else:
                payloads = enc.encode(batch)
                gap = pos - expected
            expected = pos + len(batch)
            await self._emit(payloads, gap)
            edge.delivered(len(batch))
            result.records += len(batch)

    async def _run_peer(self, node: str) -> NodeResult:
        result = NodeResult(node)
        address = self._peers.address(node)
        fwd = pb.BuiltInGadgetRunRequest()
        fwd.CopyFrom(self._rr)
        del fwd.nodes[:]
        fwd.fanOut = False
        stopper: asyncio.Task[None] | None = None
        try:
            stub = svc.BuiltInGadgetManagerStub(self._peers.channel(node))
            async with stub.RunBuiltInGadget.open() as st:
                await st.send_message(pb.BuiltInGadgetControlRequest(runRequest=fwd))

                async def stop_peer() -> None:
                    await self._stop.wait()
                    with contextlib.suppress(Exception):
                        await st.send_message(pb.BuiltInGadgetControlRequest(
                            stopRequest=pb.BuiltInGadgetStopRequest()))

                stopper = asyncio.create_task(stop_peer())
                expected = 1
                while True:
                    ev = await st.recv_message()
                    if ev is None:
                        break
                    if ev.type == wire.EVENT_TYPE_PAYLOAD:
                        gap = ev.seq - expected if ev.seq > expected else 0
                        expected = ev.seq + 1
                        await self._emit([ev.payload], gap)
                        result.records += _count_json(ev.payload)
                    elif ev.type == EVENT_TYPE_RESULT:
                        with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                            result.error = orjson.loads(ev.payload).get("error", "")
                    elif ev.type >= 1 << wire.EVENT_LOG_SHIFT:
                        text = ev.payload.decode("utf-8", "replace")
                        if is_ready(ev.type >> wire.EVENT_LOG_SHIFT, text):
                            await self._node_ready(node)
                        self.log(ev.type >> wire.EVENT_LOG_SHIFT, f"node {node}: {text}")
                stopper.cancel()
                # grpclib checks the status on exit, and only once our side ended too.
                await st.end()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            result.error = self._peers.describe(node, e)
            self.log(Severity.WARN, f"node {node!r} ({address}) {peer_problem(e)}: {result.error}; "
                     "continuing with the other nodes")
            await self._node_ready(node, failed=True)
            _logger.warning("legacy run: node %s (%s): %s", node, address, result.error)
        finally:
            if stopper is not None:
                stopper.cancel()
        return result


def _count_json(payload: bytes) -> int:
    # A JSON array (batched gadget) carries many records; peek rather than parse objects.
    if payload[:1] == b"[":
        with contextlib.suppress(orjson.JSONDecodeError):
            return len(orjson.loads(payload))
    return 1
