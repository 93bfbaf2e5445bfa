"""Proves each real peer class starts its peer, that the peer does its job, and cleans up."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import (
    OTLPLogExporter as GrpcLogExporter,
)
from opentelemetry.exporter.otlp.proto.http._log_exporter import (
    OTLPLogExporter as HttpLogExporter,
)
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, Counter, start_http_server

from tests.peers import PeerStartError, peer_paths
from tests.peers.kafka import KafkaBroker, metadata_brokers
from tests.peers.otelcol import KafkaReceiverConfig, LogRecord, OtelCollector, parse_log_records
from tests.peers.ports import free_port, free_ports
from tests.peers.prometheus import PrometheusQueryError, PrometheusServer

# --- Kafka ------------------------------------------------------------------------------------


async def produce(bootstrap: str, topic: str, values: Sequence[int]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                enable_idempotence=True, linger_ms=5)
    await producer.start()
    try:
        # One key: one partition, so consumption order must equal send order.
        acks = [await producer.send(topic, key=b"k", value=str(v).encode()) for v in values]
        await asyncio.gather(*acks)
    finally:
        await producer.stop()


async def consume(bootstrap: str, topic: str, group: str, count: int) -> list[int]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        got: list[int] = []
        while len(got) < count:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                got.extend(int(r.value) for r in records)
        await consumer.commit()
        return got
    finally:
        await consumer.stop()


@pytest.mark.peer
async def test_kafka_roundtrip_in_order_and_after_kill_restart() -> None:
    topic = "peers-test"
    with KafkaBroker() as broker:
        assert metadata_brokers("127.0.0.1", broker.port) == [(1, "127.0.0.1", broker.port)]
        # A dead broker makes idempotent sends block (retried forever), never fail.
        await asyncio.wait_for(produce(broker.bootstrap, topic, range(1000)), 60)
        got = await asyncio.wait_for(consume(broker.bootstrap, topic, "g1", 1000), 60)
        assert got == list(range(1000))

        broker.kill()
        assert not broker.running
        # Not via to_thread: no client is connected meanwhile, so blocking the loop is fine.
        broker.restart()
        assert broker.running and broker.data_dir.is_dir()

        await asyncio.wait_for(produce(broker.bootstrap, topic, range(1000, 2000)), 60)
        # The committed offset survived the kill: g1 gets only the new messages...
        got = await asyncio.wait_for(consume(broker.bootstrap, topic, "g1", 1000), 60)
        assert got == list(range(1000, 2000))
        # ...and the old ones are still there for a new group.
        got = await asyncio.wait_for(consume(broker.bootstrap, topic, "g2", 2000), 60)
        assert got == list(range(2000))
        workdir = broker.workdir
    assert not broker.running
    assert not workdir.exists()


@pytest.mark.peer
def test_kafka_start_failure_is_loud_and_cleans_up(tmp_path: Path) -> None:
    broker = KafkaBroker(properties={"log.retention.hours": "not-a-number"})
    with pytest.raises(PeerStartError) as err:
        broker.start()
    assert "log.retention.hours" in str(err.value)  # the log tail says what is wrong
    assert not broker.running
    assert not broker.workdir.exists()

    empty = KafkaBroker(lib_dir=tmp_path)
    with pytest.raises(PeerStartError, match="scripts/setup peers"):
        empty.start()
    assert not empty.workdir.exists()


# --- OpenTelemetry Collector --------------------------------------------------------------------


def send_logs(exporter: LogRecordExporter, run: str, transport: str, count: int) -> None:
    provider = LoggerProvider(resource=Resource.create(
        {"service.name": "gadgetpipe-peers-test", "transport": transport, "k8s.pod.uid": run}))
    provider.add_log_record_processor(BatchLogRecordProcessor(exporter, schedule_delay_millis=100))
    logger = provider.get_logger("tests.peers", "0.1")
    for i in range(count):
        logger.emit(body=f"{transport} #{i}", timestamp=1_700_000_000_000_000_000 + i,
                    severity_number=SeverityNumber.WARN, severity_text="WARN",
                    attributes={"run": run, "transport": transport, "seq": i,
                                "even": i % 2 == 0, "ratio": i / 4, "args": ["-c", str(i)]})
    # force_flush() returns True even when a batch was dropped: assert on the collector only.
    provider.force_flush()
    provider.shutdown()


@pytest.mark.peer
def test_collector_receives_otlp_logs_over_grpc_and_http() -> None:
    run = uuid.uuid4().hex
    with OtelCollector() as col:
        send_logs(GrpcLogExporter(endpoint=f"http://{col.grpc_endpoint}"), run, "grpc", 50)
        send_logs(HttpLogExporter(endpoint=col.http_logs_endpoint), run, "http", 50)

        def ours(records: list[LogRecord]) -> list[LogRecord]:
            return [r for r in records if r["attributes"].get("run") == run]

        records = ours(col.wait_for(lambda recs: len(ours(recs)) >= 100, timeout=15))
        workdir = col.workdir

    assert len(records) == 100
    for transport in ("grpc", "http"):
        mine = sorted((r for r in records if r["attributes"]["transport"] == transport),
                      key=lambda r: r["attributes"]["seq"])
        assert [r["attributes"]["seq"] for r in mine] == list(range(50))
        r = mine[7]
        assert r["body"] == f"{transport} #7"
        assert r["attributes"] == {"run": run, "transport": transport, "seq": 7, "even": False,
                                   "ratio": 1.75, "args": ["-c", "7"]}
        assert r["resource"]["transport"] == transport
        assert r["resource"]["service.name"] == "gadgetpipe-peers-test"
        assert r["scope_name"] == "tests.peers" and r["scope_version"] == "0.1"
        assert r["time_unix_nano"] == 1_700_000_000_000_000_007
        assert r["severity_number"] == SeverityNumber.WARN.value
        assert r["severity_text"] == "WARN"
    assert not workdir.exists()


@pytest.mark.peer
def test_collector_keeps_records_across_kill_and_restart() -> None:
    run = uuid.uuid4().hex
    with OtelCollector() as col:
        send_logs(HttpLogExporter(endpoint=col.http_logs_endpoint), run, "http", 10)
        col.wait_for(lambda recs: len(recs) >= 10)
        col.kill()
        col.restart()
        send_logs(GrpcLogExporter(endpoint=f"http://{col.grpc_endpoint}"), run, "grpc", 10)
        records = col.wait_for(lambda recs: len(recs) >= 20)
    assert sorted(r["body"] for r in records) == sorted(
        [f"http #{i}" for i in range(10)] + [f"grpc #{i}" for i in range(10)])


def _kv(key: str, value: str | int) -> KeyValue:
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


@pytest.mark.peer
async def test_collector_reads_otlp_logs_from_kafka() -> None:
    topic = "otlp_logs"
    run = uuid.uuid4().hex
    request = ExportLogsServiceRequest()
    rl = request.resource_logs.add()
    rl.resource.attributes.append(_kv("service.name", "gadgetpipe"))
    sl = rl.scope_logs.add()
    sl.scope.name = "gadgetpipe.kafka"
    for i in range(100):
        rec = sl.log_records.add()
        rec.time_unix_nano = 1_700_000_000_000_000_000 + i
        rec.body.string_value = f"exec #{i}"
        rec.attributes.extend([_kv("run", run), _kv("seq", i)])

    with KafkaBroker() as broker:
        # The topic exists before the receiver subscribes: no wait for its metadata refresh.
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        finally:
            await admin.close()
        kafka = KafkaReceiverConfig(brokers=[broker.bootstrap], topic=topic)
        with OtelCollector(kafka=kafka, otlp=False) as col:
            producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all",
                                        enable_idempotence=True)
            await producer.start()
            try:
                await asyncio.wait_for(
                    producer.send_and_wait(topic, request.SerializeToString()), 30)
            finally:
                await producer.stop()
            records = await asyncio.to_thread(
                col.wait_for, lambda recs: len(recs) >= 100, 30.0)

    assert sorted(r["attributes"]["seq"] for r in records) == list(range(100))
    assert {r["attributes"]["run"] for r in records} == {run}
    assert records[0]["resource"] == {"service.name": "gadgetpipe"}
    assert records[0]["scope_name"] == "gadgetpipe.kafka"


def test_parse_log_records_survives_torn_and_glued_lines() -> None:
    def request(body: str, pid: int) -> str:
        return json.dumps({"resourceLogs": [{
            "resource": {"attributes": [{"key": "host", "value": {"stringValue": "h"}}]},
            "scopeLogs": [{"scope": {"name": "s"}, "logRecords": [{
                "body": {"stringValue": body}, "severityNumber": 9,
                "attributes": [
                    {"key": "pid", "value": {"intValue": str(pid)}},
                    {"key": "ok", "value": {"boolValue": True}},
                    {"key": "nan", "value": {"doubleValue": "NaN"}},
                    {"key": "raw", "value": {"bytesValue": "AAE="}},
                    {"key": "kv", "value": {"kvlistValue": {"values": [
                        {"key": "a", "value": {"arrayValue": {"values": [
                            {"intValue": "1"}, {}]}}}]}}},
                ]}]}]}]}, separators=(",", ":"))

    first, second, third = request("a", 1), request("b", 2), request("c", 3)
    # A SIGKILL mid-write, then the next incarnation appending to the same line; a torn tail.
    text = f"{first}\n{second[:40]}{second}{third}\n{first[:-3]}"
    records = parse_log_records(text)
    assert [r["body"] for r in records] == ["a", "b", "c"]
    attrs = records[1]["attributes"]
    assert attrs["pid"] == 2 and attrs["ok"] is True and attrs["nan"] != attrs["nan"]
    assert attrs["raw"] == b"\x00\x01" and attrs["kv"] == {"a": [1, None]}
    assert records[0]["resource"] == {"host": "h"}
    assert records[0]["severity_number"] == 9 and records[0]["time_unix_nano"] == 0


# --- Prometheus ------------------------------------------------------------------------------


@pytest.mark.peer
def test_prometheus_scrapes_a_target_and_evaluates_rules(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    events = Counter("gp_peer_test_events", "Events seen by the peer test", ["kind"],
                     registry=registry)
    events.labels(kind="exec").inc(42)
    events.labels(kind="open").inc(3)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    rules = tmp_path / "rules.yml"
    rules.write_text(
        "groups:\n- name: peers\n  rules:\n"
        "  - record: gp:peer_test_events:sum\n    expr: sum(gp_peer_test_events_total)\n")
    try:
        with PrometheusServer([f"127.0.0.1:{port}"], rule_files=[rules]) as prom:
            result = prom.wait_for('gp_peer_test_events_total{kind="exec"}', timeout=20)
            assert len(result) == 1
            assert result[0]["metric"]["job"] == "gadgetpipe"
            assert result[0]["metric"]["instance"] == f"127.0.0.1:{port}"
            assert float(result[0]["value"][1]) == 42.0

            events.labels(kind="exec").inc(8)
            prom.wait_for('gp_peer_test_events_total{kind="exec"}',
                          lambda r: bool(r) and float(r[0]["value"][1]) == 50.0, timeout=20)
            prom.wait_for("gp:peer_test_events:sum",
                          lambda r: bool(r) and float(r[0]["value"][1]) == 53.0, timeout=20)
            assert prom.query_value("scalar(gp:peer_test_events:sum)") == 53.0
            assert prom.query_value("absent_series_xyz") is None
            health = prom.wait_scraped()
            assert [t["health"] for t in health] == ["up"]
            with pytest.raises(PrometheusQueryError, match="parse error"):
                prom.query("sum(")

            # Retargeting a running server: an unreachable target goes down.
            dead = free_ports(1)[0]
            prom.set_targets([f"127.0.0.1:{dead}"])
            prom.wait_for(f'up{{instance="127.0.0.1:{dead}"}} == 0', timeout=20)
            workdir = prom.workdir
        assert not workdir.exists()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.peer
def test_prometheus_refuses_a_bad_rule_file_loudly(tmp_path: Path) -> None:
    rules = tmp_path / "bad.yml"
    rules.write_text("groups:\n- name: bad\n  rules:\n  - record: x\n    expr: sum(\n")
    prom = PrometheusServer(rule_files=[rules])
    with pytest.raises(PeerStartError, match=r"exited with code \d+[\s\S]*bad\.yml"):
        prom.start()
    assert not prom.workdir.exists()


# --- paths and ports -------------------------------------------------------------------------


def test_peer_paths_without_peers_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The fixtures must find the set-up script's outputs even if peers.env is gone.
    real = peer_paths()
    (tmp_path / "kafka").mkdir()
    (tmp_path / "kafka" / "lib").symlink_to(real.kafka_lib)
    (tmp_path / "otelcol" / "0123456789abcdef").mkdir(parents=True)
    (tmp_path / "otelcol" / "0123456789abcdef" / "otelcol-gp").symlink_to(real.otelcol)
    monkeypatch.setenv("GADGETPIPE_CACHE", str(tmp_path))
    paths = peer_paths()
    assert paths.kafka_lib == tmp_path / "kafka" / "lib"
    assert paths.otelcol == tmp_path / "otelcol" / "0123456789abcdef" / "otelcol-gp"
    assert Path(paths.prometheus).name == "prometheus"
    assert Path(paths.promtool).name == "promtool"
    monkeypatch.setenv("GADGETPIPE_PROMETHEUS_BIN", "/opt/elsewhere/prometheus")
    assert peer_paths().prometheus == "/opt/elsewhere/prometheus"


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(20)
    assert len(set(ports)) == 20
    assert not set(ports) & set(free_ports(20))  # never handed out twice
    for port in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


@pytest.mark.peer
def test_peers_start_quickly_side_by_side() -> None:
    # Two of each at once: fresh ports and dirs mean no clashes (8888, 9090, ...).
    t0 = time.monotonic()
    with OtelCollector() as a, OtelCollector() as b, PrometheusServer() as p, \
            PrometheusServer() as q:
        assert len({a.grpc_port, a.http_port, b.grpc_port, b.http_port, p.port, q.port}) == 6
        assert a.last_start_seconds is not None and a.last_start_seconds < 5
        assert p.last_start_seconds is not None and p.last_start_seconds < 10
        assert p.query_value("vector(1)") == 1.0 and q.query_value("vector(2)") == 2.0
    assert time.monotonic() - t0 < 30
