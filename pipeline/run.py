"""A running gadget: source, operator chain and fan-out to subscribers, with the ledger.

Load shedding (``operator.bcc.shed=true``, off by default: sampling changes what users see).
Every subscriber of a run (a gRPC stream, a sink, an instance's own edge) owns a bounded
queue, and a slow one drops, counted, what does not fit, after the record was copied out of the
ring, filtered and queued. Shedding moves that loss to where it costs least: the kernel, before
the record is written. After each drained batch (and on a 10 ms tick while no batch comes, so
it also relaxes when nothing flows) the run looks at its fullest open queue.
Above ``operator.bcc.shed-high`` percent of its capacity (75) the in-kernel sampling rate N
doubles, up to ``operator.bcc.shed-max`` (1024); below ``operator.bcc.shed-low`` (25) it
halves, back to 1; at most one step per :data:`SHED_STEP`. N is written into the BPF array
``gadget_sample``, and ``gadget_reserve`` (pipeline/sources/bpf/gadget_sample.h) then keeps a
record with probability 1/N; a record not kept is never written to the ring and is counted in
the per-CPU array ``gadget_shed``. The run reads that counter with the ring's loss counter into
the ledger: stage ``kernel``, reason ``shed`` (reason ``ringbuf_full`` for a full ring), so
``produced(source) + dropped(kernel, shed) + dropped(kernel, ringbuf_full)`` is every record
the gadget's hooks wanted to emit. Clients hear a warn log when shedding starts and an info log
when it ends. The fullest queue decides for the whole run, since the kernel samples before the
fan-out; gadgets whose source cannot sample (snapshot_process, top_file, trace_dns) log that
the param is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from pipeline.batch import Batch
from pipeline.containers import selector as container_selector
from pipeline.containers.collection import ContainerCollection
from pipeline.gadget import EBPF_PREFIX, RUNTIME_PREFIX, GadgetSpec
from pipeline.graph import Edge, Fanout, Overflow
from pipeline.ledger import (
    DROPPED,
    PRODUCED,
    REASON_CLOSED,
    REASON_FILTERED,
    REASON_QUEUE_FULL,
    REASON_RINGBUF_FULL,
    REASON_SHED,
    STAGE_FILTER,
    STAGE_KERNEL,
    STAGE_SOURCE,
    Ledger,
)
from pipeline.operators import Operator, OperatorError
from pipeline.operators import derive as derive_op
from pipeline.operators import enrich as enrich_op
from pipeline.operators import fields as fields_op
from pipeline.operators import filter as filter_op
from pipeline.params import ParamError, ParamSpec, resolve
from pipeline.schema import DataSourceSchema
from pipeline.severity import Severity
from pipeline.source import SheddingSource, Source

_logger = logging.getLogger(__name__)

__all__ = [
    "OPERATOR_PARAMS",
    "OWNED_PREFIXES",
    "REASON_RINGBUF_FULL",
    "REASON_SHED",
    "STAGE_FILTER",
    "STAGE_KERNEL",
    "STAGE_SOURCE",
    "GadgetRun",
    "LogListener",
    "RunError",
    "RunIdentity",
    "ShedController",
    "build_operators",
    "queue_fill",
]

SHED = RUNTIME_PREFIX + "shed"
SHED_HIGH = RUNTIME_PREFIX + "shed-high"
SHED_LOW = RUNTIME_PREFIX + "shed-low"
SHED_MAX = RUNTIME_PREFIX + "shed-max"
SHED_STEP = 0.01
"""Seconds between two changes of the sampling rate: about one timed drain (10 ms by default;
a filling ring drains sooner), so N follows the queues, not each batch."""

OPERATOR_PARAMS: tuple[ParamSpec, ...] = (
    # Key and alias as upstream's filter operator (operator.filter.filter, -F).
    ParamSpec("filter", "operator.filter.", "Keep records matching all comparisons, e.g. "
              "proc.comm==bash,proc.pid>100 (~ for a regex)", "", "string", alias="F",
              tags=("group:Data Filtering",)),
    ParamSpec(fields_op.PARAM.removeprefix(fields_op.PREFIX), fields_op.PREFIX,
              "Fields the daemon announces and emits: a,b or ds:a,b;ds2:c", "", "string",
              tags=("group:Data Manipulation",), old_keys=(fields_op.OLD_PARAM,)),
    *enrich_op.PARAMS,
)
OWNED_PREFIXES: tuple[str, ...] = (EBPF_PREFIX, RUNTIME_PREFIX, "operator.filter.",
                                   fields_op.PREFIX, enrich_op.PREFIX,
                                   container_selector.PREFIX)

LogListener = Callable[[int, str], None]


class RunError(ValueError):
    """The run request is invalid (bad params or operator settings)."""


@dataclass(frozen=True, slots=True)
class RunIdentity:
    """Who a run is, as sinks and metrics name it; set where the run is made.

    Args:
        gadget: the gadget's name (``trace_exec``).
        label: the run's ledger label (``instance:<name>``, ``run-N``).
        instance_id: the instance's id (32 hex), or the label for a run that is no instance.
        instance_name: the instance's name, or the label for a run that is no instance.
    """

    gadget: str
    label: str
    instance_id: str
    instance_name: str

    @classmethod
    def of_run(cls, gadget: str, label: str) -> RunIdentity:
        """A run that is no instance (a direct or legacy run): named by its label."""
        return cls(gadget, label, label, label)


def build_operators(values: Mapping[str, Any], schemas: list[DataSourceSchema],
                    enrich: enrich_op.Enrich | None = None) -> list[Operator]:
    # Enrichment first, as upstream enriches before filtering: later operators see its fields.
    ops: list[Operator] = [enrich or enrich_op.Enrich(values, schemas)]
    schemas = [ops[-1].output_schema(s) for s in schemas]
    if values.get(filter_op.PARAM):
        ops.append(filter_op.Filter(values[filter_op.PARAM], schemas))
    if values.get(fields_op.PARAM):
        ops.append(fields_op.FieldSelect(values[fields_op.PARAM], schemas))
    return ops


@dataclass
class ShedController:
    """The in-kernel sampling rate N from the fill of a run's queues (see the module doc).

    Args:
        high: fill (0..1) above which N doubles.
        low: fill below which N halves.
        max_rate: the largest N.
    """

    high: float
    low: float
    max_rate: int
    rate: int = 1

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> ShedController | None:
        """The controller a run's params ask for (None: no shedding).

        Raises:
            RunError: thresholds that cannot work.
        """
        if not values.get(SHED):
            return None
        high, low, top = int(values[SHED_HIGH]), int(values[SHED_LOW]), int(values[SHED_MAX])
        if not 0 < high <= 100:
            raise RunError(f"invalid parameter {SHED_HIGH!r}: must be 1..100, got {high}")
        if not low < high:
            raise RunError(f"invalid parameter {SHED_LOW!r}: must be below {SHED_HIGH} "
                           f"({high}), got {low}")
        if top < 1:
            raise RunError(f"invalid parameter {SHED_MAX!r}: must be at least 1, got {top}")
        return cls(high / 100, low / 100, top)

    def step(self, fill: float) -> int:
        """The rate after one look at the queues, ``fill`` being the fullest one's."""
        if fill > self.high:
            self.rate = min(self.rate * 2, self.max_rate)
        elif fill < self.low:
            self.rate = max(self.rate // 2, 1)
        return self.rate


def queue_fill(edges: Iterable[Edge]) -> tuple[float, str]:
    """The fill (depth / capacity) of the fullest open edge, and its name."""
    fill, name = 0.0, ""
    for e in edges:
        if not e.closed and e.depth / e.capacity > fill:
            fill, name = e.depth / e.capacity, e.name
    return fill, name


class GadgetRun:
    """One gadget running with one set of params, feeding any number of subscribers.

    Args:
        spec: the gadget.
        param_values: the request's flat, prefixed params.
        ledger: where every record's fate is counted.
        instance: the ledger label of this run.
        extra_params: params other layers own (gRPC stream, sinks); validated here too.
        extra_prefixes: the prefixes of ``extra_params``, checked strictly.
        identity: who the run is (instance id and name); by default a run named by its
            label.
        containers: the daemon's container collection (records' ``k8s``/``runtime`` fields
            and container selection); None: no container is known.
    """

    def __init__(self, spec: GadgetSpec, param_values: Mapping[str, str], ledger: Ledger,
                 instance: str, extra_params: Iterable[ParamSpec] = (),
                 extra_prefixes: Iterable[str] = (), identity: RunIdentity | None = None,
                 containers: ContainerCollection | None = None) -> None:
        self.spec = spec
        self.instance = instance
        self.identity = identity or RunIdentity.of_run(spec.name, instance)
        if self.identity.label != instance:
            raise ValueError(f"run identity {self.identity.label!r} is not the run's label "
                             f"{instance!r}")
        self._ledger = ledger
        specs = [*spec.params, *OPERATOR_PARAMS, *extra_params]
        try:
            self.values = resolve(specs, param_values, (*OWNED_PREFIXES, *extra_prefixes))
            # Derived fields first: every later operator, stream and sink sees them announced
            # (computed only when read: pipeline/derive).
            self.derive = derive_op.Derive(spec.datasources, spec.derive)
            derived = [self.derive.output_schema(s) for s in spec.datasources]
            self._enrich = enrich_op.Enrich(self.values, derived, containers)
            self._operators = [self.derive,
                               *build_operators(self.values, derived, self._enrich)]
        except (ParamError, OperatorError) as e:
            raise RunError(str(e)) from e
        self._shedder = ShedController.from_values(self.values)
        schemas = []
        for ds in spec.datasources:
            for op in self._operators:
                ds = op.output_schema(ds)
            schemas.append(ds)
        self.schemas: tuple[DataSourceSchema, ...] = tuple(schemas)
        self.param_specs = tuple(specs)
        self.fanout = Fanout()
        self._source: Source | None = None
        self._log_listeners: list[LogListener] = []
        self._kernel_lost = 0
        self._kernel_shed = 0
        self._shed_at = 0.0
        self._shed_task: asyncio.Task[None] | None = None
        self.error: str | None = None
        self.attach_seconds = 0.0
        """How long the source took to compile, load and attach (its ``start``)."""
        self.started = asyncio.Event()
        """Set once the source's programs are attached: records flow from then on."""
        self.finished = asyncio.Event()
        self._stop_task: asyncio.Task[None] | None = None

    @property
    def source(self) -> Source | None:
        return self._source

    def add_log_listener(self, fn: LogListener) -> None:
        self._log_listeners.append(fn)

    def remove_log_listener(self, fn: LogListener) -> None:
        with contextlib.suppress(ValueError):
            self._log_listeners.remove(fn)

    def log(self, severity: int, message: str) -> None:
        _logger.log(Severity.of(severity).python_level, "[%s] %s", self.instance, message)
        for fn in tuple(self._log_listeners):
            fn(severity, message)

    def subscribe(self, name: str, capacity: int, overflow: Overflow,
                  on_drop: Callable[[int], None] | None = None) -> Edge:
        """A new edge of the fan-out; its ledger rows exist (at 0) from now on."""
        reasons = [REASON_CLOSED] if overflow is Overflow.BLOCK else [REASON_QUEUE_FULL,
                                                                      REASON_CLOSED]
        self._ledger.declare_drops(self.instance, name, reasons)
        return self.fanout.subscribe(Edge(name, capacity, overflow, self._ledger, self.instance,
                                          on_drop))

    def _declare_rows(self) -> None:
        """The rows the source and the operators can produce, at 0 (see pipeline/ledger.py)."""
        self._ledger.declare_drops(self.instance, STAGE_SOURCE, ())
        # The kernel stage counts only what never reached the ring: produced = dropped.
        self._ledger.declare(self.instance, STAGE_KERNEL, PRODUCED)
        shed = [REASON_SHED] if self._shedder is not None else []
        for reason in (REASON_RINGBUF_FULL, *shed):
            self._ledger.declare(self.instance, STAGE_KERNEL, DROPPED, reason)
        if self.values.get("operator.filter.filter"):
            self._ledger.declare(self.instance, STAGE_FILTER, DROPPED, REASON_FILTERED)

    def unsubscribe(self, edge: Edge) -> None:
        self.fanout.unsubscribe(edge)

    async def start(self) -> None:
        """Builds and starts the source; raises SourceError with the reason."""
        factory = self.spec.source_factory()
        self._source = factory(self.spec, self.values)
        self._declare_rows()
        began = time.monotonic()
        try:
            await self._source.start(self._emit, self.log)
            self.attach_seconds = time.monotonic() - began
        except BaseException as e:
            self.error = str(e)
            self.finished.set()
            with contextlib.suppress(Exception):
                await self._source.stop()
            raise
        self._enrich.attach(self._source, self.log)
        self.started.set()
        if self._shedder is not None:
            if hasattr(self._source, "set_sample_rate") and \
                    cast(SheddingSource, self._source).set_sample_rate(1):
                self._shed_task = asyncio.create_task(self._shed_ticker(),
                                                      name=f"shed:{self.instance}")
            else:
                self._shedder = None
                self.log(Severity.WARN, f"{SHED}: gadget {self.spec.name} cannot sample in the "
                         "kernel; running without load shedding")

    async def _emit(self, batch: Batch) -> None:
        n = len(batch)
        self._ledger.produced(self.instance, STAGE_SOURCE, n)
        self._sync_kernel_losses()
        for op in self._operators:
            batch = op.process(batch)
        if len(batch) < n:
            self._ledger.dropped(self.instance, STAGE_FILTER, n - len(batch), REASON_FILTERED)
        self._ledger.delivered(self.instance, STAGE_SOURCE, len(batch))
        if len(batch):
            await self.fanout.publish(batch)
        self._shed_step()

    @property
    def sample_rate(self) -> int:
        """The in-kernel sampling rate: 1 record kept in this many (1: no shedding)."""
        return self._shedder.rate if self._shedder is not None else 1

    async def _shed_ticker(self) -> None:
        # Drains come only while records do; this lets the rate relax when they stop.
        while True:
            await asyncio.sleep(SHED_STEP)
            self._shed_step()

    def _shed_step(self) -> None:
        if self._shedder is None:  # the hot path of every run that does not shed
            return
        now = time.monotonic()
        if now - self._shed_at < SHED_STEP:
            return
        self._shed_at = now
        before = self._shedder.rate
        fill, edge = queue_fill(self.fanout.edges)
        rate = self._shedder.step(fill)
        if rate == before or self._source is None:
            return
        cast(SheddingSource, self._source).set_sample_rate(rate)
        if before == 1:
            self.log(Severity.WARN, f"shedding load: queue {edge} is {fill:.0%} full; the kernel "
                     f"keeps 1 record in {rate} (the others are counted as shed)")
        elif rate == 1:
            self._sync_kernel_losses()
            self.log(Severity.INFO, "load shedding ended: the queues drained "
                     f"({self._kernel_shed} records shed so far)")
        else:
            self.log(Severity.DEBUG, f"load shedding: the kernel keeps 1 record in {rate} "
                     f"(queue {edge} {fill:.0%} full)")

    def _sync_kernel_losses(self) -> None:
        if self._source is None:
            return
        lost = self._source.lost()
        if lost > self._kernel_lost:
            delta = lost - self._kernel_lost
            self._kernel_lost = lost
            self._ledger.produced(self.instance, STAGE_KERNEL, delta)
            self._ledger.dropped(self.instance, STAGE_KERNEL, delta, REASON_RINGBUF_FULL)
            self.log(Severity.WARN,
                     f"kernel ring buffer full: {delta} records lost ({lost} in total)")
        if self.values.get(SHED) and hasattr(self._source, "shed"):
            shed = cast(SheddingSource, self._source).shed()
            if shed > self._kernel_shed:
                delta = shed - self._kernel_shed
                self._kernel_shed = shed
                self._ledger.produced(self.instance, STAGE_KERNEL, delta)
                self._ledger.dropped(self.instance, STAGE_KERNEL, delta, REASON_SHED)

    @property
    def kernel_lost(self) -> int:
        return self._kernel_lost

    @property
    def kernel_shed(self) -> int:
        """Records the kernel sampled out (load shedding), as last read."""
        return self._kernel_shed

    async def wait(self) -> None:
        """Returns when the source ends by itself or the run is stopped."""
        if self._source is not None:
            waiter = asyncio.ensure_future(self._source.wait())
            done = asyncio.ensure_future(self.finished.wait())
            await asyncio.wait({waiter, done}, return_when=asyncio.FIRST_COMPLETED)
            for t in (waiter, done):
                t.cancel()

    async def stop(self) -> None:
        """Stops the source (it drains what it buffered), then closes every subscriber edge.

        The teardown runs as its own task and callers await it shielded: a caller cancelled
        midway (a client that vanished) must not leave BPF programs attached.
        """
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._teardown(), name=f"stop:{self.instance}")
        await asyncio.shield(self._stop_task)

    async def _teardown(self) -> None:
        if self._shed_task is not None:
            self._shed_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._shed_task
        try:
            if self._source is not None:
                await self._source.stop()
                self._sync_kernel_losses()
        finally:
            self._enrich.close()
            self.fanout.close()
            self.finished.set()

