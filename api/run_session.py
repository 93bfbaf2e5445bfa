"""One run's life, the same for every consumer: direct runs (api/gadget_manager.py), instances
(api/instance.py) and legacy runs (api/legacy_run.py).

A consumer makes the run (:func:`new_run`, which validates the request and sets the run's
:class:`~pipeline.run.RunIdentity`), wraps it in a :class:`RunSession` and then:

1. :meth:`RunSession.reserve`: takes a place in the compile queue (api/compile_queue.py) at
   once, so a run past the queue's bounds is refused with ``RESOURCE_EXHAUSTED`` before
   anything is sent;
2. :meth:`RunSession.subscribe` and :meth:`RunSession.add_log_listener`: its own edge of the
   run's fan-out and where the run's log messages go (a stream consumer forwards them with
   api/run_stream.py's ``LogForwarder``, the one bounded log queue);
3. :meth:`RunSession.start`: attaches the run's sinks, waits for its compile turn and starts
   the source; it returns when the programs are attached and records flow (the ready moment,
   api/ready.py), and every ledger row the run can produce exists from then on, at 0;
4. :meth:`RunSession.close`: stops the run (the source drains into the edges), closes the
   sinks within the drain deadline, leaves the compile queue if the turn never came, folds the
   ledger rows later by one policy (``ServiceContext.folds``) and has the heap trimmed.

Params are logged to the client at debug level as upstream does (docs/gadget-service.md §3.1
step 4), only those the client sent, and a param marked secret (a sink's credential, such as an
OTLP header) reads ``<redacted>`` (pipeline/params.py).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from collections.abc import Iterable, Mapping
from typing import Any

from grpclib import GRPCError, Status

from api.compile_queue import CompileQueueFull, Ticket
from api.context import ServiceContext
from api.ready import ready_message
from pipeline.gadget import GadgetSpec
from pipeline.graph import Edge, Overflow
from pipeline.ledger import REASON_CLIENT_GONE
from pipeline.params import redact
from pipeline.run import GadgetRun, LogListener, RunError, RunIdentity
from pipeline.severity import Severity
from pipeline.sinks.base import (
    DROP_QUEUE_FULL,
    DROP_REJECTED,
    DROP_SEND_FAILED,
    DROP_SHUTDOWN,
    DROP_SINK_ERROR,
    OUTCOME_RETRIED,
)
from pipeline.source import SourceError
from pipeline.wire import GRPC_PARAMS, GRPC_PREFIX

__all__ = ["DIRECT_RUNS", "REMOVED_INSTANCES", "RunSession", "client_key", "new_run"]

_logger = logging.getLogger(__name__)

DIRECT_RUNS = "direct-runs"
"""Ledger label finished direct and legacy runs are folded into."""
REMOVED_INSTANCES = "removed-instances"
"""Ledger label removed instances are folded into."""
SINK_DROP_REASONS = (DROP_QUEUE_FULL, "closed", DROP_SEND_FAILED, DROP_REJECTED,
                     DROP_SINK_ERROR, DROP_SHUTDOWN)
"""Every reason a sink's stage can drop for (pipeline/sinks/base.py SinkRunner)."""
CLIENT_DROP_REASONS = (REASON_CLIENT_GONE,)
"""Reasons a client's edge drops for besides its overflow policy's."""


def new_run(ctx: ServiceContext, spec: GadgetSpec, params: Mapping[str, str], label: str,
            identity: RunIdentity | None = None) -> GadgetRun:
    """A run with the stream's and the sinks' params validated along with the gadget's.

    Raises:
        GRPCError: INVALID_ARGUMENT naming the param and the reason.
    """
    extra = list(GRPC_PARAMS)
    prefixes = [GRPC_PREFIX]
    if ctx.sinks is not None:
        extra += ctx.sinks.params()
        prefixes += ctx.sinks.prefixes()
    try:
        run = GadgetRun(spec, params, ctx.ledger, label, extra, prefixes, identity=identity,
                        containers=ctx.containers)
    except RunError as e:
        raise GRPCError(Status.INVALID_ARGUMENT, str(e)) from None
    if ctx.sinks is not None:
        problems = ctx.sinks.check(run.values, run.schemas)
        if problems:
            raise GRPCError(Status.INVALID_ARGUMENT, "; ".join(
                f"invalid parameter {key!r}: {reason}" for key, reason in problems))
    return run


def client_key(stream: Any) -> str:
    """Who is on the other end of ``stream``, for the compile queue's per-client bound: the
    process (``pid:N``, from SO_PEERCRED) on a unix socket, the host over TCP."""
    transport = None
    with contextlib.suppress(Exception):
        transport = stream.peer._transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and sock.family == socket.AF_UNIX:
        with contextlib.suppress(OSError):
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
            pid, _, _ = struct.unpack("3i", creds)
            return f"pid:{pid}"
    with contextlib.suppress(Exception):
        addr = stream.peer.addr()
        if isinstance(addr, tuple) and addr:
            return f"host:{addr[0]}"
    return f"stream:{id(stream):x}"


class RunSession:
    """One run from its start to its folded ledger rows (see the module docstring).

    Args:
        ctx: the daemon's service context (sinks, ledger, compile queue).
        run: the run, made by :func:`new_run`.
        client: who waits for it (:func:`client_key`), bounded in the compile queue; None
            for an instance, which takes its turn but is never refused.
        fold_into: the ledger label its rows fold into once it is closed.
    """

    def __init__(self, ctx: ServiceContext, run: GadgetRun, client: str | None,
                 fold_into: str) -> None:
        self.ctx = ctx
        self.run = run
        self._client = client
        self._fold_into = fold_into
        self._listeners: list[LogListener] = []
        self._sinks: Any = None
        self._ticket: Ticket | None = None
        self._closed = False
        self.created = time.monotonic()
        self.ready_seconds: float | None = None
        """Seconds from the session's making to the ready moment (None before it)."""
        ctx.folds.keep(run.instance)  # its label is in use again

    @property
    def identity(self) -> RunIdentity:
        return self.run.identity

    @property
    def label(self) -> str:
        return self.run.instance

    @property
    def ready(self) -> bool:
        """The run's programs are attached and records flow."""
        return self.ready_seconds is not None

    @property
    def waiting_for_turn(self) -> bool:
        """In the compile queue, its turn not come yet (nothing loaded)."""
        return self._ticket is not None and self._ticket.waiting

    def ready_text(self) -> str:
        """The ready log event's text (api/ready.py)."""
        return ready_message(self.run.attach_seconds)

    def reserve(self) -> Ticket:
        """Takes the run's place in the compile queue (idempotent); returns it.

        Raises:
            GRPCError: RESOURCE_EXHAUSTED when the queue is at a bound; the message names it.
        """
        if self._ticket is None:
            try:
                self._ticket = self.ctx.compile_queue.reserve(self._client, self.label)
            except CompileQueueFull as e:
                raise GRPCError(Status.RESOURCE_EXHAUSTED, str(e)) from None
        return self._ticket

    def subscribe(self, name: str, capacity: int, overflow: Overflow,
                  reasons: Iterable[str] = ()) -> Edge:
        """The consumer's own edge; its ledger rows (``reasons`` besides the overflow
        policy's) exist from now on."""
        edge = self.run.subscribe(name, capacity, overflow)
        self.ctx.ledger.declare_drops(self.label, name, reasons)
        return edge

    def add_log_listener(self, fn: LogListener) -> None:
        """``fn`` gets the run's log messages until the session closes; it must not block."""
        self.run.add_log_listener(fn)
        self._listeners.append(fn)

    def log_params(self, values: Mapping[str, str]) -> None:
        """One debug log per param the client sent, secret ones redacted."""
        for key, value in sorted(redact(values, self.run.param_specs).items()):
            self.run.log(Severity.DEBUG, f"param {key}: {value}")

    async def start(self) -> None:
        """Attaches the sinks, waits for the compile turn and starts the source; returns when
        the run traces.

        Raises:
            GRPCError: FAILED_PRECONDITION (a sink or the source cannot start, with the
                reason) or RESOURCE_EXHAUSTED (see :meth:`reserve`).
        """
        ticket = self.reserve()
        if self.ctx.sinks is not None:
            try:
                self._sinks = await self.ctx.sinks.attach(self.run)
            except RunError as e:
                raise GRPCError(Status.FAILED_PRECONDITION, str(e)) from None
            for runner in self._sinks.runners:
                self.ctx.ledger.declare_drops(self.label, runner.stage, SINK_DROP_REASONS)
                self.ctx.ledger.declare(self.label, runner.stage, OUTCOME_RETRIED)
        async with ticket.turn():
            try:
                await self.run.start()
            except SourceError as e:
                raise GRPCError(Status.FAILED_PRECONDITION, str(e)) from None
        self.ready_seconds = time.monotonic() - self.created
        _logger.info("%s (%s): %s; ready %.2f s after the request", self.label,
                     self.run.spec.name, self.ready_text(), self.ready_seconds)

    async def stop(self) -> None:
        """Stops the run: the source drains what it holds into the edges, which then close."""
        with contextlib.suppress(Exception):
            await self.run.stop()

    async def close(self, drain: float | None = None) -> None:
        """Stops the run and closes its sinks within ``drain`` seconds (default: the
        daemon's drain deadline); idempotent."""
        if self._closed:
            return
        self._closed = True
        for fn in self._listeners:
            self.run.remove_log_listener(fn)
        self._listeners.clear()
        if self._ticket is not None:
            self._ticket.release()  # a run whose turn never came leaves the queue
        try:
            await self.stop()
            if self._sinks is not None:
                deadline = self.ctx.drain_deadline if drain is None else drain
                try:
                    await self._sinks.close(deadline)
                except Exception as e:
                    _logger.warning("%s: closing its sinks: %s", self.label, e)
        finally:
            self._sinks = None
            self.ctx.folds.later(self.label, self._fold_into)
            self.ctx.heap.request()
