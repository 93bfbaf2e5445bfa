"""Gadget metrics: declarations, per-batch counting, histograms and the cardinality cap, read
back through a Collector on a fresh registry."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from pipeline.batch import Batch
from pipeline.layout import StructRegistry
from pipeline.schema import DataSourceSchema, DataSourceType
from pipeline.sinks.prometheus import (
    OVERFLOW_LABEL,
    CounterSpec,
    GadgetMetricsCollector,
    GadgetMetricsStore,
    HistogramSpec,
    MetricSpecError,
    parse_buckets,
    parse_counters,
    parse_histograms,
    unique_rows,
)

REG = StructRegistry(structs={
    "ev": ["char comm[16]", "u32 uid", "u64 size", "s32 err", "bool ok"],
})


def schema() -> DataSourceSchema:
    fields, size = REG.fields("ev")
    return DataSourceSchema("ev", DataSourceType.SINGLE, tuple(fields), size)


def make(rows: list[tuple[bytes, int, int, int]]) -> Batch:
    s = schema()
    out = np.zeros((len(rows), s.record_size), dtype=np.uint8)
    for i, (comm, uid, size, err) in enumerate(rows):
        rec = bytearray(s.record_size)
        # a different stale tail after the NUL each time: equal comms must still count as one
        rec[0:16] = (comm + b"\0" + bytes([i % 251 + 1]) * 16)[:16]
        rec[16:20] = uid.to_bytes(4, "little")
        rec[24:32] = size.to_bytes(8, "little")
        rec[32:36] = err.to_bytes(4, "little", signed=True)
        out[i] = np.frombuffer(bytes(rec), dtype=np.uint8)
    return Batch(s, out)


def registry(store: GadgetMetricsStore) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(GadgetMetricsCollector(store))
    return reg


BASE = {"gadget": "g", "gadget_instance": "i1", "gadget_instance_id": "i1",
        "gadget_instance_name": "i1", "datasource": "ev"}


def test_parse_declarations() -> None:
    assert parse_counters("a:proc.comm; b:x,y ;c") == [
        CounterSpec("a", ("proc.comm",)), CounterSpec("b", ("x", "y")), CounterSpec("c")]
    h = parse_histograms("lat:ns:exp(1,2,4):proc.comm;sz:size:1,10,100")
    assert h == [HistogramSpec("lat", "ns", (1.0, 2.0, 4.0, 8.0), ("proc.comm",)),
                 HistogramSpec("sz", "size", (1.0, 10.0, 100.0))]
    assert parse_buckets("lin(0,5,3)") == (0.0, 5.0, 10.0)
    for bad in ("1-bad:x", "a b"):
        with pytest.raises(MetricSpecError, match="metric name"):
            parse_counters(bad)
    for bad in ("h:x:3,2", "h:x:", "h:x:exp(0,2,3)", "h:x", "h:x:1,inf"):
        with pytest.raises(MetricSpecError):
            parse_histograms(bad)


def test_counters_by_label_and_total() -> None:
    store = GadgetMetricsStore()
    run = store.build("g", "i1", [schema()], parse_counters("by_comm:comm;by_both:comm,uid;all"),
                      [], 100)
    store.add(run)
    run.count(make([(b"bash", 0, 1, 0), (b"ls", 1000, 1, 0), (b"bash", 0, 1, 0)]))
    run.count(make([(b"bash", 1000, 1, 0)]))
    reg = registry(store)
    get = reg.get_sample_value
    assert get("gadgetpipe_gadget_by_comm_total", {**BASE, "comm": "bash"}) == 3
    assert get("gadgetpipe_gadget_by_comm_total", {**BASE, "comm": "ls"}) == 1
    assert get("gadgetpipe_gadget_by_both_total", {**BASE, "comm": "bash", "uid": "1000"}) == 1
    assert get("gadgetpipe_gadget_by_both_total", {**BASE, "comm": "bash", "uid": "0"}) == 2
    assert get("gadgetpipe_gadget_all_total", BASE) == 4
    assert get("gadgetpipe_metric_series", {**BASE, "metric": "gadgetpipe_gadget_by_comm"}) == 2
    assert b"# TYPE gadgetpipe_gadget_by_comm_total counter" in generate_latest(reg)


def test_cardinality_cap_counts_the_rest_in_an_overflow_series() -> None:
    store = GadgetMetricsStore()
    run = store.build("g", "i1", [schema()], parse_counters("by_uid:uid"), [], 3)
    store.add(run)
    run.count(make([(b"a", u, 0, 0) for u in (1, 2, 3, 4, 5, 5, 1)]))
    run.count(make([(b"a", 6, 0, 0), (b"a", 2, 0, 0)]))
    get = registry(store).get_sample_value
    assert [get("gadgetpipe_gadget_by_uid_total", {**BASE, "uid": str(u)}) for u in (1, 2, 3)] \
        == [2, 2, 1]
    assert get("gadgetpipe_gadget_by_uid_total", {**BASE, "uid": "4"}) is None
    assert get("gadgetpipe_gadget_by_uid_total", {**BASE, "uid": OVERFLOW_LABEL}) == 4
    meta = {**BASE, "metric": "gadgetpipe_gadget_by_uid"}
    assert get("gadgetpipe_metric_series_refused_total", meta) == 4
    assert get("gadgetpipe_metric_series", meta) == 4  # the cap plus the overflow series


def test_histograms_bucket_cumulatively_with_sum_and_count() -> None:
    store = GadgetMetricsStore()
    run = store.build("g", "i1", [schema()], [], parse_histograms(
        "size:size:10,100,1000;err_by_comm:err:-1,0:comm"), 10)
    store.add(run)
    run.count(make([(b"a", 0, s, -2) for s in (5, 10, 11, 100, 5000)]))
    run.count(make([(b"b", 0, 1000, 0)]))
    get = registry(store).get_sample_value
    buckets = [get("gadgetpipe_gadget_size_bucket", {**BASE, "le": le})
               for le in ("10.0", "100.0", "1000.0", "+Inf")]
    assert buckets == [2, 4, 5, 6]
    assert get("gadgetpipe_gadget_size_count", BASE) == 6
    assert get("gadgetpipe_gadget_size_sum", BASE) == 5 + 10 + 11 + 100 + 5000 + 1000
    lab = {**BASE, "comm": "a"}
    assert get("gadgetpipe_gadget_err_by_comm_bucket", {**lab, "le": "-1.0"}) == 5
    assert get("gadgetpipe_gadget_err_by_comm_sum", lab) == -10
    assert get("gadgetpipe_gadget_err_by_comm_bucket", {**BASE, "comm": "b", "le": "-1.0"}) == 0
    assert get("gadgetpipe_gadget_err_by_comm_bucket", {**BASE, "comm": "b", "le": "0.0"}) == 1


def test_unknown_fields_and_clashing_kinds_are_refused() -> None:
    store = GadgetMetricsStore()
    with pytest.raises(MetricSpecError, match="no data source has the fields"):
        store.build("g", "i", [schema()], parse_counters("x:nope"), [], 10)
    with pytest.raises(MetricSpecError, match="not numeric"):
        store.build("g", "i", [schema()], [], parse_histograms("h:comm:1,2"), 10)
    store.add(store.build("g", "i1", [schema()], parse_counters("m:comm"), [], 10))
    with pytest.raises(MetricSpecError, match="is a counter"):
        store.build("g", "i2", [schema()], [], parse_histograms("m:size:1"), 10)


def test_a_retired_run_disappears_after_its_grace_period() -> None:
    store = GadgetMetricsStore()
    run = store.build("g", "i1", [schema()], parse_counters("all"), [], 10)
    store.add(run)
    run.count(make([(b"a", 0, 0, 0)]))
    store.retire("i1", 60)
    assert registry(store).get_sample_value("gadgetpipe_gadget_all_total", BASE) == 1
    store.retire("i1", 0)
    assert registry(store).get_sample_value("gadgetpipe_gadget_all_total", BASE) is None


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.lists(st.integers(0, 3), min_size=0, max_size=60),
       st.integers(0, 2))
def test_unique_rows_matches_numpy(width: int, picks: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 3, size=(4, width), dtype=np.uint8)
    mat = palette[picks] if picks else np.zeros((0, width), dtype=np.uint8)
    keys, inverse = unique_rows(mat)
    want = np.unique(mat, axis=0) if len(mat) else mat
    assert sorted(map(bytes, keys)) == sorted(map(bytes, want))
    assert len({bytes(k) for k in keys}) == len(keys)
    assert (keys[inverse] == mat).all()


def test_one_process_batches_count_as_one_label_set() -> None:
    store = GadgetMetricsStore()
    run = store.build("g", "i1", [schema()], parse_counters("by_comm:comm;by_both:comm,uid"),
                      [], 100)
    store.add(run)
    run.count(make([(b"bash", 7, 1, 0)] * 5))  # the stale tails differ, the labels do not
    run.count(make([(b"bash", 7, 1, 0), (b"bas", 7, 1, 0), (b"bash", 8, 1, 0)]))
    run.count(make([(b"x" * 16, 7, 1, 0)] * 3))  # no NUL: all 16 bytes are the name
    get = registry(store).get_sample_value
    assert get("gadgetpipe_gadget_by_comm_total", {**BASE, "comm": "bash"}) == 7
    assert get("gadgetpipe_gadget_by_comm_total", {**BASE, "comm": "bas"}) == 1
    assert get("gadgetpipe_gadget_by_comm_total", {**BASE, "comm": "x" * 16}) == 3
    assert get("gadgetpipe_gadget_by_both_total", {**BASE, "comm": "bash", "uid": "7"}) == 6
    assert get("gadgetpipe_gadget_by_both_total", {**BASE, "comm": "bash", "uid": "8"}) == 1
