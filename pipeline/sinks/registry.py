"""The sink registry and manager: which kinds of sink exist, and attaching them to runs.

Kinds of sink are discovered, not listed: every module of ``pipeline/sinks`` is imported once
per manager and the classes marked with :func:`pipeline.sinks.base.register_sink` become its
types. A run enables a sink with params (``operator.kafka.enable=true`` …); daemon-wide
defaults (brokers, endpoints) become the params' defaults, so a run's own values override them
and clients see the effective defaults in GetGadgetInfo.

Each enabled sink gets its own edge of the run's fan-out (``sink:<name>``), its own runner and
its own bounded queue, so a slow or dead peer never stalls the run or another sink.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import pkgutil
import socket
import time
from collections.abc import Mapping
from dataclasses import replace
from types import ModuleType
from typing import Any, Protocol

from prometheus_client.registry import Collector

import pipeline.sinks as sinks_pkg
from pipeline.ledger import Ledger, sink_stage
from pipeline.params import ParamSpec
from pipeline.run import RunError, RunIdentity
from pipeline.sinks.base import SINK_MARK, SinkContext, SinkError, SinkRunner, SinkType

__all__ = ["AttachedSinks", "SinkManager", "discover_sink_types"]

_logger = logging.getLogger(__name__)

_NOT_SINK_MODULES = frozenset({"base", "registry", "encode", "endpoints"})

DEFAULT_CLOSE_DEADLINE = 5.0


class _Run(Protocol):
    """What the manager needs of a run (pipeline.run.GadgetRun)."""

    @property
    def instance(self) -> str: ...

    @property
    def identity(self) -> RunIdentity: ...

    @property
    def values(self) -> Mapping[str, Any]: ...

    @property
    def schemas(self) -> tuple[Any, ...]: ...

    def subscribe(self, name: str, capacity: int, overflow: Any) -> Any: ...

    def unsubscribe(self, edge: Any) -> None: ...


def discover_sink_types(package: ModuleType = sinks_pkg) -> dict[str, type]:
    """Sink-type classes of every module in a package (``pipeline/sinks``), by name."""
    found: dict[str, type] = {}
    for mod in pkgutil.iter_modules(package.__path__):
        if mod.name in _NOT_SINK_MODULES or mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{mod.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and getattr(cls, SINK_MARK, False):
                name = str(getattr(cls, "name", mod.name))
                if name in found:
                    raise RuntimeError(f"two sink types are named {name!r}: "
                                       f"{found[name].__module__} and {cls.__module__}")
                found[name] = cls
    return found


def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


class AttachedSinks:
    """The sinks of one run; :meth:`close` drains and stops them within a deadline."""

    def __init__(self, manager: SinkManager, run: _Run, runners: list[SinkRunner],
                 deadline: float) -> None:
        self._manager = manager
        self.run = run
        self.runners = runners
        self._deadline = deadline
        self._closed = False

    async def close(self, deadline: float | None = None) -> None:
        """Stops every sink of the run, concurrently, each within the deadline; what is still
        queued then is dropped and counted as ``shutdown``."""
        if self._closed:
            return
        self._closed = True
        timeout = self._deadline if deadline is None else deadline
        try:
            if self.runners:
                results = await asyncio.gather(*(r.stop(timeout) for r in self.runners),
                                               return_exceptions=True)
                for r, res in zip(self.runners, results, strict=True):
                    if isinstance(res, BaseException):
                        _logger.warning("sink %s of %s did not stop cleanly: %s", r.sink.name,
                                        r.instance, res)
        finally:
            self._manager._detached(self)


class SinkManager:
    """Knows the sink types, builds a run's sinks and tracks what is attached.

    Args:
        ledger: the daemon's loss ledger.
        defaults: daemon-wide settings per sink type, keyed by type name then by setting
            name, e.g. ``{"kafka": {"brokers": "10.0.0.1:9092"}}``.
        node: this daemon's node name (Kafka headers, OTLP host.name).
        close_deadline: how long a run's sinks may take to drain when it ends.
        types: the sink-type classes by name; default: those of ``pipeline/sinks``.
    """

    def __init__(self, ledger: Ledger, defaults: Mapping[str, Mapping[str, Any]] | None = None,
                 node: str | None = None, close_deadline: float = DEFAULT_CLOSE_DEADLINE,
                 types: Mapping[str, type] | None = None) -> None:
        self._ledger = ledger
        self._defaults = {k: dict(v) for k, v in (defaults or {}).items()}
        self.node = node or socket.gethostname()
        self._close_deadline = close_deadline
        self._types: dict[str, SinkType] = {}
        for name, cls in (discover_sink_types() if types is None else types).items():
            self._types[name] = cls()
        unknown = set(self._defaults) - set(self._types)
        if unknown:
            raise ValueError(f"sink settings for unknown sink types {sorted(unknown)}; "
                             f"known: {', '.join(sorted(self._types))}")
        self._params = self._build_params()
        self._attached: dict[int, AttachedSinks] = {}
        self._started = False

    def _build_params(self) -> list[ParamSpec]:
        out: list[ParamSpec] = []
        for name, t in sorted(self._types.items()):
            defaults = self._defaults.get(name, {})
            settings = t.settings()
            bad = set(defaults) - set(settings)
            if bad:
                raise ValueError(f"sink {name!r}: unknown settings {sorted(bad)}; known: "
                                 f"{', '.join(sorted(settings))}")
            for setting, p in settings.items():
                if setting in defaults:
                    p = replace(p, default=_default_text(defaults[setting]))
                    p.parse(p.default)  # a bad daemon default fails at start, not per run
                out.append(p)
        return out

    @property
    def types(self) -> Mapping[str, SinkType]:
        return self._types

    def params(self) -> list[ParamSpec]:
        """Every sink param, with daemon-wide defaults applied."""
        return list(self._params)

    def prefixes(self) -> list[str]:
        return [t.prefix for t in self._types.values()]

    def collectors(self) -> list[Collector]:
        """Prometheus collectors the sink types offer (gadget metrics)."""
        out: list[Collector] = []
        for t in self._types.values():
            fn = getattr(t, "collectors", None)
            if fn is not None:
                out.extend(fn())
        return out

    def attached(self) -> list[AttachedSinks]:
        return list(self._attached.values())

    async def start(self) -> None:
        self._started = True

    def check(self, values: Mapping[str, Any],
              schemas: tuple[Any, ...]) -> list[tuple[str, str]]:
        """Problems of the enabled sinks' settings that the params cannot express, as (param
        key, reason), without building anything (for validating a request or a config)."""
        out = []
        for _, t in sorted(self._types.items()):
            if t.enabled(values):
                problem = t.check(values, tuple(schemas))
                if problem is not None:
                    out.append(problem)
        return out

    async def attach(self, run: _Run) -> AttachedSinks:
        """Builds and starts a runner per enabled sink type of ``run``, each on its own edge.

        Raises:
            RunError: a sink's settings are invalid or it cannot start (nothing is left
                attached then).
        """
        values = run.values
        who = run.identity
        ctx = SinkContext(
            gadget=who.gadget,
            instance=who.label,
            instance_name=who.instance_name,
            instance_id=who.instance_id,
            node=self.node,
            schemas=tuple(run.schemas),
            ledger=self._ledger,
        )
        runners: list[SinkRunner] = []
        attached = AttachedSinks(self, run, runners, self._close_deadline)
        try:
            for name, t in sorted(self._types.items()):
                if not t.enabled(values):
                    continue
                try:
                    sink = t.build(values, ctx)
                except SinkError as e:
                    raise RunError(f"sink {name}: {e}") from e
                capacity, overflow = t.edge_settings(values)
                edge = run.subscribe(sink_stage(name), capacity, overflow)
                runner = SinkRunner(sink, edge, self._ledger, run.instance,
                                    t.retry_policy(values), _max_batch(t, values),
                                    _linger(t, values))
                runners.append(runner)
                try:
                    await runner.start()
                except Exception as e:
                    run.unsubscribe(edge)
                    runners.remove(runner)
                    raise RunError(f"sink {name} cannot start: {e}") from e
        except BaseException:
            await attached.close(1.0)
            raise
        self._attached[id(attached)] = attached
        return attached

    def _detached(self, attached: AttachedSinks) -> None:
        self._attached.pop(id(attached), None)

    async def stop(self, deadline: float | None = None) -> None:
        """Closes whatever is still attached, then releases the types' shared resources."""
        started = time.monotonic()
        timeout = self._close_deadline if deadline is None else deadline
        await asyncio.gather(*(a.close(timeout) for a in list(self._attached.values())),
                             return_exceptions=True)
        for t in self._types.values():
            try:
                await asyncio.wait_for(t.close(),
                                       max(0.1, timeout - (time.monotonic() - started)))
            except Exception as e:
                _logger.warning("sink type %s did not close cleanly: %s", t.name, e)
        self._started = False


def _max_batch(t: SinkType, values: Mapping[str, Any]) -> int:
    fn = getattr(t, "max_batch", None)
    return int(fn(values)) if fn is not None else 4096


def _linger(t: SinkType, values: Mapping[str, Any]) -> float:
    fn = getattr(t, "linger", None)
    return float(fn(values)) if fn is not None else 0.0
