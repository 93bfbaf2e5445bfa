"""The Kafka and OTLP sinks against a real Kafka broker and a real OpenTelemetry Collector,
fed by synthetic trace_exec batches (no kernel), including peer outages and the ledger.

One broker and one collector serve the whole module; the outage tests come last and restart
them in place (same ports, same data).
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer
from prometheus_client import CollectorRegistry

from api.selfmetrics import SelfMetricsCollector
from pipeline._gen import gadget_service_pb2 as pb
from pipeline.batch import Batch
from pipeline.gadget import GadgetSpec
from pipeline.ledger import Ledger
from pipeline.run import GadgetRun
from pipeline.sinks.registry import AttachedSinks, SinkManager
from pipeline.sources.catalog import Catalog
from tests.peers.kafka import KafkaBroker
from tests.peers.otelcol import KafkaReceiverConfig, LogRecord, OtelCollector

pytestmark = pytest.mark.peer

OTLP_TOPIC = f"gp-otlp-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def broker() -> Iterator[KafkaBroker]:
    b = KafkaBroker()
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="module")
def collector(broker: KafkaBroker) -> Iterator[OtelCollector]:
    c = OtelCollector(kafka=KafkaReceiverConfig([broker.bootstrap], OTLP_TOPIC))
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def spec() -> GadgetSpec:
    return Catalog().resolve("trace_exec")


def batch_of(spec: GadgetSpec, pids: range, comm: str) -> Batch:
    schema = spec.datasources[0]
    rows = np.zeros((len(pids), schema.record_size), dtype=np.uint8)
    f = {n: schema.field(n) for n in ("proc.comm", "proc.pid", "timestamp_raw", "file", "args",
                                      "args_count", "error_raw")}
    now = time.time_ns()
    for i, pid in enumerate(pids):
        rec = bytearray(schema.record_size)
        name = f"{comm}{pid % 3}".encode()
        rec[f["proc.comm"].offs: f["proc.comm"].offs + len(name)] = name
        struct.pack_into("<I", rec, f["proc.pid"].offs, pid)
        struct.pack_into("<Q", rec, f["timestamp_raw"].offs, now + pid)
        path = f"/usr/bin/{comm}".encode()
        rec[f["file"].offs: f["file"].offs + len(path)] = path
        args = f"{comm}\u00a0--n\u00a0{pid}".encode()
        rec[f["args"].offs: f["args"].offs + len(args)] = args
        struct.pack_into("<i", rec, f["args_count"].offs, 3)
        rows[i] = np.frombuffer(bytes(rec), dtype=np.uint8)
    return Batch(schema, rows)


@dataclass
class Synthetic:
    """A trace_exec run without a kernel: batches are published into its fan-out by hand."""

    run: GadgetRun
    sinks: AttachedSinks
    manager: SinkManager
    ledger: Ledger
    spec: GadgetSpec

    async def publish(self, pids: range, comm: str) -> None:
        await self.run.fanout.publish(batch_of(self.spec, pids, comm))

    async def close(self, deadline: float = 20.0) -> None:
        await self.run.stop()
        await self.sinks.close(deadline)
        await self.manager.stop()

    def ledger_of(self, sink: str) -> tuple[int, int, int]:
        stage = f"sink:{sink}"
        return (self.ledger.get(self.run.instance, stage, "produced"),
                self.ledger.get(self.run.instance, stage, "delivered"),
                self.ledger.get(self.run.instance, stage, "dropped"))


async def synthetic(spec: GadgetSpec, params: dict[str, str],
                    defaults: dict[str, dict[str, Any]] | None = None) -> Synthetic:
    ledger = Ledger()
    manager = SinkManager(ledger, defaults or {}, node="node-a")
    await manager.start()
    instance = f"inst-{uuid.uuid4().hex[:6]}"
    run = GadgetRun(spec, params, ledger, instance, manager.params(), manager.prefixes())
    attached = await manager.attach(run)
    return Synthetic(run, attached, manager, ledger, spec)


async def consume(bootstrap: str, topic: str, want: int, timeout: float = 30.0) -> list[Any]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    got: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for msgs in batch.values():
                got.extend(msgs)
        # anything beyond ``want`` would be a duplicate: read a little longer
        extra = await consumer.getmany(timeout_ms=500)
        for msgs in extra.values():
            got.extend(msgs)
    finally:
        await consumer.stop()
    return got


# --- Kafka ----------------------------------------------------------------------------------


async def test_kafka_json_messages_with_key_headers_and_time(broker: KafkaBroker,
                                                             spec: GadgetSpec) -> None:
    topic = f"gp-json-{uuid.uuid4().hex[:8]}"
    s = await synthetic(spec, {"operator.kafka.enable": "true", "operator.kafka.topic": topic,
                               "operator.kafka.key": "proc.comm"},
                        {"kafka": {"brokers": broker.bootstrap}})
    await s.publish(range(0, 5), "kjson")
    await s.publish(range(5, 12), "kjson")
    await s.close()
    assert s.ledger_of("kafka") == (12, 12, 0)
    msgs = await consume(broker.bootstrap, topic, 12)
    assert len(msgs) == 12
    objs = [json.loads(m.value) for m in msgs]
    assert [o["proc"]["pid"] for o in objs] == list(range(12))
    for m, o in zip(msgs, objs, strict=True):
        assert m.key == o["proc"]["comm"].encode()
        # args_count is json.skip, as upstream marks it
        assert o["file"] == "/usr/bin/kjson" and "args_count" not in o
        headers = dict(m.headers)
        assert headers["gadget"] == b"trace_exec" and headers["node"] == b"node-a"
        assert headers["instance"] == s.run.instance.encode()
        assert headers["datasource"] == b"exec"
        assert headers["content-type"] == b"application/json"
        assert m.timestamp == o["timestamp_raw"] // 1_000_000


@pytest.mark.parametrize("compression", ["gzip", "lz4", "zstd"])
async def test_kafka_protobuf_messages_are_gadget_data(broker: KafkaBroker, spec: GadgetSpec,
                                                       compression: str) -> None:
    topic = f"gp-pb-{compression}-{uuid.uuid4().hex[:8]}"
    s = await synthetic(spec, {"operator.kafka.enable": "true", "operator.kafka.topic": topic,
                               "operator.kafka.brokers": broker.bootstrap,
                               "operator.kafka.encoding": "protobuf",
                               "operator.kafka.compression": compression})
    sent = batch_of(spec, range(100, 110), "kpb")
    await s.run.fanout.publish(sent)
    await s.close()
    msgs = await consume(broker.bootstrap, topic, 10)
    assert [pb.GadgetData.FromString(m.value).data.payload[0] for m in msgs] == \
        [r.tobytes() for r in sent.rows]
    assert msgs[0].key is None
    assert s.ledger_of("kafka") == (10, 10, 0)


async def test_kafka_otlp_messages_are_read_by_the_collectors_kafka_receiver(
        broker: KafkaBroker, collector: OtelCollector, spec: GadgetSpec) -> None:
    comm = f"ko{uuid.uuid4().hex[:6]}"
    s = await synthetic(spec, {"operator.kafka.enable": "true",
                               "operator.kafka.topic": OTLP_TOPIC,
                               "operator.kafka.brokers": broker.bootstrap,
                               "operator.kafka.encoding": "otlp"})
    await s.publish(range(0, 50), comm)
    await s.close()
    assert s.ledger_of("kafka") == (50, 50, 0)
    recs = await asyncio.to_thread(collector.wait_for, lambda rs: len(
        [r for r in rs if str(r["attributes"].get("file", "")).endswith(comm)]) >= 50, 60)
    mine = [r for r in recs if str(r["attributes"].get("file", "")).endswith(comm)]
    assert sorted(r["attributes"]["proc.pid"] for r in mine) == list(range(50))
    assert mine[0]["resource"]["gadget.instance.id"] == s.run.instance


# --- OTLP -----------------------------------------------------------------------------------


def _mine(records: list[LogRecord], comm: str) -> list[LogRecord]:
    return [r for r in records if str(r["attributes"].get("proc.comm", "")).startswith(comm)]


@pytest.mark.parametrize(("protocol", "compression"), [("grpc", "none"), ("http", "gzip")])
async def test_otlp_logs_arrive_with_typed_attributes(collector: OtelCollector,
                                                      spec: GadgetSpec, protocol: str,
                                                      compression: str) -> None:
    comm = f"o{protocol[0]}{uuid.uuid4().hex[:6]}"
    endpoint = collector.grpc_endpoint if protocol == "grpc" else collector.http_logs_endpoint
    s = await synthetic(spec, {"operator.otel-logs.enable": "true",
                               "operator.otel-logs.endpoint": endpoint,
                               "operator.otel-logs.protocol": protocol,
                               "operator.otel-logs.compression": compression,
                               "operator.otel-logs.body": "file"})
    await s.publish(range(0, 20), comm)
    await s.publish(range(20, 25), comm)
    await s.close()
    assert s.ledger_of("otel-logs") == (25, 25, 0)
    recs = await asyncio.to_thread(collector.wait_for, lambda rs: len(_mine(rs, comm)) >= 25,
                                   60)
    mine = _mine(recs, comm)
    assert sorted(r["attributes"]["proc.pid"] for r in mine) == list(range(25))
    r = mine[0]
    assert r["body"] == f"/usr/bin/{comm}" and r["severity_number"] == 9
    assert r["severity_text"] == "INFO"
    assert r["time_unix_nano"] == r["attributes"]["timestamp_raw"]
    assert abs(r["time_unix_nano"] / 1e9 - time.time()) < 120
    assert isinstance(r["attributes"]["proc.pid"], int)
    assert isinstance(r["attributes"]["proc.comm"], str)
    assert r["attributes"]["args"] == f"{comm}\u00a0--n\u00a0{r['attributes']['proc.pid']}"
    assert r["resource"]["service.name"] == "gadgetpipe"
    assert r["resource"]["host.name"] == "node-a"
    assert r["resource"]["gadget.name"] == "trace_exec"
    assert r["resource"]["gadget.instance.id"] == s.run.instance
    assert r["scope_name"] == "trace_exec"


# --- outages (restart the module's peers: keep these last) ------------------------------------


def self_metrics(ledger: Ledger, manager: SinkManager) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)

    @dataclass
    class Ctx:
        sinks: SinkManager

    reg.register(SelfMetricsCollector(ledger, Ctx(manager)))
    return reg


async def test_kafka_broker_restart_mid_stream_loses_and_duplicates_nothing(
        broker: KafkaBroker, spec: GadgetSpec) -> None:
    topic = f"gp-outage-{uuid.uuid4().hex[:8]}"
    s = await synthetic(spec, {"operator.kafka.enable": "true", "operator.kafka.topic": topic,
                               "operator.kafka.brokers": broker.bootstrap,
                               "operator.kafka.key": "proc.comm",
                               "operator.kafka.timeout": "2s",
                               "operator.kafka.queue-capacity": "100000"})
    n, step = 3000, 20
    down = asyncio.create_task(asyncio.sleep(0))
    for start in range(0, n, step):
        await s.publish(range(start, start + step), "kout")
        if start == n // 3:
            # stop mid-stream: the broker goes down (SIGTERM) until the sink has retried, and
            # comes back on the same data
            down = asyncio.create_task(_bounce_after_a_retry(s, broker))
        await asyncio.sleep(0.004)
    await down
    await s.close(deadline=60)
    produced, delivered, dropped = s.ledger_of("kafka")
    print(f"kafka outage ledger: produced={produced} delivered={delivered} dropped={dropped} "
          f"retried={s.ledger.get(s.run.instance, 'sink:kafka', 'retried')}")
    assert (produced, delivered, dropped) == (n, n, 0)
    msgs = await consume(broker.bootstrap, topic, n, timeout=60)
    pids = [json.loads(m.value)["proc"]["pid"] for m in msgs]
    assert len(pids) == n and sorted(pids) == list(range(n))  # no loss, no duplicate
    by_key: dict[bytes, list[int]] = {}
    for m, p in zip(msgs, pids, strict=True):
        by_key.setdefault(m.key, []).append(p)
    assert all(v == sorted(v) for v in by_key.values())  # ordered per key


async def _bounce_after_a_retry(s: Any, broker: KafkaBroker) -> None:
    await asyncio.to_thread(broker.stop, True)
    try:
        deadline = time.monotonic() + 120
        while not s.ledger.get(s.run.instance, "sink:kafka", "retried"):
            assert time.monotonic() < deadline, "the Kafka sink never retried"
            await asyncio.sleep(0.05)  # polling the ledger
    finally:
        await asyncio.to_thread(broker.start)


async def test_kafka_down_with_a_tiny_queue_counts_every_drop(broker: KafkaBroker,
                                                              spec: GadgetSpec) -> None:
    await asyncio.to_thread(broker.stop, True)
    try:
        s = await synthetic(spec, {"operator.kafka.enable": "true",
                                   "operator.kafka.topic": f"gp-tiny-{uuid.uuid4().hex[:6]}",
                                   "operator.kafka.brokers": broker.bootstrap,
                                   "operator.kafka.timeout": "1s",
                                   "operator.kafka.queue-capacity": "50"})
        for start in range(0, 500, 10):
            await s.publish(range(start, start + 10), "ktiny")
            await asyncio.sleep(0.002)
        reg = self_metrics(s.ledger, s.manager)
        labels = {"gadget_instance": s.run.instance, "stage": "sink:kafka"}
        queue_full = reg.get_sample_value("gadgetpipe_records_dropped_total",
                                          {**labels, "reason": "queue_full"})
        assert queue_full is not None and queue_full >= 400
        assert reg.get_sample_value("gadgetpipe_sink_up", {
            "gadget_instance": s.run.instance, "sink": "kafka"}) == 0
        await s.close(deadline=2)
        produced, delivered, dropped = s.ledger_of("kafka")
        shutdown = s.ledger.get(s.run.instance, "sink:kafka", "dropped", "shutdown")
        print(f"kafka tiny-queue ledger: produced={produced} delivered={delivered} "
              f"dropped={dropped} (queue_full={int(queue_full)}, shutdown={shutdown})")
        assert produced == 500 and delivered == 0 and dropped == 500
        assert shutdown == 500 - queue_full
    finally:
        await asyncio.to_thread(broker.start)


async def test_collector_restart_mid_stream_is_ridden_out_by_retries(
        collector: OtelCollector, spec: GadgetSpec) -> None:
    comm = f"oo{uuid.uuid4().hex[:6]}"
    s = await synthetic(spec, {"operator.otel-logs.enable": "true",
                               "operator.otel-logs.endpoint": collector.grpc_endpoint,
                               "operator.otel-logs.timeout": "2s"})
    n, step = 1000, 10
    for start in range(0, 300, step):
        await s.publish(range(start, start + step), comm)
    # The outage is ordered by events, not by time: down, the rest published, a retry seen,
    # then up again; the sink must ride it out with every record delivered once.
    await asyncio.to_thread(collector.stop, True)
    for start in range(300, n, step):
        await s.publish(range(start, start + step), comm)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while s.ledger.get(s.run.instance, "sink:otel-logs", "retried") == 0:
        assert loop.time() < deadline, "the sink never retried while the Collector was down"
        await asyncio.sleep(0.05)  # polling the ledger
    await asyncio.to_thread(collector.start)
    await s.close(deadline=30)
    produced, delivered, dropped = s.ledger_of("otel-logs")
    retried = s.ledger.get(s.run.instance, "sink:otel-logs", "retried")
    print(f"otlp outage ledger: produced={produced} delivered={delivered} dropped={dropped} "
          f"retried={retried}")
    assert (produced, delivered, dropped) == (n, n, 0) and retried > 0
    recs = await asyncio.to_thread(collector.wait_for, lambda rs: len(_mine(rs, comm)) >= n,
                                   60)
    pids = [r["attributes"]["proc.pid"] for r in _mine(recs, comm)]
    # OTLP is at-least-once: a request the Collector took while going down may be retried
    assert set(pids) == set(range(n)), "records lost"
    assert len(pids) - n <= 2048, f"{len(pids) - n} duplicates: more than one request"


async def test_collector_down_past_the_retry_timeout_drops_and_counts(
        collector: OtelCollector, spec: GadgetSpec) -> None:
    await asyncio.to_thread(collector.stop, True)
    try:
        s = await synthetic(spec, {"operator.otel-logs.enable": "true",
                                   "operator.otel-logs.endpoint": collector.grpc_endpoint,
                                   "operator.otel-logs.protocol": "grpc",
                                   "operator.otel-logs.timeout": "500ms",
                                   "operator.otel-logs.retry-timeout": "1s",
                                   "operator.otel-logs.queue-capacity": "40",
                                   "operator.otel-logs.max-batch": "20"})
        for start in range(0, 300, 10):
            await s.publish(range(start, start + 10), "odown")
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)
        await s.close(deadline=3)
        produced, delivered, dropped = s.ledger_of("otel-logs")
        reasons = {r: s.ledger.get(s.run.instance, "sink:otel-logs", "dropped", r)
                   for r in ("queue_full", "send_failed", "shutdown")}
        print(f"otlp down ledger: produced={produced} delivered={delivered} dropped={dropped} "
              f"{reasons}")
        assert (produced, delivered, dropped) == (300, 0, 300)
        assert reasons["send_failed"] > 0 and reasons["queue_full"] > 0
        assert sum(reasons.values()) == 300
    finally:
        await asyncio.to_thread(collector.start)


@pytest.fixture(autouse=True)
async def _no_leaked_tasks() -> AsyncIterator[None]:
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() - before if not t.done()
              and t.get_name().startswith("sink:")]
    assert not leaked, leaked
