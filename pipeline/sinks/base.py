"""The runner that feeds one sink from one run, and the sink-type base; the sink contract
itself (:class:`Sink`, :class:`SinkError`) is the engine's, in :mod:`pipeline.sink`.

A sink only encodes and sends (the "where"); :class:`SinkRunner` owns the "when": its bounded
edge, coalescing of queued batches, retries with backoff, and the ledger. A sink never sees a
record twice unless it asked for a retry, and every record a runner accepted ends as delivered
or as a counted drop.

A kind of sink is one module in ``pipeline/sinks`` with a class decorated by
:func:`register_sink`; the registry finds it by scanning the package (no list to edit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Protocol, TypeVar

from pipeline.batch import Batch
from pipeline.graph import Edge, EdgeClosed, Overflow
from pipeline.ledger import (
    REASON_QUEUE_FULL,
    REASON_REJECTED,
    REASON_SEND_FAILED,
    REASON_SHUTDOWN,
    REASON_SINK_ERROR,
    Ledger,
)
from pipeline.params import ParamSpec
from pipeline.schema import DataSourceSchema
from pipeline.sink import Sink, SinkError
from pipeline.sinks.endpoints import Endpoint, tcp_probe

__all__ = [
    "KEY_ENABLE",
    "OUTCOME_RETRIED",
    "SINK_MARK",
    "RetryPolicy",
    "Sink",
    "SinkContext",
    "SinkError",
    "SinkRunner",
    "SinkState",
    "SinkType",
    "SinkTypeBase",
    "coalesce",
    "has_field",
    "list_separator",
    "register_sink",
    "setting_of",
]

_logger = logging.getLogger(__name__)

OUTCOME_RETRIED = "retried"
"""Ledger outcome for records whose send failed once and was tried again (not a final fate)."""

DROP_QUEUE_FULL = REASON_QUEUE_FULL
DROP_SEND_FAILED = REASON_SEND_FAILED
DROP_REJECTED = REASON_REJECTED
DROP_SINK_ERROR = REASON_SINK_ERROR
DROP_SHUTDOWN = REASON_SHUTDOWN

SINK_MARK = "__gadgetpipe_sink__"
"""Class attribute :func:`register_sink` sets; the registry collects classes carrying it."""

DROP_LOG_INTERVAL = 10.0
"""Seconds between two log lines about drops of one sink and reason (the ledger counts all)."""

DEFAULT_MAX_BATCH = 4096
"""Records one ``write`` may carry after coalescing queued batches."""


class SinkState(StrEnum):
    NEW = "new"
    RUNNING = "running"
    RETRYING = "retrying"  # the last attempt failed; backing off
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class SinkContext:
    """What a sink may know about the run it serves.

    Args:
        gadget: the gadget's name (``trace_exec``).
        instance: the run's ledger label (``instance:<name>``, or ``run-N`` for direct runs).
        instance_name: a human name for the instance (the label when it has none).
        node: this daemon's node name.
        schemas: the run's data sources after its operators.
        ledger: where the run's records are counted.
    """

    gadget: str
    instance: str
    instance_name: str
    node: str
    schemas: tuple[DataSourceSchema, ...]
    ledger: Ledger
    instance_id: str = ""
    """The instance's id (the label when the run has none)."""

    @property
    def id(self) -> str:
        return self.instance_id or self.instance


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter.

    Args:
        initial: first delay in seconds.
        maximum: cap on one delay.
        max_elapsed: seconds a batch may be retried before it is dropped and counted;
            0 retries until the sink stops (then the records wait in the bounded edge, and
            what does not fit is dropped there by its overflow policy).
        jitter: +/- fraction applied to each delay, so runs do not retry in lockstep.
    """

    initial: float = 0.2
    maximum: float = 5.0
    max_elapsed: float = 30.0
    jitter: float = 0.2

    def delay(self, attempt: int) -> float:
        base = min(self.maximum, self.initial * 2.0 ** (attempt - 1))
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)


def coalesce(batches: list[Batch]) -> Batch:
    """One batch holding the records of ``batches`` (same schema), in order."""
    # Batch.concat keeps derived payloads lazy: a sink that reads only raw fields never
    # computes them.
    return Batch.concat(batches)


class SinkRunner:
    """Feeds one sink from one edge: coalescing, retries, backoff, ledger, supervised task.

    Ledger stage ``sink:<name>`` (the edge's name): produced (offered to the edge) = delivered
    + dropped (reasons: queue_full, closed, send_failed, rejected, sink_error, shutdown) +
    still queued + in flight. Outcome ``retried`` counts records of failed attempts that were
    tried again; it is not a fate.

    Args:
        sink: the sink to feed.
        edge: its own edge of the run's fan-out.
        ledger: the run's ledger.
        instance: the ledger's instance label.
        retry: the backoff policy.
        max_batch: records one write may carry; queued batches of one schema are merged up to
            it, so a slow peer gets fewer, larger requests instead of falling behind.
        linger: seconds to wait for more records when a write would carry fewer than
            ``max_batch`` (0: send what is queued at once).
    """

    def __init__(self, sink: Sink, edge: Edge, ledger: Ledger, instance: str,
                 retry: RetryPolicy | None = None, max_batch: int = DEFAULT_MAX_BATCH,
                 linger: float = 0.0) -> None:
        self.sink = sink
        self.edge = edge
        self._ledger = ledger
        self._instance = instance
        self._retry = retry or RetryPolicy()
        self._max_batch = max(1, max_batch)
        self._linger = max(0.0, linger)
        self._task: asyncio.Task[None] | None = None
        self._held: Batch | None = None
        self._inflight = 0
        self._drop_log: dict[str, tuple[float, int]] = {}
        self.state = SinkState.NEW
        self.last_error: str | None = None
        self.errors = 0
        """Failed attempts, retried or not."""
        self.retries = 0
        """Attempts that were retries of an earlier failed one."""

    @property
    def stage(self) -> str:
        return self.edge.name

    @property
    def instance(self) -> str:
        return self._instance

    @property
    def inflight(self) -> int:
        """Records taken from the edge and not yet delivered or dropped."""
        return self._inflight + (len(self._held) if self._held is not None else 0)

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    async def start(self) -> None:
        await self.sink.start()
        self.state = SinkState.RUNNING
        self._task = asyncio.create_task(self._loop(), name=f"sink:{self.sink.name}")

    async def _next(self) -> Batch:
        """The next batch, merged with queued batches of the same schema up to max_batch."""
        if self._held is not None:
            first, self._held = self._held, None
        else:
            _, first = await self.edge.get()
        parts = [first]
        total = len(first)
        deadline = time.monotonic() + self._linger
        while total < self._max_batch:
            item = self.edge.get_nowait()
            if item is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.edge.closed:
                    break
                try:
                    # Cancelling a waiting get() is safe: it pops only once it has an item.
                    item = await asyncio.wait_for(self.edge.get(), remaining)
                except (TimeoutError, EdgeClosed):
                    break
            nxt = item[1]
            if nxt.schema is not first.schema or total + len(nxt) > self._max_batch:
                self._held = nxt
                break
            parts.append(nxt)
            total += len(nxt)
        return coalesce(parts)

    async def _loop(self) -> None:
        while True:
            try:
                batch = await self._next()
            except EdgeClosed:
                return
            # Left set when cancelled mid-delivery, so stop() can count those records.
            self._inflight = len(batch)
            await self._deliver(batch)
            self._inflight = 0

    def _drop(self, n: int, reason: str) -> None:
        self._ledger.dropped(self._instance, self.stage, n, reason)

    def _log_drop(self, n: int, reason: str, detail: str) -> None:
        """Logs drops at most every DROP_LOG_INTERVAL per reason, with the count since the
        last line: a peer down for an hour must not write a line per batch."""
        now = time.monotonic()
        last, pending = self._drop_log.get(reason, (0.0, 0))
        pending += n
        if now - last >= DROP_LOG_INTERVAL:
            _logger.error("sink %s of %s dropped %d records (%s) %s", self.sink.name,
                          self._instance, pending, reason, detail)
            self._drop_log[reason] = (now, 0)
        else:
            self._drop_log[reason] = (last, pending)

    async def _deliver(self, batch: Batch) -> None:
        n = len(batch)
        attempt = 0
        started = time.monotonic()
        while True:
            attempt += 1
            if attempt > 1:
                self.retries += 1
            try:
                refused = await self.sink.write(batch)
            except SinkError as e:
                self.errors += 1
                self.last_error = str(e)
                if not e.retryable:
                    self._drop(n, DROP_REJECTED)
                    self._log_drop(n, DROP_REJECTED, str(e))
                    self.state = SinkState.RUNNING
                    return
                elapsed = time.monotonic() - started
                if self._retry.max_elapsed and elapsed >= self._retry.max_elapsed:
                    self._drop(n, DROP_SEND_FAILED)
                    self._log_drop(n, DROP_SEND_FAILED,
                                   f"after {attempt} attempts in {elapsed:.1f}s: {e}")
                    self.state = SinkState.RUNNING
                    return
                self._ledger.add(self._instance, self.stage, OUTCOME_RETRIED, n)
                if self.state is not SinkState.RETRYING:
                    _logger.warning("sink %s: %s; retrying with backoff", self.sink.name, e)
                self.state = SinkState.RETRYING
                delay = self._retry.delay(attempt)
                if e.retry_after is not None:
                    delay = max(delay, e.retry_after)
                if self._retry.max_elapsed:
                    delay = min(delay, max(0.0, self._retry.max_elapsed - elapsed))
                await asyncio.sleep(delay)
                continue
            except Exception as e:  # a bug in a sink must not kill the run: count and go on
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                self._drop(n, DROP_SINK_ERROR)
                _logger.exception("sink %s failed", self.sink.name)
                return
            if self.state is SinkState.RETRYING:
                _logger.info("sink %s delivers again", self.sink.name)
            self.state = SinkState.RUNNING
            refused = min(max(0, int(refused or 0)), n)
            if refused:
                self._drop(refused, DROP_REJECTED)
            self.edge.delivered(n - refused)
            return

    async def stop(self, timeout: float = 5.0) -> None:
        """Closes the edge, lets the sink send what is queued within ``timeout``, then stops.

        What is still queued or in flight at the deadline is dropped as ``shutdown``.
        """
        deadline = time.monotonic() + timeout
        self.edge.close()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            if self._inflight:
                self._drop(self._inflight, DROP_SHUTDOWN)
                self._inflight = 0
        if self._held is not None:
            self._drop(len(self._held), DROP_SHUTDOWN)
            self._held = None
        self.edge.discard_pending(DROP_SHUTDOWN)
        remaining = max(0.1, deadline - time.monotonic())
        with contextlib.suppress(Exception):
            await self.sink.flush(remaining)
        try:
            await asyncio.wait_for(self.sink.stop(remaining), remaining + 1.0)
        except Exception as e:  # a sink that cannot close cleanly must not block the others
            _logger.warning("sink %s did not stop cleanly: %s", self.sink.name, e)
        self.state = SinkState.STOPPED


class SinkType(Protocol):
    """A registered kind of sink: everything the daemon and the config loader know of it.

    Its settings (as params, with validation), whether a run enables it, the problems of its
    settings that params cannot express, the peers its settings name and how to check that
    they are reachable, and how to build one for a run. Nothing outside the sink's own module
    knows a sink by name: adding a sink is adding one module (see :func:`register_sink`).
    """

    name: str
    prefix: str
    section: str
    """An instance-level YAML key that stands for ``sinks.<name>`` (``metrics``), or ""."""

    def params(self) -> tuple[ParamSpec, ...]: ...

    def enabled(self, values: Mapping[str, Any]) -> bool: ...

    def build(self, values: Mapping[str, Any], context: SinkContext) -> Sink: ...

    def edge_settings(self, values: Mapping[str, Any]) -> tuple[int, Overflow]: ...

    def retry_policy(self, values: Mapping[str, Any]) -> RetryPolicy: ...

    def check(self, values: Mapping[str, Any],
              schemas: tuple[DataSourceSchema, ...]) -> tuple[str, str] | None: ...

    def settings(self) -> dict[str, ParamSpec]: ...

    def key(self, setting: str) -> str: ...

    def endpoints(self, values: Mapping[str, Any]) -> tuple[Endpoint, ...]: ...

    def probe(self, endpoint: Endpoint, timeout: float) -> str | None: ...

    async def close(self) -> None: ...


SETTING = "setting"
"""``ParamSpec.extra`` key: the setting name of a sink param (``topic``)."""
LIST_SEPARATOR = "list_separator"
"""``ParamSpec.extra`` key: how a YAML list given for a sink setting is joined."""


def setting_of(param: ParamSpec) -> str:
    """The setting name of a sink param (``topic`` for ``operator.kafka.kafka-topic``)."""
    return str(param.extra.get(SETTING) or param.key)


def list_separator(param: ParamSpec) -> str:
    return str(param.extra.get(LIST_SEPARATOR) or ",")


KEY_ENABLE = "enable"
KEY_CAPACITY = "queue-capacity"
KEY_OVERFLOW = "overflow"
KEY_RETRY = "retry-timeout"
KEY_MAX_BATCH = "max-batch"


class SinkTypeBase:
    """Common params and plumbing for sink types; subclasses set ``name``, list their own
    settings in :meth:`own_params` (with :meth:`param`) and implement :meth:`build`.

    A setting ``topic`` of type ``kafka`` is the param ``operator.kafka.kafka-topic``: upstream
    clients make a flag of every param's key (``--kafka-topic``), so the key carries the sink's
    name, as upstream's own operators do (``operator.otel-logs.otel-logs-exporter``). The
    setting's former key ``operator.kafka.topic`` is still accepted (``ParamSpec.old_keys``).
    YAML ``sinks:`` sections and ``daemon.sinks`` name settings (``topic``).

    Every type gets the settings ``enable``, ``queue-capacity``, ``overflow``,
    ``retry-timeout`` and ``max-batch``. Values handed to :meth:`build` are the run's resolved
    params; :meth:`own` gives them by setting name.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    default_capacity: ClassVar[int] = 131072
    """Records a sink's queue holds by default: 0.1 s of a trace_open source at the
    kernel-side limit on the development machine (~1.2M records/s), so that a sink as fast as
    its source on average keeps every record through a stall of its own (a peer's round trip,
    a GC pause, a page-cache writeback, the GIL's 5 ms switch interval) and through a short
    burst. Queued records share their batches with the run's other consumers, and a record
    costs its row and its computed derived columns: at most ~57 MB for trace_open. 16384 (the
    former default) was 14 ms of that source: bench i dropped 95 % of a 600k burst."""
    default_overflow: ClassVar[Overflow] = Overflow.DROP_NEWEST
    default_retry_timeout: ClassVar[str] = "30s"
    default_max_batch: ClassVar[int] = DEFAULT_MAX_BATCH
    group: ClassVar[str] = "group:Sinks"
    section: ClassVar[str] = ""

    @property
    def prefix(self) -> str:
        return f"operator.{self.name}."

    def key(self, setting: str) -> str:
        """The full param key of a setting: ``operator.kafka.kafka-topic`` for ``topic``."""
        return f"{self.prefix}{self.name}-{setting}"

    def own_params(self) -> tuple[ParamSpec, ...]:
        return ()

    def param(self, setting: str, description: str, default: str = "",
              type_hint: str = "string", possible: tuple[str, ...] = (),
              advanced: bool = False, secret: bool = False,
              list_separator: str = ",") -> ParamSpec:
        """The param of a setting.

        Args:
            setting: its name in YAML (``topic``).
            secret: the value is a credential (see :mod:`pipeline.params`).
            list_separator: how a YAML list given for it is joined.
        """
        tags = (self.group, "advanced") if advanced else (self.group,)
        return ParamSpec(f"{self.name}-{setting}", self.prefix, description, default,
                         type_hint, possible_values=possible, tags=tags,
                         old_keys=(self.prefix + setting,), secret=secret,
                         extra={SETTING: setting, LIST_SEPARATOR: list_separator})

    def params(self) -> tuple[ParamSpec, ...]:
        common = (
            self.param(KEY_ENABLE, f"Send records to {self.description or self.name}",
                       "false", "bool"),
            self.param(KEY_CAPACITY, "Records that may wait for this sink before the overflow "
                       "policy applies", str(self.default_capacity), "uint32", advanced=True),
            self.param(KEY_OVERFLOW, "What a full queue does with new records",
                       str(self.default_overflow), "string",
                       tuple(str(o) for o in Overflow), advanced=True),
            self.param(KEY_RETRY, "How long a failed send is retried before its records are "
                       "dropped and counted (0: until the sink stops)",
                       self.default_retry_timeout, "duration", advanced=True),
            self.param(KEY_MAX_BATCH, "Records merged into one send at most",
                       str(self.default_max_batch), "uint32", advanced=True),
        )
        return common + self.own_params()

    def settings(self) -> dict[str, ParamSpec]:
        """The params by setting name (``topic``), as YAML names them."""
        return {setting_of(p): p for p in self.params()}

    def own(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The resolved values of this type's settings, by setting name."""
        out = {}
        for setting in self.settings():
            full = self.key(setting)
            if full in values:
                out[setting] = values[full]
        return out

    def enabled(self, values: Mapping[str, Any]) -> bool:
        return bool(values.get(self.key(KEY_ENABLE)))

    def edge_settings(self, values: Mapping[str, Any]) -> tuple[int, Overflow]:
        cap = values.get(self.key(KEY_CAPACITY)) or self.default_capacity
        over = values.get(self.key(KEY_OVERFLOW)) or self.default_overflow
        return max(1, int(cap)), Overflow(over)

    def retry_policy(self, values: Mapping[str, Any]) -> RetryPolicy:
        elapsed = values.get(self.key(KEY_RETRY))
        return RetryPolicy(max_elapsed=float(elapsed if elapsed is not None else 30.0))

    def max_batch(self, values: Mapping[str, Any]) -> int:
        return int(values.get(self.key(KEY_MAX_BATCH)) or self.default_max_batch)

    def linger(self, values: Mapping[str, Any]) -> float:
        """Seconds a send waits for more records (types with a ``linger`` setting)."""
        return float(values.get(self.key("linger")) or 0.0)

    def check(self, values: Mapping[str, Any],
              schemas: tuple[DataSourceSchema, ...]) -> tuple[str, str] | None:
        """The first problem of the settings that params alone cannot express, as (full
        param key, reason), or None. No side effects: no file, no connection, no metric."""
        return None

    def endpoints(self, values: Mapping[str, Any]) -> tuple[Endpoint, ...]:
        """The peers an enabled sink with these settings would connect to (none by
        default); ``gadgetpipe config check`` probes them."""
        return ()

    def probe(self, endpoint: Endpoint, timeout: float) -> str | None:
        """None if the endpoint looks reachable, else why not (by default: whether one of
        its addresses accepts a TCP connection). Blocking; called off the event loop."""
        return tcp_probe(endpoint, timeout)

    def build(self, values: Mapping[str, Any], context: SinkContext) -> Sink:
        raise NotImplementedError

    async def close(self) -> None:
        """Releases daemon-wide resources of this type (none by default)."""


_T = TypeVar("_T", bound=type)


def has_field(schemas: tuple[DataSourceSchema, ...], name: str) -> bool:
    """Whether any data source of a run has a field ``name``."""
    for s in schemas:
        try:
            s.field(name)
        except KeyError:
            continue
        return True
    return False


def register_sink(name: str) -> Callable[[_T], _T]:
    """Marks a sink-type class for discovery under ``name`` (also its param prefix).

    The mark is a class attribute, not an entry in a module-level table: the registry finds
    marked classes by importing the modules of ``pipeline/sinks``. A type declares its
    settings (:meth:`SinkTypeBase.own_params`), their checks (:meth:`SinkTypeBase.check`) and
    endpoints (:meth:`SinkTypeBase.endpoints`, :meth:`SinkTypeBase.probe`); the daemon, the
    config loader, its JSON Schema and ``config render`` take them from there.
    """

    def mark(cls: _T) -> _T:
        setattr(cls, SINK_MARK, True)
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return mark

