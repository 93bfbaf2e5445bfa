"""The daemon's /metrics endpoint: the ledger, queues, sinks and gadget metrics as Prometheus
families, served over real HTTP from a daemon-owned registry."""

from __future__ import annotations

import asyncio
import gzip
import struct
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from api.instance import InstanceStatus
from api.metrics_server import MetricsServer, parse_listen
from pipeline.batch import Batch
from pipeline.ledger import Ledger
from pipeline.run import GadgetRun
from pipeline.sinks.registry import SinkManager
from pipeline.sources.catalog import Catalog


class Instances:
    """The instance manager's metrics-facing surface (``list_states``), with its summaries."""

    def list_states(self) -> list[object]:
        return [InstanceStatus("a", "one", "trace_exec", "Running", "", 0, 0),
                InstanceStatus("b", "two", "trace_exec", "Error", "boom", 0, 0),
                ("c", "three", "trace_open", "Running", "")]


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str],
                                                                        bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status, dict(r.headers), r.read()


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:2224") == ("127.0.0.1", 2224)
    assert parse_listen("[::1]:9") == ("::1", 9)
    assert parse_listen(":9") == ("0.0.0.0", 9)
    with pytest.raises(ValueError):
        parse_listen("nope")


async def test_metrics_endpoint_serves_ledger_queues_sinks_and_gadget_metrics(
        tmp_path: object) -> None:
    ledger = Ledger()
    sinks = SinkManager(ledger, node="n")
    ctx = SimpleNamespace(sinks=sinks, instances=Instances())
    server = MetricsServer("127.0.0.1:0", ledger, ctx)
    await server.start()
    spec = Catalog().resolve("trace_exec")
    run = GadgetRun(spec, {"operator.prometheus.counters": "by_comm:proc.comm",
                           "operator.jsonl.enable": "true", "operator.jsonl.path": "/dev/null"},
                    ledger, "run-7", sinks.params(), sinks.prefixes())
    attached = await sinks.attach(run)
    grpc_edge = run.subscribe("grpc:peer", 10, run.fanout.edges[0].overflow)
    schema = spec.datasources[0]  # what a source emits (the run adds its own fields)
    rows = np.zeros((3, schema.record_size), dtype=np.uint8)
    c = schema.field("proc.comm")
    for i in range(3):
        rec = bytearray(schema.record_size)
        rec[c.offs: c.offs + 4] = b"sh\0\0" if i else b"zsh\0"
        struct.pack_into("<I", rec, schema.field("proc.pid").offs, i)
        rows[i] = np.frombuffer(bytes(rec), dtype=np.uint8)
    ledger.produced("run-7", "kernel", 5)
    ledger.dropped("run-7", "kernel", 5, "ringbuf_full")
    await run.fanout.publish(Batch(schema, rows))
    for _ in range(100):
        if ledger.get("run-7", "sink:prometheus", "delivered") == 3:
            break
        await asyncio.sleep(0.01)
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        status, headers, body = await asyncio.to_thread(http_get, url)
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        for name in ("gadgetpipe_records_produced", "gadgetpipe_records_delivered",
                     "gadgetpipe_records_dropped", "gadgetpipe_kernel_lost_records",
                     "gadgetpipe_queue_depth_records", "gadgetpipe_sink_up",
                     "gadgetpipe_sink_errors", "gadgetpipe_grpc_streams_open",
                     "gadgetpipe_instances", "gadgetpipe_gadget_by_comm",
                     "process_resident_memory_bytes"):
            assert name in families, name
        get = server.registry.get_sample_value
        assert get("gadgetpipe_records_produced_total",
                   {"gadget_instance": "run-7", "stage": "sink:prometheus"}) == 3
        assert get("gadgetpipe_kernel_lost_records_total", {"gadget_instance": "run-7"}) == 5
        assert get("gadgetpipe_records_dropped_total", {"gadget_instance": "run-7",
                                                        "stage": "kernel",
                                                        "reason": "ringbuf_full"}) == 5
        assert get("gadgetpipe_queue_depth_records",
                   {"gadget_instance": "run-7", "edge": "grpc:peer"}) == 3
        assert get("gadgetpipe_grpc_streams_open") == 1
        assert get("gadgetpipe_sink_up", {"gadget_instance": "run-7", "sink": "jsonl"}) == 1
        assert get("gadgetpipe_instances", {"status": "Running"}) == 2
        assert get("gadgetpipe_instances", {"status": "Error"}) == 1
        assert get("gadgetpipe_gadget_by_comm_total",
                   {"gadget": "trace_exec", "gadget_instance": "run-7",
                    "gadget_instance_id": "run-7", "gadget_instance_name": "run-7",
                    "datasource": "exec", "comm": "sh"}) == 2
        # gzip and OpenMetrics are negotiated as Prometheus asks for them
        _, headers, body = await asyncio.to_thread(
            http_get, url, {"Accept-Encoding": "gzip",
                            "Accept": "application/openmetrics-text; version=1.0.0"})
        assert headers.get("Content-Encoding") == "gzip"
        assert headers["Content-Type"].startswith("application/openmetrics-text")
        assert gzip.decompress(body).rstrip().endswith(b"# EOF")
        status, _, _ = await asyncio.to_thread(http_get, f"http://127.0.0.1:{server.port}/")
        assert status == 200
        # the daemon's registry is its own: nothing leaked into the process-global one
        assert REGISTRY.get_sample_value("gadgetpipe_grpc_streams_open") is None
    finally:
        run.unsubscribe(grpc_edge)
        await run.stop()
        await attached.close()
        await sinks.stop()
        await server.stop()
