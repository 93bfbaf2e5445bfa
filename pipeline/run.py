"""A running gadget: source, operator chain and fan-out to subscribers, with the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pipeline.batch import Batch
from pipeline.gadget import EBPF_PREFIX, RUNTIME_PREFIX, GadgetSpec
from pipeline.graph import Edge, Fanout, Overflow
from pipeline.ledger import Ledger
from pipeline.operators import Operator, OperatorError
from pipeline.operators import enrich as enrich_op
from pipeline.operators import fields as fields_op
from pipeline.operators import filter as filter_op
from pipeline.params import ParamError, ParamSpec, resolve
from pipeline.schema import DataSourceSchema
from pipeline.sources.base import Source

_logger = logging.getLogger(__name__)

STAGE_SOURCE = "source"
STAGE_KERNEL = "kernel"
STAGE_FILTER = "filter"

OPERATOR_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("filter", "operator.filter.", "Keep records matching all comparisons, e.g. "
              "proc.comm==bash,proc.pid>100 (~ for a regex)", "", "string", alias="F",
              tags=("group:Data Filtering",)),
    ParamSpec("fields", "operator.fields.", "Fields to announce and emit: a,b or ds:a,b;ds2:c",
              "", "string", tags=("group:Data Manipulation",)),
    *enrich_op.PARAMS,
)
OWNED_PREFIXES: tuple[str, ...] = (EBPF_PREFIX, RUNTIME_PREFIX, "operator.filter.",
                                   "operator.fields.", enrich_op.PREFIX)

LogListener = Callable[[int, str], None]


class RunError(ValueError):
    """The run request is invalid (bad params or operator settings)."""


def build_operators(values: Mapping[str, Any],
                    schemas: list[DataSourceSchema]) -> list[Operator]:
    ops: list[Operator] = []
    if enrich_op.wanted(values):
        # First, as upstream enriches before filtering: later operators see the new fields.
        ops.append(enrich_op.Enrich(values, schemas))
        schemas = [ops[-1].output_schema(s) for s in schemas]
    if values.get("operator.filter.filter"):
        ops.append(filter_op.Filter(values["operator.filter.filter"], schemas))
    if values.get("operator.fields.fields"):
        ops.append(fields_op.FieldSelect(values["operator.fields.fields"], schemas))
    return ops


class GadgetRun:
    """One gadget running with one set of params, feeding any number of subscribers.

    Args:
        spec: the gadget.
        param_values: the request's flat, prefixed params.
        ledger: where every record's fate is counted.
        instance: the ledger label of this run.
        extra_params: params other layers own (gRPC stream, sinks); validated here too.
        extra_prefixes: the prefixes of ``extra_params``, checked strictly.
    """

    def __init__(self, spec: GadgetSpec, param_values: Mapping[str, str], ledger: Ledger,
                 instance: str, extra_params: Iterable[ParamSpec] = (),
                 extra_prefixes: Iterable[str] = ()) -> None:
        self.spec = spec
        self.instance = instance
        self._ledger = ledger
        specs = [*spec.params, *OPERATOR_PARAMS, *extra_params]
        try:
            self.values = resolve(specs, param_values, (*OWNED_PREFIXES, *extra_prefixes))
            self._operators = build_operators(self.values, list(spec.datasources))
        except (ParamError, OperatorError) as e:
            raise RunError(str(e)) from e
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
        self.error: str | None = None
        self.started = asyncio.Event()
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
        _logger.log(_PY_LEVEL.get(severity, logging.INFO), "[%s] %s", self.instance, message)
        for fn in tuple(self._log_listeners):
            fn(severity, message)

    def subscribe(self, name: str, capacity: int, overflow: Overflow,
                  on_drop: Callable[[int], None] | None = None) -> Edge:
        return self.fanout.subscribe(Edge(name, capacity, overflow, self._ledger, self.instance,
                                          on_drop))

    def unsubscribe(self, edge: Edge) -> None:
        self.fanout.unsubscribe(edge)

    async def start(self) -> None:
        """Builds and starts the source; raises SourceError with the reason."""
        factory = self.spec.source_factory()
        self._source = factory(self.spec, self.values)
        try:
            await self._source.start(self._emit, self.log)
        except BaseException as e:
            self.error = str(e)
            self.finished.set()
            with contextlib.suppress(Exception):
                await self._source.stop()
            raise
        self.started.set()

    async def _emit(self, batch: Batch) -> None:
        n = len(batch)
        self._ledger.produced(self.instance, STAGE_SOURCE, n)
        self._sync_kernel_losses()
        for op in self._operators:
            batch = op.process(batch)
        if len(batch) < n:
            self._ledger.dropped(self.instance, STAGE_FILTER, n - len(batch), "filtered")
        self._ledger.delivered(self.instance, STAGE_SOURCE, len(batch))
        if len(batch):
            await self.fanout.publish(batch)

    def _sync_kernel_losses(self) -> None:
        if self._source is None:
            return
        lost = self._source.lost()
        if lost > self._kernel_lost:
            delta = lost - self._kernel_lost
            self._kernel_lost = lost
            self._ledger.produced(self.instance, STAGE_KERNEL, delta)
            self._ledger.dropped(self.instance, STAGE_KERNEL, delta, "ringbuf_full")
            self.log(3, f"kernel ring buffer full: {delta} records lost ({lost} in total)")

    @property
    def kernel_lost(self) -> int:
        return self._kernel_lost

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
        try:
            if self._source is not None:
                await self._source.stop()
                self._sync_kernel_losses()
        finally:
            self.fanout.close()
            self.finished.set()


_PY_LEVEL = {1: logging.CRITICAL, 2: logging.ERROR, 3: logging.WARNING, 4: logging.INFO,
             5: logging.DEBUG, 6: logging.DEBUG}
