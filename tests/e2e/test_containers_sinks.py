"""Container fields through the sinks, against the real peers: the daemon watches a real
containerd (tests/peers/containerd.py) running busybox containers with Kubernetes' CRI labels,
traces opens on the real kernel, and the records of processes inside a container reach

- a real Kafka broker keyed by their pod and on a topic named after their namespace and
  container (a template of record fields),
- a real OpenTelemetry Collector with the container as OTLP resource attributes
  (OpenTelemetry's ``k8s.*`` and ``container.*`` semantic conventions), host records without,
- a real Prometheus, which scrapes the daemon's gadget counter labelled by pod and namespace,
  held to the metric's series cap (``max-series``) like any other label.

Every workload is a fixed number of opens of a file name only this test uses, started once the
run is tracing (its ready event); tests wait for the records to arrive and then assert exact
counts and fields. Time only bounds how long a test may wait before it fails.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from tests.daemon import DaemonProcess
from tests.e2e.helpers import Drain
from tests.peers.containerd import BusyboxContainer, Containerd
from tests.peers.kafka import KafkaBroker
from tests.peers.otelcol import LogRecord, OtelCollector
from tests.peers.ports import free_port
from tests.peers.prometheus import PrometheusServer

pytestmark = [pytest.mark.peer, pytest.mark.bpf]

LOCAL = "operator.LocalManager."
CONTAINER_RESOURCE = ("k8s.namespace.name", "k8s.pod.name", "k8s.container.name",
                      "container.id", "container.name", "container.runtime")


@dataclass
class Env:
    containerd: Containerd
    daemon: DaemonProcess
    broker: KafkaBroker
    collector: OtelCollector
    prometheus: PrometheusServer


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    port = free_port()
    with Containerd() as containerd, KafkaBroker() as broker, OtelCollector() as collector, \
            DaemonProcess("--containerd-socket", str(containerd.socket),
                          "--metrics-listen", f"127.0.0.1:{port}") as daemon, \
            PrometheusServer([f"127.0.0.1:{port}"]) as prom:
        yield Env(containerd, daemon, broker, collector, prom)


def unique(what: str) -> str:
    return f"{what}-{uuid.uuid4().hex[:8]}"


def marker(containerd: Containerd, name: str) -> str:
    """A file in the containers' root filesystem (its path inside them) only this test opens."""
    path = f"/etc/{unique(name)}"
    (containerd.rootfs / path.lstrip("/")).write_text("gadgetpipe\n")
    return path


def open_inside(containerd: Containerd, box: BusyboxContainer, path: str, times: int) -> None:
    """Opens ``path`` ``times`` times from a process exec'd inside ``box`` (busybox cat opens
    its file once)."""
    count = " ".join(str(i) for i in range(times))
    done = containerd.exec(box.id, ["/bin/sh", "-c", f"for i in {count}; do /bin/cat {path}; done"])
    assert done.returncode == 0, done.stderr
    assert done.stdout == "gadgetpipe\n" * times


async def consume_until(bootstrap: str, topic: str, done: Callable[[list[Any]], bool],
                        timeout: float = 60.0) -> list[Any]:
    """The topic's messages from its start, read until ``done`` holds for them, and then one
    more poll (anything more would be a message too many)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    got: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while not done(got):
            assert time.monotonic() < deadline, f"{topic}: {len(got)} messages in {timeout} s"
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                got.extend(msgs)
        for msgs in (await consumer.getmany(timeout_ms=500)).values():
            got.extend(msgs)
    finally:
        await consumer.stop()
    return got


def test_kafka_keys_by_pod_and_names_topics_after_namespace_and_container(env: Env) -> None:
    c = env.containerd
    ns, pod, other_pod = unique("ns"), unique("pod"), unique("other")
    app_path, side_path, other_path = marker(c, "app"), marker(c, "side"), marker(c, "other")
    # Two containers of the selected pod, and one of another pod in the same namespace.
    app = c.run("kapp", ["/bin/sleep", "1000"], pod=pod, namespace=ns, container="app")
    side = c.run("kside", ["/bin/sleep", "1000"], pod=pod, namespace=ns, container="side")
    other = c.run("kother", ["/bin/sleep", "1000"], pod=other_pod, namespace=ns,
                  container="app")
    n_app, n_side = 7, 4
    try:
        with env.daemon.client() as client:
            drain = Drain(client.run("trace_open", {
                LOCAL + "k8s-podname": pod,
                "operator.kafka.enable": "true",
                "operator.kafka.brokers": env.broker.bootstrap,
                "operator.kafka.topic": "gp.ctr.{k8s.namespace}.{k8s.containerName}",
                "operator.kafka.key": "k8s.podName"}))
            try:
                assert drain.ready.wait(120), "not tracing"
                open_inside(c, other, other_path, 3)
                open_inside(c, app, app_path, n_app)
                open_inside(c, side, side_path, n_side)

                def opened(path: str, n: int) -> Callable[[list[Any]], bool]:
                    return lambda ms: sum(json.loads(m.value)["fname"] == path
                                          for m in ms) >= n

                app_msgs = asyncio.run(consume_until(env.broker.bootstrap,
                                                     f"gp.ctr.{ns}.app", opened(app_path, n_app)))
                side_msgs = asyncio.run(consume_until(env.broker.bootstrap, f"gp.ctr.{ns}.side",
                                                      opened(side_path, n_side)))
            finally:
                drain.stop()
    finally:
        for box in (app, side, other):
            c.remove(box.id)
    for msgs, box, name, path, n in ((app_msgs, app, "app", app_path, n_app),
                                     (side_msgs, side, "side", side_path, n_side)):
        objs = [json.loads(m.value) for m in msgs]
        # exactly the container's opens of its marker, on its own topic
        assert sum(o["fname"] == path for o in objs) == n
        # only the selected pod's records (the other pod's container is also named "app")
        assert other_path not in {o["fname"] for o in objs}
        for m, o in zip(msgs, objs, strict=True):
            assert m.key == pod.encode(), (m.key, o)
            assert (o["k8s"]["namespace"], o["k8s"]["podName"], o["k8s"]["containerName"]) == \
                (ns, pod, name), o
            assert o["runtime"]["containerName"] == name
            assert o["runtime"]["containerId"] == box.id
            assert o["runtime"]["runtimeName"] == "containerd"
            assert o["runtime"]["containerPid"] == box.pid


def test_otlp_resource_attributes_name_the_container_and_not_the_host(env: Env) -> None:
    c = env.containerd
    ns, pod = unique("ns"), unique("pod")
    path = marker(c, "otlp")
    host_path = str(c.rootfs / path.lstrip("/"))  # the same file, opened from the host
    box = c.run("otlp", ["/bin/sleep", "1000"], pod=pod, namespace=ns, container="writer")
    n_box, n_host = 6, 5

    def mine(rs: list[LogRecord], fname: str) -> list[LogRecord]:
        return [r for r in rs if r["attributes"].get("fname") == fname]

    try:
        with env.daemon.client() as client:
            drain = Drain(client.run("trace_open", {
                "operator.filter.filter": f"fname~{Path(path).name}$",
                "operator.otel-logs.enable": "true",
                "operator.otel-logs.endpoint": env.collector.grpc_endpoint}))
            try:
                assert drain.ready.wait(120), "not tracing"
                open_inside(c, box, path, n_box)
                for _ in range(n_host):
                    assert Path(host_path).read_text() == "gadgetpipe\n"
                recs = env.collector.wait_for(
                    lambda rs: len(mine(rs, path)) >= n_box and len(mine(rs, host_path))
                    >= n_host, 60)
            finally:
                drain.stop()
    finally:
        c.remove(box.id)
    inside, host = mine(recs, path), mine(recs, host_path)
    assert (len(inside), len(host)) == (n_box, n_host)
    for r in inside:
        res = r["resource"]
        assert {k: res.get(k) for k in CONTAINER_RESOURCE} == {
            "k8s.namespace.name": ns, "k8s.pod.name": pod, "k8s.container.name": "writer",
            "container.id": box.id, "container.name": "writer",
            "container.runtime": "containerd"}, res
        assert res["gadget.name"] == "trace_open" and res["service.name"] == "gadgetpipe"
    for r in host:
        res = r["resource"]
        assert not [k for k in res if k.startswith(("k8s.", "container."))], res
        assert res["gadget.name"] == "trace_open" and res["service.name"] == "gadgetpipe"
        assert r["attributes"]["proc.pid"] > 0


def test_prometheus_counts_a_pods_events_in_a_series_labelled_with_it(env: Env) -> None:
    c = env.containerd
    ns, pod = unique("ns"), unique("pod")
    path = marker(c, "prom")
    host_path = str(c.rootfs / path.lstrip("/"))
    box = c.run("prom", ["/bin/sleep", "1000"], pod=pod, namespace=ns, container="counter")
    name = f"opens_{uuid.uuid4().hex[:8]}"  # a metric of this test alone
    n_box, n_host = 9, 2
    try:
        with env.daemon.client() as client:
            drain = Drain(client.run("trace_open", {
                "operator.filter.filter": f"fname~{Path(path).name}$",
                "operator.prometheus.counters": f"{name}:k8s.podName,k8s.namespace,"
                                                "k8s.containerName"}))
            try:
                assert drain.ready.wait(120), "not tracing"
                open_inside(c, box, path, n_box)
                for _ in range(n_host):
                    assert Path(host_path).read_text() == "gadgetpipe\n"
                metric = f"gadgetpipe_gadget_{name}_total"
                got = env.prometheus.wait_for(
                    metric, lambda r: sum(float(s["value"][1]) for s in r) >= n_box + n_host,
                    60)
            finally:
                drain.stop()
    finally:
        c.remove(box.id)
    # Prometheus keeps no empty label: the host's series has none of the three.
    series = {tuple(s["metric"].get(k, "") for k in ("podName", "namespace", "containerName")):
              float(s["value"][1]) for s in got}
    assert series == {(pod, ns, "counter"): n_box, ("", "", ""): n_host}, got
    labels = next(s["metric"] for s in got if s["metric"].get("podName") == pod)
    assert (labels["gadget"], labels["datasource"]) == ("trace_open", "open")


def test_prometheus_pod_labels_are_held_to_the_series_cap(env: Env) -> None:
    c = env.containerd
    ns, first, second = unique("ns"), unique("first"), unique("second")
    path = marker(c, "cap")
    a = c.run("capa", ["/bin/sleep", "1000"], pod=first, namespace=ns, container="c")
    b = c.run("capb", ["/bin/sleep", "1000"], pod=second, namespace=ns, container="c")
    name = f"opens_{uuid.uuid4().hex[:8]}"
    metric = f"gadgetpipe_gadget_{name}_total"
    n_a, n_b = 5, 3
    try:
        with env.daemon.client() as client:
            drain = Drain(client.run("trace_open", {
                "operator.filter.filter": f"fname~{Path(path).name}$",
                "operator.prometheus.counters": f"{name}:k8s.podName",
                "operator.prometheus.max-series": "1"}))
            try:
                assert drain.ready.wait(120), "not tracing"
                # The first pod takes the one series; only once it is counted does the second
                # pod open, so which one is refused is decided by events.
                open_inside(c, a, path, n_a)
                env.prometheus.wait_for(f'{metric}{{podName="{first}"}}',
                                        lambda r: bool(r) and float(r[0]["value"][1]) >= n_a, 60)
                open_inside(c, b, path, n_b)
                got = env.prometheus.wait_for(
                    metric, lambda r: sum(float(s["value"][1]) for s in r) >= n_a + n_b, 60)
                refused = env.prometheus.wait_for(
                    f'gadgetpipe_metric_series_refused_total{{metric="gadgetpipe_gadget_{name}"}}',
                    lambda r: bool(r) and float(r[0]["value"][1]) >= n_b, 60)
            finally:
                drain.stop()
    finally:
        c.remove(a.id)
        c.remove(b.id)
    assert {s["metric"]["podName"]: float(s["value"][1]) for s in got} == \
        {first: n_a, "__overflow__": n_b}, got
    assert float(refused[0]["value"][1]) == n_b
