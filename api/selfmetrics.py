"""The daemon's self-metrics: the ledger and the live runs as Prometheus metric families.

Nothing is counted twice: the hot path only increments the ledger (a dict per batch) and the
runners' integers; a ``Collector`` turns them into metric families when Prometheus scrapes
(:mod:`api.metrics_server` serves them, with the gadget metrics of the ``prometheus`` sink).

Families (labels in braces; ``gadget_instance`` rather than ``instance``, which Prometheus
sets on every scraped series itself):

- ``gadgetpipe_records_produced_total{gadget_instance,stage}``, ``…_delivered_total``,
  ``…_dropped_total{…,reason}``, ``…_retried_total``: the ledger, per stage
  (``source``, ``kernel``, ``filter``, ``grpc:<peer>``, ``sink:<name>``);
- ``gadgetpipe_kernel_lost_records_total{gadget_instance}``: ring-buffer losses (records shed
  on purpose are ``…_dropped_total{stage="kernel",reason="shed"}``);
- ``gadgetpipe_kernel_sample_rate{gadget_instance}``: load shedding's N (1: no sampling);
- ``gadgetpipe_queue_depth_records{gadget_instance,edge}`` and ``…_capacity_records``;
- ``gadgetpipe_sink_up{gadget_instance,sink}`` (0 while retrying),
  ``gadgetpipe_sink_errors_total``, ``gadgetpipe_sink_retries_total``,
  ``gadgetpipe_sink_inflight_records``;
- ``gadgetpipe_grpc_streams_open``, ``gadgetpipe_runs_active``,
  ``gadgetpipe_instances{status}`` (``Starting`` until it traces, ``Running``, ``Error``),
  ``gadgetpipe_build_info{version}``;
- ``gadgetpipe_compile_queue_waiting`` (runs waiting for their turn to compile) and
  ``gadgetpipe_compile_queue_runs_total{outcome}`` (``compiled``, ``abandoned``: the client
  left before its turn, ``refused``: past the queue's bounds), api/compile_queue.py;
- ``process_*`` of the daemon.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pipeline.ledger import (
    DELIVERED,
    DROPPED,
    GRPC_STAGE_PREFIX,
    PRODUCED,
    REASON_RINGBUF_FULL,
    STAGE_KERNEL,
    Ledger,
)
from pipeline.sinks.base import OUTCOME_RETRIED, SinkRunner, SinkState
from pipeline.version import VERSION

__all__ = ["SelfMetricsCollector"]

_logger = logging.getLogger(__name__)

_SANITIZE = re.compile(r"[^a-zA-Z0-9_]")


def _runs(ctx: Any) -> list[Any]:
    """Runs the daemon knows: those with sinks attached (every run gets an attachment) and
    the instance manager's, without duplicates."""
    seen: dict[int, Any] = {}
    sinks = getattr(ctx, "sinks", None)
    for a in (sinks.attached() if sinks is not None else ()):
        seen.setdefault(id(a.run), a.run)
    runs_fn = getattr(getattr(ctx, "instances", None), "runs", None)
    if callable(runs_fn):
        with contextlib.suppress(Exception):
            for r in runs_fn():
                seen.setdefault(id(r), r)
    return list(seen.values())


def _runners(ctx: Any) -> Iterable[SinkRunner]:
    sinks = getattr(ctx, "sinks", None)
    for a in (sinks.attached() if sinks is not None else ()):
        yield from a.runners


class SelfMetricsCollector(Collector):
    """The ledger and the live runs as metric families, built at scrape time.

    Args:
        ledger: the daemon's loss ledger.
        ctx: the service context (``sinks``, ``instances`` are read if present).
    """

    def __init__(self, ledger: Ledger, ctx: Any = None) -> None:
        self._ledger = ledger
        self._ctx = ctx

    def _ledger_families(self) -> Iterator[Metric]:
        produced = CounterMetricFamily("gadgetpipe_records_produced",
                                       "Records offered to a stage", labels=("gadget_instance",
                                                                            "stage"))
        delivered = CounterMetricFamily("gadgetpipe_records_delivered",
                                        "Records a stage handed on or delivered to its peer",
                                        labels=("gadget_instance", "stage"))
        dropped = CounterMetricFamily("gadgetpipe_records_dropped",
                                      "Records a stage dropped, by reason",
                                      labels=("gadget_instance", "stage", "reason"))
        retried = CounterMetricFamily("gadgetpipe_records_retried",
                                      "Records of failed sends that were tried again",
                                      labels=("gadget_instance", "stage"))
        kernel = CounterMetricFamily("gadgetpipe_kernel_lost_records",
                                     "Records the BPF ring buffer could not hold",
                                     labels=("gadget_instance",))
        others: dict[str, CounterMetricFamily] = {}
        for key, value in self._ledger.items():
            v = float(value)
            if key.outcome == PRODUCED:
                produced.add_metric((key.instance, key.stage), v)
            elif key.outcome == DELIVERED:
                delivered.add_metric((key.instance, key.stage), v)
            elif key.outcome == DROPPED:
                dropped.add_metric((key.instance, key.stage, key.reason), v)
                # Only ring losses: shed records (reason "shed") are dropped on purpose, and a
                # second sample with the same labels would make the exposition invalid.
                if key.stage == STAGE_KERNEL and key.reason == REASON_RINGBUF_FULL:
                    kernel.add_metric((key.instance,), v)
            elif key.outcome == OUTCOME_RETRIED:
                retried.add_metric((key.instance, key.stage), v)
            else:
                name = "gadgetpipe_records_" + _SANITIZE.sub("_", key.outcome)
                fam = others.get(name)
                if fam is None:
                    fam = others[name] = CounterMetricFamily(
                        name, f"Records with outcome {key.outcome}",
                        labels=("gadget_instance", "stage", "reason"))
                fam.add_metric((key.instance, key.stage, key.reason), v)
        yield from (produced, delivered, dropped, retried, kernel, *others.values())

    def _run_families(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("gadgetpipe_queue_depth_records",
                                  "Records waiting in an edge of a run's fan-out",
                                  labels=("gadget_instance", "edge"))
        capacity = GaugeMetricFamily("gadgetpipe_queue_capacity_records",
                                     "Capacity of an edge in records",
                                     labels=("gadget_instance", "edge"))
        sample_rate = GaugeMetricFamily("gadgetpipe_kernel_sample_rate",
                                        "Load shedding: the kernel keeps 1 record in this many "
                                        "(1: all)", labels=("gadget_instance",))
        streams = 0
        runs = _runs(self._ctx)
        for run in runs:
            rate = getattr(run, "sample_rate", None)
            if isinstance(rate, int):
                sample_rate.add_metric((str(run.instance),), float(rate))
            fanout = getattr(run, "fanout", None)
            for edge in (fanout.edges if fanout is not None else ()):
                labels = (str(run.instance), edge.name)
                depth.add_metric(labels, float(edge.depth))
                capacity.add_metric(labels, float(edge.capacity))
                if edge.name.startswith(GRPC_STAGE_PREFIX) and not edge.closed:
                    streams += 1
        yield depth
        yield capacity
        yield sample_rate
        yield GaugeMetricFamily("gadgetpipe_grpc_streams_open",
                                "gRPC streams receiving a run's records", value=float(streams))
        yield GaugeMetricFamily("gadgetpipe_runs_active", "Gadget runs in this daemon",
                                value=float(len(runs)))

    def _sink_families(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("gadgetpipe_sink_up",
                               "1 while a sink delivers, 0 while it retries or is stopped",
                               labels=("gadget_instance", "sink"))
        errors = CounterMetricFamily("gadgetpipe_sink_errors",
                                     "Failed send attempts of a sink",
                                     labels=("gadget_instance", "sink"))
        retries = CounterMetricFamily("gadgetpipe_sink_retries",
                                      "Send attempts that retried a failed one",
                                      labels=("gadget_instance", "sink"))
        inflight = GaugeMetricFamily("gadgetpipe_sink_inflight_records",
                                     "Records a sink has taken and not yet delivered",
                                     labels=("gadget_instance", "sink"))
        for r in _runners(self._ctx):
            labels = (r.instance, r.sink.name)
            up.add_metric(labels, 1.0 if r.state is SinkState.RUNNING else 0.0)
            errors.add_metric(labels, float(r.errors))
            retries.add_metric(labels, float(r.retries))
            inflight.add_metric(labels, float(r.inflight))
        yield from (up, errors, retries, inflight)

    def _instance_families(self) -> Iterator[Metric]:
        fam = GaugeMetricFamily("gadgetpipe_instances", "Gadget instances by status",
                                labels=("status",))
        list_states = getattr(getattr(self._ctx, "instances", None), "list_states", None)
        if callable(list_states):
            counts: dict[str, int] = {}
            try:
                for state in list_states():
                    # an InstanceStatus (``.status``) or an (id, name, gadget, status, message)
                    status = str(getattr(state, "status", None) or state[3])
                    counts[status] = counts.get(status, 0) + 1
            except Exception:  # a scrape must not fail because one part cannot answer
                _logger.exception("reading instance states for metrics")
            for status, n in sorted(counts.items()):
                fam.add_metric((status,), float(n))
        yield fam

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("gadgetpipe_build_info", "The daemon's version",
                                 labels=("version",))
        info.add_metric((VERSION,), 1.0)
        yield info
        yield from self._ledger_families()
        yield from self._run_families()
        yield from self._sink_families()
        yield from self._instance_families()
        yield from self._compile_queue_families()

    def _compile_queue_families(self) -> Iterator[Metric]:
        queue = getattr(self._ctx, "compile_queue", None)
        if queue is None:
            return
        yield GaugeMetricFamily("gadgetpipe_compile_queue_waiting",
                                "Runs waiting for their turn to compile their BPF programs",
                                value=float(queue.waiting))
        runs = CounterMetricFamily("gadgetpipe_compile_queue_runs",
                                   "Runs that entered the compile queue, by what became of them",
                                   labels=("outcome",))
        for outcome, n in sorted(queue.outcomes.items()):
            runs.add_metric((outcome,), float(n))
        yield runs
