"""Sink runners and the sink manager with the filesystem as the real peer (the jsonl sink):
delivery, retries, drops by policy, rotation, daemon-wide defaults, and the ledger adding up
(produced = delivered + dropped + queued) for every sink stage."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.batch import Batch
from pipeline.gadget import GadgetSpec
from pipeline.graph import Edge, Overflow
from pipeline.ledger import Ledger
from pipeline.run import GadgetRun, RunError
from pipeline.schema import DataSourceSchema
from pipeline.sinks.base import RetryPolicy, SinkRunner, SinkState, coalesce
from pipeline.sinks.jsonl import JsonlSink, RotatingFile
from pipeline.sinks.registry import SinkManager, discover_sink_types
from pipeline.sources.catalog import Catalog


@pytest.fixture(scope="module")
def spec() -> GadgetSpec:
    return Catalog().resolve("trace_exec")


def records(schema: DataSourceSchema, pids: range, comm: bytes = b"true") -> Batch:
    rows = np.zeros((len(pids), schema.record_size), dtype=np.uint8)
    c, p = schema.field("proc.comm"), schema.field("proc.pid")
    t = schema.field("timestamp_raw")
    for i, pid in enumerate(pids):
        rec = bytearray(schema.record_size)
        rec[c.offs: c.offs + len(comm)] = comm
        struct.pack_into("<I", rec, p.offs, pid)
        struct.pack_into("<Q", rec, t.offs, 1_700_000_000_000_000_000 + pid)
        rows[i] = np.frombuffer(bytes(rec), dtype=np.uint8)
    return Batch(schema, rows)


def balance(ledger: Ledger, instance: str, stage: str, queued: int = 0) -> tuple[int, int, int]:
    produced = ledger.get(instance, stage, "produced")
    delivered = ledger.get(instance, stage, "delivered")
    dropped = ledger.get(instance, stage, "dropped")
    assert produced == delivered + dropped + queued, (produced, delivered, dropped, queued)
    return produced, delivered, dropped


def pids_in(path: Path) -> list[int]:
    return [json.loads(line)["proc"]["pid"] for line in path.read_text().splitlines()]


def test_sink_types_are_discovered_from_the_package() -> None:
    assert {"jsonl", "kafka", "otel-logs", "prometheus"} <= set(discover_sink_types())


def test_daemon_defaults_become_param_defaults_and_are_checked() -> None:
    m = SinkManager(Ledger(), {"kafka": {"brokers": "10.0.0.1:9092", "enable": True}})
    by_key = {p.full_key: p for p in m.params()}
    assert by_key["operator.kafka.kafka-brokers"].default == "10.0.0.1:9092"
    assert by_key["operator.kafka.kafka-enable"].default == "true"
    assert set(m.prefixes()) >= {"operator.kafka.", "operator.otel-logs.",
                                 "operator.prometheus.", "operator.jsonl."}
    with pytest.raises(ValueError, match="unknown settings"):
        SinkManager(Ledger(), {"kafka": {"brokerz": "x"}})
    with pytest.raises(ValueError, match="unknown sink types"):
        SinkManager(Ledger(), {"nope": {}})
    with pytest.raises(ValueError):
        SinkManager(Ledger(), {"kafka": {"encoding": "xml"}})


async def test_manager_attaches_each_enabled_sink_on_its_own_edge(spec: GadgetSpec,
                                                                  tmp_path: Path) -> None:
    ledger = Ledger()
    default_path = tmp_path / "default.jsonl"
    m = SinkManager(ledger, {"jsonl": {"path": str(default_path)}}, node="n1")
    await m.start()
    run = GadgetRun(spec, {"operator.jsonl.enable": "true",
                           "operator.prometheus.counters": "by_comm:proc.comm"},
                    ledger, "i1", m.params(), m.prefixes())
    attached = await m.attach(run)
    assert sorted(e.name for e in run.fanout.edges) == ["sink:jsonl", "sink:prometheus"]
    assert m.attached() == [attached]
    # As the run's source would emit them, through the run's derived-fields step.
    schema = spec.datasources[0]
    await run.fanout.publish(run.derive.process(records(schema, range(0, 3))))
    await run.fanout.publish(run.derive.process(records(schema, range(3, 5))))
    await run.stop()
    await attached.close()
    assert pids_in(default_path) == [0, 1, 2, 3, 4]
    for stage in ("sink:jsonl", "sink:prometheus"):
        assert balance(ledger, "i1", stage) == (5, 5, 0)
    assert m.attached() == []
    # a run's own value overrides the daemon default
    own = tmp_path / "own.jsonl"
    run2 = GadgetRun(spec, {"operator.jsonl.enable": "true", "operator.jsonl.path": str(own)},
                     ledger, "i2", m.params(), m.prefixes())
    a2 = await m.attach(run2)
    await run2.fanout.publish(run2.derive.process(records(spec.datasources[0], range(7, 8))))
    await run2.stop()
    await a2.close()
    assert pids_in(own) == [7]
    await m.stop()


async def test_bad_sink_settings_fail_the_attach_and_leave_nothing(spec: GadgetSpec) -> None:
    m = SinkManager(Ledger())
    run = GadgetRun(spec, {"operator.jsonl.enable": "true", "operator.jsonl.path": "/dev/null",
                           "operator.prometheus.counters": "x:no.such.field"},
                    Ledger(), "i", m.params(), m.prefixes())
    with pytest.raises(RunError, match=r"no\.such\.field"):
        await m.attach(run)
    assert m.attached() == []
    assert all(e.closed for e in run.fanout.edges)
    run2 = GadgetRun(spec, {"operator.kafka.enable": "true", "operator.kafka.key": "nope"},
                     Ledger(), "i", m.params(), m.prefixes())
    with pytest.raises(RunError, match="key"):
        await m.attach(run2)


@pytest.fixture
def blocked_dir(tmp_path: Path) -> Iterator[Path]:
    """A path whose parent is a regular file: writing there fails until the file goes."""
    blocker = tmp_path / "later"
    blocker.write_text("not a directory")
    yield blocker / "out.jsonl"


async def test_failing_peer_is_retried_then_delivers_in_order(spec: GadgetSpec,
                                                              blocked_dir: Path) -> None:
    ledger = Ledger()
    schema = spec.datasources[0]
    edge = Edge("sink:jsonl", 100, Overflow.DROP_NEWEST, ledger, "i")
    runner = SinkRunner(JsonlSink(RotatingFile(str(blocked_dir), 0, 0), lambda f: f.close()),
                        edge, ledger, "i", RetryPolicy(initial=0.02, maximum=0.05,
                                                       max_elapsed=10))
    await runner.start()
    edge.put_nowait(records(schema, range(0, 4)))
    await asyncio.sleep(0.2)
    assert runner.state is SinkState.RETRYING and runner.errors >= 2
    assert ledger.get("i", "sink:jsonl", "retried") >= 4
    blocked_dir.parent.unlink()  # the peer comes back
    edge.put_nowait(records(schema, range(4, 6)))
    for _ in range(100):
        if ledger.get("i", "sink:jsonl", "delivered") == 6:
            break
        await asyncio.sleep(0.02)
    await runner.stop(2)
    assert runner.state.value == SinkState.STOPPED.value
    assert pids_in(blocked_dir) == [0, 1, 2, 3, 4, 5]
    assert balance(ledger, "i", "sink:jsonl") == (6, 6, 0)


async def test_peer_down_with_a_tiny_queue_drops_by_policy_and_the_ledger_balances(
        spec: GadgetSpec, blocked_dir: Path) -> None:
    ledger = Ledger()
    schema = spec.datasources[0]
    edge = Edge("sink:jsonl", 5, Overflow.DROP_NEWEST, ledger, "i")
    runner = SinkRunner(JsonlSink(RotatingFile(str(blocked_dir), 0, 0), lambda f: f.close()),
                        edge, ledger, "i", RetryPolicy(initial=0.01, maximum=0.02,
                                                       max_elapsed=0.3), max_batch=3)
    await runner.start()
    for start in range(0, 30, 3):
        edge.put_nowait(records(schema, range(start, start + 3)))
        await asyncio.sleep(0)
    produced, delivered, dropped = balance(ledger, "i", "sink:jsonl",
                                           edge.depth + runner.inflight)
    assert ledger.get("i", "sink:jsonl", "dropped", "queue_full") > 0
    await asyncio.sleep(0.8)  # the first batches give up (retry-timeout)
    assert ledger.get("i", "sink:jsonl", "dropped", "send_failed") >= 3
    await runner.stop(0.2)
    produced, delivered, dropped = balance(ledger, "i", "sink:jsonl")
    assert (produced, delivered) == (30, 0) and dropped == 30


async def test_stop_deadline_counts_what_is_left_as_shutdown(spec: GadgetSpec,
                                                             blocked_dir: Path) -> None:
    ledger = Ledger()
    edge = Edge("sink:jsonl", 100, Overflow.BLOCK, ledger, "i")
    runner = SinkRunner(JsonlSink(RotatingFile(str(blocked_dir), 0, 0), lambda f: f.close()),
                        edge, ledger, "i", RetryPolicy(initial=0.05, max_elapsed=0), max_batch=2)
    await runner.start()
    for k in range(4):
        await edge.put(records(spec.datasources[0], range(k * 2, k * 2 + 2)))
    await asyncio.sleep(0.1)
    await runner.stop(0.3)
    assert ledger.get("i", "sink:jsonl", "dropped", "shutdown") == 8
    assert balance(ledger, "i", "sink:jsonl") == (8, 0, 8)


async def test_rotation_keeps_the_configured_backups(spec: GadgetSpec, tmp_path: Path) -> None:
    out = RotatingFile(str(tmp_path / "r.jsonl"), 20_000, 2)
    sink = JsonlSink(out, lambda f: f.close())
    schema = spec.datasources[0]
    for k in range(10):
        await sink.write(records(schema, range(k * 20, k * 20 + 20)))
    await sink.stop(1)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["r.jsonl", "r.jsonl.1", "r.jsonl.2"]
    assert all(p.stat().st_size <= 20_000 for p in tmp_path.iterdir())
    got = [pid for name in ("r.jsonl.2", "r.jsonl.1", "r.jsonl")
           for pid in pids_in(tmp_path / name)]
    assert got == list(range(got[0], 200))  # the newest records, in order, none twice


async def test_linger_and_coalescing_merge_small_batches(spec: GadgetSpec,
                                                         tmp_path: Path) -> None:
    ledger = Ledger()
    schema = spec.datasources[0]
    assert len(coalesce([records(schema, range(2)), records(schema, range(2, 5))])) == 5
    edge = Edge("sink:jsonl", 1000, Overflow.BLOCK, ledger, "i")
    writes: list[int] = []

    class Counting(JsonlSink):
        async def write(self, batch: Batch) -> int:
            writes.append(len(batch))
            return await super().write(batch)

    runner = SinkRunner(Counting(RotatingFile(str(tmp_path / "c.jsonl"), 0, 0),
                                 lambda f: f.close()), edge, ledger, "i", max_batch=50,
                        linger=0.2)
    await runner.start()
    for k in range(10):
        edge.put_nowait(records(schema, range(k, k + 1)))
        await asyncio.sleep(0.005)
    await runner.stop(2)
    assert sum(writes) == 10 and len(writes) <= 2
    assert pids_in(tmp_path / "c.jsonl") == list(range(10))


def test_check_reports_settings_problems_without_building(spec: GadgetSpec) -> None:
    m = SinkManager(Ledger())
    run = GadgetRun(spec, {"operator.kafka.enable": "true", "operator.kafka.key": "nope",
                           "operator.otel-logs.enable": "true",
                           "operator.otel-logs.headers": "novalue",
                           "operator.prometheus.histograms": "h:proc.comm:1,2"},
                    Ledger(), "i", m.params(), m.prefixes())
    problems = dict(m.check(run.values, run.schemas))
    assert "no data source has a field 'nope'" in problems["operator.kafka.kafka-key"]
    assert "key=value" in problems["operator.otel-logs.otel-logs-headers"]
    assert "not numeric" in problems["operator.prometheus.prometheus-histograms"]
    ok = GadgetRun(spec, {"operator.kafka.enable": "true", "operator.kafka.key": "proc.comm",
                          "operator.prometheus.counters": "c:proc.comm"},
                   Ledger(), "i", m.params(), m.prefixes())
    assert m.check(ok.values, ok.schemas) == []
    assert m.attached() == []
