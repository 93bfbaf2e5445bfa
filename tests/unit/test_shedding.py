"""Load shedding without a kernel: the controller's steps, its params, and how shed records
appear on /metrics next to ring losses."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from api.selfmetrics import SelfMetricsCollector
from pipeline.graph import Edge, Overflow
from pipeline.ledger import Ledger
from pipeline.run import GadgetRun, RunError, ShedController, queue_fill
from pipeline.sources.catalog import Catalog


def test_rate_doubles_above_high_halves_below_low_within_bounds() -> None:
    ctl = ShedController(high=0.75, low=0.25, max_rate=8)
    fills = (0.5, 0.8, 0.9, 1.0, 1.0, 0.5, 0.1, 0.1, 0.1, 0.0)
    assert [ctl.step(f) for f in fills] == [1, 2, 4, 8, 8, 8, 4, 2, 1, 1]


def test_the_fullest_open_queue_decides() -> None:
    ledger = Ledger()
    a = Edge("grpc:a", 100, Overflow.DROP_NEWEST, ledger, "run-1")
    b = Edge("sink:kafka", 10, Overflow.BLOCK, ledger, "run-1")
    a._depth, b._depth = 50, 9
    assert queue_fill([a, b]) == (0.9, "sink:kafka")
    b.close()  # a consumer that went away no longer counts
    assert queue_fill([a, b]) == (0.5, "grpc:a")
    assert queue_fill([]) == (0.0, "")


def test_params_off_by_default_and_thresholds_checked() -> None:
    spec = Catalog().resolve("trace_exec")
    assert GadgetRun(spec, {}, Ledger(), "r").sample_rate == 1
    assert ShedController.from_values(GadgetRun(spec, {}, Ledger(), "r").values) is None
    ctl = ShedController.from_values(GadgetRun(spec, {"operator.bcc.shed": "true",
                                                      "operator.bcc.shed-max": "64"},
                                               Ledger(), "r").values)
    assert ctl == ShedController(0.75, 0.25, 64)
    for bad, key in (({"operator.bcc.shed-low": "75"}, "shed-low"),
                     ({"operator.bcc.shed-high": "0"}, "shed-high"),
                     ({"operator.bcc.shed-max": "0"}, "shed-max")):
        with pytest.raises(RunError, match=key):
            GadgetRun(spec, {"operator.bcc.shed": "true", **bad}, Ledger(), "r")


def test_shed_and_ring_losses_are_separate_series() -> None:
    """Two kernel drop reasons must not make two samples of the ring-loss family (an invalid
    exposition Prometheus would refuse)."""
    ledger = Ledger()
    ledger.produced("run-1", "kernel", 7)
    ledger.dropped("run-1", "kernel", 5, "ringbuf_full")
    ledger.dropped("run-1", "kernel", 2, "shed")
    run = SimpleNamespace(instance="run-1", sample_rate=16, fanout=SimpleNamespace(edges=()))
    ctx = SimpleNamespace(sinks=None, instances=SimpleNamespace(runs=lambda: [run]))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SelfMetricsCollector(ledger, ctx))
    text = generate_latest(registry).decode()
    samples = [(s.name, tuple(sorted(s.labels.items())), s.value)
               for f in text_string_to_metric_families(text) for s in f.samples]
    assert len(samples) == len(set((n, ls) for n, ls, _ in samples)), "duplicate samples"
    get = registry.get_sample_value
    assert get("gadgetpipe_kernel_lost_records_total", {"gadget_instance": "run-1"}) == 5
    assert get("gadgetpipe_records_dropped_total", {"gadget_instance": "run-1",
                                                    "stage": "kernel", "reason": "shed"}) == 2
    assert get("gadgetpipe_kernel_sample_rate", {"gadget_instance": "run-1"}) == 16
