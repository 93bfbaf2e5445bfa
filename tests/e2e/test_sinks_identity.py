"""A persistent instance's identity in every sink: its records reach the real Kafka with the
header ``instance`` = the instance's id (and its topic template's ``{instance}`` is that id),
the real Collector with ``gadget.instance.id`` / ``gadget.instance.name`` = its id and name,
and Prometheus with ``gadget_instance_id`` / ``gadget_instance_name`` labels. (A run carries
a typed identity set where it is made, pipeline/run.py ``RunIdentity``; before, both read
``instance:<name>``, the ledger label.)
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from prometheus_client.parser import text_string_to_metric_families

from pipeline._gen import gadget_service_pb2 as pb
from tests.daemon import DaemonProcess
from tests.e2e.helpers import unique_binary
from tests.peers.kafka import KafkaBroker
from tests.peers.otelcol import OtelCollector
from tests.peers.ports import free_port

pytestmark = [pytest.mark.peer, pytest.mark.bpf]

EXECS = 3


@dataclass
class Env:
    daemon: DaemonProcess
    metrics_url: str
    broker: KafkaBroker
    collector: OtelCollector


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    port = free_port()
    with KafkaBroker() as broker, OtelCollector() as collector, \
            DaemonProcess("--metrics-listen", f"127.0.0.1:{port}") as daemon:
        yield Env(daemon, f"http://127.0.0.1:{port}/metrics", broker, collector)


async def consume(bootstrap: str, topic: str, want: int, timeout: float = 60.0) -> list[Any]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    got: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                got.extend(msgs)
    finally:
        await consumer.stop()
    return got


def gadget_series(url: str, metric: str) -> list[dict[str, str]]:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return [dict(s.labels) for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == metric]


def test_a_persistent_instance_carries_its_id_and_name_to_every_sink(env: Env,
                                                                     tmp_path: Path) -> None:
    binary = unique_binary(tmp_path)
    comm = binary.name[:15]
    name = f"ident-{comm[-8:]}"
    counter = f"ident_{comm}"
    params = {
        "operator.oci.ebpf.comm": comm,
        "operator.kafka.enable": "true", "operator.kafka.brokers": env.broker.bootstrap,
        "operator.kafka.topic": "gp.ident.{instance}",
        "operator.otel-logs.enable": "true",
        "operator.otel-logs.endpoint": env.collector.grpc_endpoint,
        "operator.prometheus.counters": f"{counter}:proc.comm",
    }
    with env.daemon.client() as c:
        resp = c.instances.CreateGadgetInstance(pb.CreateGadgetInstanceRequest(
            gadgetInstance=pb.GadgetInstance(name=name, tags=[""], gadgetConfig=pb.GadgetRunRequest(
                imageName="trace_exec", paramValues=params, version=1))), timeout=120)
        gi = resp.gadgetInstance
        try:
            # CreateGadgetInstance answers once the instance traces (or says it does not yet).
            assert gi.state.status == pb.StatusRunning and not gi.state.message, gi.state
            for _ in range(EXECS):
                subprocess.run([str(binary)], check=True)
            msgs = asyncio.run(consume(env.broker.bootstrap, f"gp.ident.{gi.id}", EXECS))
            recs = env.collector.wait_for(lambda rs: len(
                [r for r in rs if r["attributes"].get("proc.comm") == comm]) >= EXECS, 60)
            series = gadget_series(env.metrics_url, f"gadgetpipe_gadget_{counter}_total")
        finally:
            c.instances.RemoveGadgetInstance(pb.GadgetInstanceId(id=gi.id))
    assert len(msgs) == EXECS
    for m in msgs:
        assert json.loads(m.value)["proc"]["comm"] == comm
        h = dict(m.headers)
        assert (h["gadget"], h["instance"], h["datasource"]) == (
            b"trace_exec", gi.id.encode(), b"exec")
    mine = [r for r in recs if r["attributes"].get("proc.comm") == comm]
    assert len(mine) == EXECS
    for r in mine:
        assert r["resource"]["gadget.instance.id"] == gi.id
        assert r["resource"]["gadget.instance.name"] == name
    [labels] = series
    assert (labels["gadget_instance_id"], labels["gadget_instance_name"]) == (gi.id, name)
    assert labels["gadget_instance"] == f"instance:{name}"  # the ledger label, as self-metrics
    assert labels["comm"] == comm
