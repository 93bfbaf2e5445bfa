"""Every sink end to end: the real daemon runs trace_exec on the real kernel, a uniquely named
binary is executed, and its records must arrive in Kafka (JSON and protobuf, key, headers),
the OpenTelemetry Collector (typed attributes), Prometheus (which scrapes the daemon every
second: gadget counters, histograms and self-metrics) and a JSON-lines file. Then the peers
fail under a live run and the daemon's own metrics must account for every record.

One broker, collector, Prometheus and daemon serve the module; outage tests come last.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from prometheus_client.parser import text_string_to_metric_families

from pipeline._gen import gadget_service_pb2 as pb
from tests.daemon import DaemonProcess
from tests.e2e.helpers import Drain, keep_running, unique_binary
from tests.peers import peer_paths
from tests.peers.kafka import KafkaBroker
from tests.peers.otelcol import OtelCollector
from tests.peers.ports import free_port
from tests.peers.prometheus import PrometheusServer

pytestmark = [pytest.mark.peer, pytest.mark.bpf]

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "config" / "alerts.yaml"


@dataclass
class Env:
    daemon: DaemonProcess
    metrics_url: str
    broker: KafkaBroker
    collector: OtelCollector
    prometheus: PrometheusServer


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    port = free_port()
    with KafkaBroker() as broker, OtelCollector() as collector, \
            DaemonProcess("--metrics-listen", f"127.0.0.1:{port}") as daemon, \
            PrometheusServer([f"127.0.0.1:{port}"], rule_files=[ALERTS]) as prom:
        yield Env(daemon, f"http://127.0.0.1:{port}/metrics", broker, collector, prom)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """Samples of the daemon's /metrics: {(name, frozenset(labels)): value}."""
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def run_instance(samples: Samples, stage_prefix: str = "sink:") -> set[str]:
    """Direct runs (``run-N``; the daemon may also run instances of its own config)."""
    return {dict(ls)["gadget_instance"] for (n, ls), _ in samples.items()
            if n == "gadgetpipe_records_produced_total"
            and dict(ls).get("stage", "").startswith(stage_prefix)
            and dict(ls)["gadget_instance"].startswith("run-")}


async def consume(bootstrap: str, topic: str, want: int, timeout: float = 30.0) -> list[Any]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    got: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                got.extend(msgs)
        for msgs in (await consumer.getmany(timeout_ms=500)).values():
            got.extend(msgs)
    finally:
        await consumer.stop()
    return got


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_alert_rules_pass_promtool_and_load_into_prometheus(env: Env) -> None:
    done = subprocess.run([peer_paths().promtool, "check", "rules", str(ALERTS)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    groups = env.prometheus._api("/api/v1/rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) >= 8 and all(r["health"] != "err" for r in rules), rules


def test_one_exec_reaches_every_sink(env: Env, tmp_path: Path) -> None:
    binary = unique_binary(tmp_path)
    comm = binary.name[:15]
    topic = f"gp.e2e.{comm}"
    out = tmp_path / "events.jsonl"
    params = {
        "operator.oci.ebpf.comm": comm,
        "operator.kafka.enable": "true", "operator.kafka.brokers": env.broker.bootstrap,
        "operator.kafka.topic": "gp.e2e.{gadget}." + comm, "operator.kafka.key": "proc.comm",
        "operator.otel-logs.enable": "true",
        "operator.otel-logs.endpoint": env.collector.grpc_endpoint,
        # metric names of this test alone: the daemon's own instances may count execs too
        "operator.prometheus.counters": f"exec_by_comm_{comm}:proc.comm",
        "operator.prometheus.histograms": f"exec_args_{comm}:args_count:1,2,4,8:proc.comm",
        "operator.jsonl.enable": "true", "operator.jsonl.path": str(out),
    }
    topic = f"gp.e2e.trace_exec.{comm}"
    prom = env.prometheus
    with env.daemon.client() as c:
        drain = Drain(c.run("trace_exec", params))
        assert drain.ready.wait(120), "not tracing"
        with keep_running([str(binary), "one", "two"]):
            got = prom.wait_for(f'gadgetpipe_gadget_exec_by_comm_{comm}_total{{comm="{comm}"}}',
                                lambda r: bool(r) and float(r[0]["value"][1]) >= 3, 60)
        assert got[0]["metric"]["gadget"] == "trace_exec"
        assert got[0]["metric"]["datasource"] == "exec"
        instance = got[0]["metric"]["gadget_instance"]
        # histogram: every exec had 3 arguments (binary, one, two)
        buckets = prom.wait_for(f'gadgetpipe_gadget_exec_args_{comm}_bucket{{comm="{comm}"}}',
                                lambda r: len(r) == 5, 30)
        le = {b["metric"]["le"]: float(b["value"][1]) for b in buckets}
        assert le["2.0"] == 0 and le["4.0"] == le["+Inf"] >= 3
        # self-metrics of the same run, as Prometheus scraped them
        delivered = prom.wait_for(
            f'gadgetpipe_records_delivered_total{{gadget_instance="{instance}",'
            'stage=~"sink:.+"}', lambda r: len(r) == 4, 30)
        assert {r["metric"]["stage"] for r in delivered} == {
            "sink:kafka", "sink:otel-logs", "sink:prometheus", "sink:jsonl"}
        assert prom.query_value(f'gadgetpipe_sink_up{{gadget_instance="{instance}",'
                                'sink="kafka"}') == 1
        assert prom.query_value("gadgetpipe_grpc_streams_open") == 1
        drain.stop()

    # Kafka: one JSON object per exec, keyed by comm, with the run's headers
    msgs = asyncio.run(consume(env.broker.bootstrap, topic, 3))
    assert len(msgs) >= 3
    for m in msgs:
        obj = json.loads(m.value)
        # file: empty without paths=true, as upstream's; args_count: json.skip, as upstream's
        assert obj["proc"]["comm"] == comm and obj["file"] == "" and "args_count" not in obj
        assert obj["args"] == f"{binary}\u00a0one\u00a0two"
        assert m.key == comm.encode()
        h = dict(m.headers)
        assert (h["gadget"], h["datasource"], h["instance"]) == (
            b"trace_exec", b"exec", instance.encode())
        assert abs(m.timestamp / 1000 - time.time()) < 120
    # Collector: the same execs as typed attributes
    recs = env.collector.wait_for(lambda rs: len(
        [r for r in rs if r["attributes"].get("proc.comm") == comm]) >= len(msgs), 30)
    mine = [r for r in recs if r["attributes"].get("proc.comm") == comm]
    a = mine[0]["attributes"]
    assert isinstance(a["proc.pid"], int) and a["proc.pid"] > 0
    assert a["args_count"] == 3 and a["file"] == "" and a["error_raw"] == 0
    assert mine[0]["body"] == "trace_exec" and mine[0]["severity_text"] == "INFO"
    assert mine[0]["time_unix_nano"] == a["timestamp_raw"]
    assert mine[0]["resource"]["gadget.instance.id"] == instance
    # JSONL: the same records again
    lines = jsonl(out)
    assert {o["proc"]["pid"] for o in lines} == {json.loads(m.value)["proc"]["pid"]
                                                  for m in msgs}
    assert {r["attributes"]["proc.pid"] for r in mine} == {o["proc"]["pid"] for o in lines}
    # every stage of the run balances once it is over
    samples = scrape(env.metrics_url)
    for sink in ("kafka", "otel-logs", "prometheus", "jsonl"):
        lab = {"gadget_instance": instance, "stage": f"sink:{sink}"}
        produced = sample(samples, "gadgetpipe_records_produced_total", **lab)
        assert produced == len(lines)
        assert sample(samples, "gadgetpipe_records_delivered_total", **lab) == produced


def test_dashboard_queries_run_on_the_scraped_metrics(env: Env) -> None:
    dashboard = json.loads((ROOT / "config" / "grafana-dashboard.json").read_text())
    names = env.prometheus._api("/api/v1/label/__name__/values")
    counter = next(n for n in names if n.startswith("gadgetpipe_gadget_exec_by_comm_gp"))
    histogram = next(n for n in names if n.startswith("gadgetpipe_gadget_exec_args_gp")
                     and n.endswith("_bucket"))
    subst = {"$__rate_interval": "2m", "$node": ".*", "$gadget_instance": ".*",
             "$job": "gadgetpipe", "$counter": counter, "$histogram": histogram}
    # rate() needs two scrapes in its window; Prometheus starts scraping 5-10 s after start
    env.prometheus.wait_for("count_over_time(gadgetpipe_build_info[2m])",
                            lambda r: bool(r) and float(r[0]["value"][1]) >= 3, 30)
    answered: dict[str, bool] = {}
    for p in dashboard["panels"]:
        for t in p.get("targets", []):
            expr = t["expr"]
            for k, v in subst.items():
                expr = expr.replace(k, v)
            # a query Prometheus cannot parse raises PrometheusQueryError
            answered[p["title"]] = bool(env.prometheus.query(expr)) or \
                answered.get(p["title"], False)
    assert len(answered) >= 15
    # Queue and sink panels are empty once the runs are over; these outlive them.
    for title in ("Records in, by stage", "Records delivered, by stage",
                  "Counter $counter, top 15 label sets", "Daemon CPU and memory"):
        assert answered[title], title


def test_kafka_protobuf_records_are_the_kernel_structs(env: Env, tmp_path: Path) -> None:
    binary = unique_binary(tmp_path)
    comm = binary.name[:15]
    topic = f"gp.pb.{comm}"
    with env.daemon.client() as c:
        info = c.info("trace_exec")
        drain = Drain(c.run("trace_exec", {
            "operator.oci.ebpf.comm": comm, "operator.kafka.enable": "true",
            "operator.kafka.brokers": env.broker.bootstrap, "operator.kafka.topic": topic,
            "operator.kafka.encoding": "protobuf", "operator.kafka.compression": "zstd"}))
        assert drain.ready.wait(120), "not tracing"
        with keep_running([str(binary)]):
            msgs = asyncio.run(consume(env.broker.bootstrap, topic, 2, timeout=30))
        drain.stop()
    assert len(msgs) >= 2
    fields = {f.fullName: f for f in info.dataSources[0].fields}
    for m in msgs:
        payload = pb.GadgetData.FromString(m.value).data.payload[0]
        f = fields["proc.comm"]
        assert payload[f.offs: f.offs + f.size].split(b"\0")[0] == comm.encode()
        assert dict(m.headers)["content-type"].startswith(b"application/x-protobuf")


# --- outages under a live run (keep these last: they restart the module's peers) -------------


def wait_samples(url: str, what: str, pred: Callable[[Samples], bool],
                 timeout: float = 120.0) -> Samples:
    """Scrapes ``url`` until ``pred`` holds for its samples; returns them."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if pred(samples):
            return samples
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)  # polling /metrics


def live_run(url: str, sink: str) -> str:
    """The one direct run with a live ``sink`` (finished runs have no ``sink_up``)."""
    def live(samples: Samples) -> set[str]:
        return {dict(ls)["gadget_instance"] for (n, ls), _ in samples.items()
                if n == "gadgetpipe_sink_up" and dict(ls)["sink"] == sink
                and dict(ls)["gadget_instance"].startswith("run-")}
    (inst,) = live(wait_samples(url, f"a live run with a {sink} sink",
                                lambda s: len(live(s)) == 1))
    return inst


def test_broker_restart_under_a_live_run_loses_and_duplicates_nothing(env: Env,
                                                                     tmp_path: Path) -> None:
    binary = unique_binary(tmp_path)
    comm = binary.name[:15]
    topic = f"gp.outage.{comm}"
    out = tmp_path / "reference.jsonl"
    with env.daemon.client() as c:
        drain = Drain(c.run("trace_exec", {
            "operator.oci.ebpf.comm": comm, "operator.kafka.enable": "true",
            "operator.kafka.brokers": env.broker.bootstrap, "operator.kafka.topic": topic,
            "operator.kafka.timeout": "2s",
            "operator.jsonl.enable": "true", "operator.jsonl.path": str(out)}))
        assert drain.ready.wait(120), "not tracing"
        with keep_running([str(binary)], interval=0.02):
            # Ordered by the ledger: records reach Kafka, the broker goes down until the sink
            # has retried, then more records reach Kafka after it is back.
            inst = live_run(env.metrics_url, "kafka")
            lab = {"gadget_instance": inst, "stage": "sink:kafka"}
            before = wait_samples(env.metrics_url, "records in Kafka", lambda m: sample(
                m, "gadgetpipe_records_delivered_total", **lab) >= 20)
            env.broker.stop(keep_data=True)
            try:
                wait_samples(env.metrics_url, "the Kafka sink retrying", lambda m: sample(
                    m, "gadgetpipe_records_retried_total", **lab) > 0)
            finally:
                env.broker.start()
            delivered_before = sample(before, "gadgetpipe_records_delivered_total", **lab)
            wait_samples(env.metrics_url, "records in Kafka after the restart", lambda m: sample(
                m, "gadgetpipe_records_delivered_total", **lab) >= delivered_before + 20
                and sample(m, "gadgetpipe_sink_up", gadget_instance=inst, sink="kafka") == 1)
        drain.stop()  # a stop drains the ring; the sinks hand on what they hold
    reference = {o["proc"]["pid"] for o in jsonl(out)}
    msgs = asyncio.run(consume(env.broker.bootstrap, topic, len(reference), timeout=60))
    pids = [json.loads(m.value)["proc"]["pid"] for m in msgs]
    samples = scrape(env.metrics_url)
    inst = next(i for i in run_instance(samples)
                if sample(samples, "gadgetpipe_records_produced_total", gadget_instance=i,
                          stage="sink:jsonl") == len(reference))
    lab = {"gadget_instance": inst, "stage": "sink:kafka"}
    produced = sample(samples, "gadgetpipe_records_produced_total", **lab)
    delivered = sample(samples, "gadgetpipe_records_delivered_total", **lab)
    dropped = sample(samples, "gadgetpipe_records_dropped_total", **lab)
    retried = sample(samples, "gadgetpipe_records_retried_total", **lab)
    print(f"\nlive broker restart: execs={len(reference)} kafka produced={produced} "
          f"delivered={delivered} dropped={dropped} retried={retried}")
    assert len(reference) > 50 and retried > 0
    assert len(pids) == len(set(pids)), "duplicates in Kafka"
    assert set(pids) == reference, "records lost"
    assert (produced, delivered, dropped) == (len(reference), len(reference), 0)


def test_collector_down_with_a_tiny_queue_shows_every_drop_in_the_metrics(
        env: Env, tmp_path: Path) -> None:
    binary = unique_binary(tmp_path)
    comm = binary.name[:15]
    env.collector.stop(keep_data=True)
    try:
        with env.daemon.client() as c:
            drain = Drain(c.run("trace_exec", {
                "operator.oci.ebpf.comm": comm, "operator.otel-logs.enable": "true",
                "operator.otel-logs.endpoint": env.collector.grpc_endpoint,
                "operator.otel-logs.timeout": "300ms",
                "operator.otel-logs.retry-timeout": "1s",
                "operator.otel-logs.queue-capacity": "2",
                "operator.prometheus.counters": "n"}))
            assert drain.ready.wait(120), "not tracing"
            with keep_running([str(binary)], interval=0.02):
                # Until the queue of 2 overflowed, sends failed for good, and more than 10
                # execs were counted: what the assertions below read.
                inst = live_run(env.metrics_url, "otel-logs")
                lab = {"gadget_instance": inst, "stage": "sink:otel-logs"}
                wait_samples(env.metrics_url, "queue_full and send_failed drops", lambda m: all(
                    sample(m, "gadgetpipe_records_dropped_total", **lab, reason=r) > 0
                    for r in ("queue_full", "send_failed"))
                    and sample(m, "gadgetpipe_sink_up", gadget_instance=inst,
                               sink="otel-logs") == 0
                    and sample(m, "gadgetpipe_records_delivered_total", gadget_instance=inst,
                               stage="sink:prometheus") > 10)
            drain.stop()
        samples = scrape(env.metrics_url)
        lab = {"gadget_instance": inst, "stage": "sink:otel-logs"}
        produced = sample(samples, "gadgetpipe_records_produced_total", **lab)
        delivered = sample(samples, "gadgetpipe_records_delivered_total", **lab)
        reasons = {r: sample(samples, "gadgetpipe_records_dropped_total", **lab, reason=r)
                   for r in ("queue_full", "send_failed", "shutdown")}
        execs = sample(samples, "gadgetpipe_records_delivered_total", gadget_instance=inst,
                       stage="sink:prometheus")
        print(f"\ncollector down, queue 2: execs={execs} produced={produced} "
              f"delivered={delivered} dropped={reasons}")
        assert produced == execs > 10
        assert delivered == 0 and reasons["queue_full"] > 0 and reasons["send_failed"] > 0
        assert produced == delivered + sum(reasons.values())
    finally:
        env.collector.start()
