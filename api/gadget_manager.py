"""``api.GadgetManager``: GetGadgetInfo and RunGadget (run and attach)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from grpclib import GRPCError, Status

from api.context import ServiceContext
from api.gadget_info import field_table, gadget_info, sorted_datasources
from api.ready import READY_SEVERITY
from api.run_session import CLIENT_DROP_REASONS, DIRECT_RUNS, RunSession, client_key, new_run
from api.run_stream import (
    LogForwarder,
    StreamLayout,
    StreamSink,
    info_event,
    read_control,
)
from api.stream_writer import FramedWriter
from pipeline import wire
from pipeline._gen import gadget_service_grpc as svc
from pipeline._gen import gadget_service_pb2 as pb
from pipeline.gadget import GadgetError, GadgetSpec, UnknownGadget
from pipeline.graph import Overflow
from pipeline.ledger import GRPC_STAGE_PREFIX, grpc_stage
from pipeline.operators import fields as fields_op
from pipeline.operators import filter as filter_op
from pipeline.run import GadgetRun
from pipeline.wire import BATCH_LINGER, BATCH_MAX

_logger = logging.getLogger(__name__)

VERSION = 1
FLAG_USE_INSTANCE = 1


def check_version(version: int) -> None:
    if version != VERSION:
        raise GRPCError(Status.INVALID_ARGUMENT, f"expected version to be 1, got {version}")


def resolve_gadget(ctx: ServiceContext, image: str) -> GadgetSpec:
    try:
        return ctx.catalog.resolve(image)
    except UnknownGadget as e:
        raise GRPCError(Status.NOT_FOUND, str(e)) from None
    except GadgetError as e:
        raise GRPCError(Status.FAILED_PRECONDITION, str(e)) from None


def graph_mermaid(run: GadgetRun) -> str:
    lines = ["flowchart LR", f"  src[{run.spec.name}: BPF ring buffers]"]
    ops = [k.split(".")[1] for k in (filter_op.PARAM, fields_op.PARAM)
           if run.values.get(k)]
    prev = "src"
    for op in ops:
        lines.append(f"  {op}[{op}]")
        lines.append(f"  {prev} --> {op}")
        prev = op
    lines.append("  fan[fan-out]")
    lines.append(f"  {prev} --> fan")
    lines.append("  fan -->|bounded queue, drop-newest| grpc[gRPC stream]")
    return "\n".join(lines) + "\n"


class GadgetManager(svc.GadgetManagerBase):
    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx

    async def GetGadgetInfo(self, stream: Any) -> None:
        req: pb.GetGadgetInfoRequest = await stream.recv_message()
        check_version(req.version)
        if req.flags & FLAG_USE_INSTANCE:
            if self._ctx.instances is None:
                raise GRPCError(Status.UNIMPLEMENTED, "instance manager not initialized")
            info = await self._ctx.instances.gadget_info(req.imageName)
            await stream.send_message(pb.GetGadgetInfoResponse(gadgetInfo=info))
            return
        spec = resolve_gadget(self._ctx, req.imageName)
        run = new_run(self._ctx, spec, dict(req.paramValues), "inspect")
        info = gadget_info(spec, req.imageName, sorted_datasources(run.schemas),
                           run.param_specs, with_ids=False)
        if req.requestExtraInfo:
            extra = {
                "ebpf.source": ("text/plain", spec.program.read_bytes()
                                if spec.program.exists() else b""),
                "oci.metadata": ("text/yaml", spec.metadata),
                "gadgetpipe.fields": ("application/json", field_table(run.schemas)),
                "gadgetpipe.graph": ("text/mermaid", graph_mermaid(run).encode()),
                "gadgetpipe.readme": ("text/markdown", spec.readme.encode()),
            }
            for key, (ctype, content) in extra.items():
                info.extraInfo.data[key].contentType = ctype
                info.extraInfo.data[key].content = content
        await stream.send_message(pb.GetGadgetInfoResponse(gadgetInfo=info))

    async def RunGadget(self, stream: Any) -> None:
        req: pb.GadgetControlRequest | None = await stream.recv_message()
        if req is None:
            return
        which = req.WhichOneof("Event")
        if which == "attachRequest":
            check_version(req.attachRequest.version)
            if self._ctx.instances is None:
                raise GRPCError(Status.UNIMPLEMENTED, "instance manager not initialized")
            await self._ctx.instances.attach(stream, req.attachRequest)
            return
        if which != "runRequest":
            raise GRPCError(Status.INVALID_ARGUMENT,
                            "expected first control message to be gadget run request")
        rr = req.runRequest
        check_version(rr.version)
        if rr.timeout < 0:
            raise GRPCError(Status.INVALID_ARGUMENT, f"timeout: must be >= 0 ns, got {rr.timeout}")
        spec = resolve_gadget(self._ctx, rr.imageName)
        run = new_run(self._ctx, spec, dict(rr.paramValues), self._ctx.next_run_name())
        await serve_direct_run(self._ctx, stream, run, rr)


async def serve_direct_run(ctx: ServiceContext, stream: Any, run: GadgetRun,
                           rr: pb.GadgetRunRequest) -> None:
    """Runs ``run`` for this stream alone until stop, timeout, client exit or the source ends.

    Order on the wire (docs/gadget-service.md §3.1): the GadgetInfo, then (at ``logLevel`` >= 4) the
    ready log event once the programs are attached (api/ready.py), then records; a run the compile
    queue refuses fails with RESOURCE_EXHAUSTED before anything is sent.
    """
    session = RunSession(ctx, run, client_key(stream), DIRECT_RUNS)
    writer = FramedWriter(stream)
    lock = asyncio.Lock()
    logs = LogForwarder(writer, lock, rr.logLevel)
    try:
        session.reserve()
        linger = float(run.values.get(BATCH_LINGER) or 0.02)
        layout = StreamLayout.build(run.schemas, int(run.values.get(BATCH_MAX) or 0), linger,
                                    _duration_text(linger))
        edge = session.subscribe(grpc_stage(_peer(stream)), ctx.events_buffer_length,
                                 Overflow.DROP_NEWEST, CLIENT_DROP_REASONS)
        session.add_log_listener(logs)
        session.log_params(rr.paramValues)
        info = gadget_info(run.spec, rr.imageName, layout.schemas, run.param_specs,
                           with_ids=True)
        async with lock:
            await writer.write(info_event(info))
        await session.start()
        if rr.logLevel >= READY_SEVERITY:
            # Written here, before the stream's sink starts: the client sees it before the
            # first record.
            async with lock:
                await writer.write(wire.log_event(READY_SEVERITY, session.ready_text()))
        await _until_done(ctx, stream, run, StreamSink(writer, edge, layout, lock),
                          rr.timeout / 1e9)
    finally:
        await logs.close()
        await session.close()


async def _until_done(ctx: ServiceContext, stream: Any, run: GadgetRun, sink: StreamSink,
                      timeout: float) -> None:
    sink_task = asyncio.create_task(sink.run(), name="grpc-sink")
    waiters = {
        asyncio.create_task(read_control(stream), name="control"),
        asyncio.create_task(run.wait(), name="source-end"),
        asyncio.create_task(ctx.shutting_down.wait(), name="shutdown"),  # ends as a stop does
        sink_task,
    }
    if timeout > 0:
        waiters.add(asyncio.create_task(asyncio.sleep(timeout), name="timeout"))
    try:
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        client_gone = sink_task in done or any(
            t.get_name() == "control" and t.result() == "client gone" for t in done)
        await run.stop()  # drains the source into the edge, then closes it
        if not client_gone and not sink_task.done():
            try:
                await asyncio.wait_for(asyncio.shield(sink_task), ctx.drain_deadline)
            except TimeoutError:
                _logger.warning("stream did not drain within %.1fs", ctx.drain_deadline)
    finally:
        for t in waiters:
            t.cancel()
        for t in waiters:
            with contextlib.suppress(BaseException):
                await t
        edge_left = [e for e in run.fanout.edges if e.name.startswith(GRPC_STAGE_PREFIX)]
        for e in edge_left:
            e.discard_pending("client_gone")


def _peer(stream: Any) -> str:
    with contextlib.suppress(Exception):
        peer = stream.peer.addr()
        if peer:
            return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
    return f"stream-{id(stream) & 0xFFFF:x}"


def _duration_text(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"
