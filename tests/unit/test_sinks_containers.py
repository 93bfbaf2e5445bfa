"""Sinks carry containers: Prometheus labels from the k8s/runtime fields (capped as any label),
OTLP resources per container (OpenTelemetry's k8s.* and container.* attributes), Kafka topics
templated with record fields. Batches come through the real enrich operator."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from prometheus_client import CollectorRegistry

from pipeline.batch import Batch
from pipeline.containers.collection import ContainerCollection
from pipeline.containers.model import Container
from pipeline.layout import StructRegistry
from pipeline.operators.enrich import Enrich
from pipeline.schema import DataSourceSchema, DataSourceType
from pipeline.sinks.container_resource import container_groups, container_requests
from pipeline.sinks.encode import OtlpLogEncoder, otlp_scope
from pipeline.sinks.kafka import _record_topics, check_template
from pipeline.sinks.prometheus import (
    OVERFLOW_LABEL,
    GadgetMetricsCollector,
    GadgetMetricsStore,
    parse_counters,
)


def _source() -> DataSourceSchema:
    reg = StructRegistry({"gadget_mntns_id": "u64"}, {"ev": ["u32 pid", "gadget_mntns_id mntns"]})
    fields, size = reg.fields("ev")
    return DataSourceSchema("ev", DataSourceType.SINGLE, tuple(fields), size)


def _enrich() -> tuple[Enrich, DataSourceSchema]:
    coll = ContainerCollection(host_netns=1)
    for i, (pod, ns) in enumerate((("web-0", "shop"), ("db-0", "shop"), ("api-0", "core"))):
        coll.upsert(Container.from_labels(f"c{i}", {
            "io.kubernetes.pod.name": pod, "io.kubernetes.pod.namespace": ns,
            "io.kubernetes.container.name": "main"}, f"reg/{pod}:1").with_(
            pid=100 + i, mntns=1000 + i, netns=2000 + i, image_digest=f"sha256:{i}",
            pod_labels={"app": pod.split("-")[0]}))
    s = _source()
    op = Enrich({}, [s], coll)
    return op, s


def _batch(op: Enrich, s: DataSourceSchema, mntns: list[int]) -> Batch:
    rows = np.zeros((len(mntns), s.record_size), dtype=np.uint8)
    f = s.field("mntns")
    for i, m in enumerate(mntns):
        rows[i, f.offs: f.offs + 8] = np.frombuffer(struct.pack("<Q", m), np.uint8)
    return op.process(Batch(s, rows))


def test_prometheus_counts_by_pod_with_the_cap() -> None:
    op, s = _enrich()
    store = GadgetMetricsStore()
    run = store.build("g", "i", [op.output_schema(s)],
                      parse_counters("by_pod:k8s.namespace,k8s.podName"), [], 2)
    store.add(run)
    run.count(_batch(op, s, [1000, 1000, 1001, 5, 1002, 1000]))
    reg = CollectorRegistry(auto_describe=False)
    reg.register(GadgetMetricsCollector(store))
    base = {"gadget": "g", "gadget_instance": "i", "gadget_instance_id": "i",
            "gadget_instance_name": "i", "datasource": "ev"}

    def get(ns: str, pod: str) -> float | None:
        return reg.get_sample_value("gadgetpipe_gadget_by_pod_total",
                                    {**base, "namespace": ns, "podName": pod})

    # Two series fit the cap (first seen first); the rest is counted in the overflow series.
    assert (get("", ""), get("shop", "web-0")) == (1, 3)
    assert get("shop", "db-0") is None and get("core", "api-0") is None
    assert get(OVERFLOW_LABEL, OVERFLOW_LABEL) == 2


def test_otlp_resources_carry_each_container_by_the_semantic_conventions() -> None:
    op, s = _enrich()
    b = _batch(op, s, [1000, 5, 1000, 1002])
    groups, inv = container_groups(b)
    assert inv.tolist() == [inv[0], inv[1], inv[0], inv[3]] and len(groups) == 3
    base = {"service.name": "gadgetpipe"}
    records = OtlpLogEncoder(b.schema, body="g").encode(b, 1)
    [(req, count)] = container_requests(base, otlp_scope("g", "1"), b, records)
    assert count == 4
    msg = ExportLogsServiceRequest.FromString(req)
    by_pod = {}
    for rl in msg.resource_logs:
        attrs = {a.key: a.value.string_value for a in rl.resource.attributes}
        n = sum(len(sl.log_records) for sl in rl.scope_logs)
        by_pod[attrs.get("k8s.pod.name", "")] = (attrs, n)
    web, n_web = by_pod["web-0"]
    assert n_web == 2 and by_pod[""][1] == 1 and by_pod["api-0"][1] == 1
    assert web == {"service.name": "gadgetpipe", "k8s.namespace.name": "shop",
                   "k8s.pod.name": "web-0", "k8s.container.name": "main", "container.id": "c0",
                   "container.name": "main", "container.image.name": "reg/web-0:1",
                   "container.image.id": "sha256:0", "container.runtime": "containerd",
                   "k8s.pod.label.app": "web"}
    assert by_pod[""][0] == base  # a host process: the sink's resource alone
    # Split at a size: every request stays whole protobuf and all records are there.
    small = container_requests(base, otlp_scope("g", "1"), b, records, max_bytes=400)
    assert sum(c for _, c in small) == 4
    for r, _ in small:
        ExportLogsServiceRequest.FromString(r)


def test_kafka_topics_from_record_fields() -> None:
    op, s = _enrich()
    b = _batch(op, s, [1000, 5, 1002])
    topics = _record_topics("gp.{gadget}.{k8s.namespace}.{k8s.podName}", b,
                            {"gadget": "trace_open", "instance": "i", "datasource": "ev",
                             "node": "n"})
    assert topics == ["gp.trace_open.shop.web-0", "gp.trace_open._._", "gp.trace_open.core.api-0"]
    check_template("gp.{k8s.namespace}", [b.schema])
    with pytest.raises(ValueError, match="unknown placeholders"):
        check_template("gp.{k8s.nope}", [b.schema])
    with pytest.raises(ValueError, match="unknown placeholders"):
        check_template("gp.{k8s.namespace}")  # no schema to name it
