"""Losses that alert: the shipped alert rules (config/alerts.yaml), loaded into a real Prometheus
scraping a real daemon, fire for a one-off burst of kernel losses.

``rate()`` needs two samples of a series; a loss counter whose series is born with its first
loss shows no increase, so the daemon exports every loss row of a run at 0 from its start
(pipeline/ledger.py). The burst: trace_exec with a ring of two records, drained on a 20 ms
timer only, against an exec storm (as tests/e2e/test_faults.py overruns it).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from bench.peers import exec_loop_path
from tests.daemon import ROOT, DaemonProcess
from tests.e2e.helpers import unique_binary
from tests.peers.ports import free_port
from tests.peers.prometheus import PrometheusServer

pytestmark = pytest.mark.bpf

ALERTS = ROOT / "config" / "alerts.yaml"
ALERT = "GadgetpipeKernelLosses"
FIRE_TIMEOUT = 300.0
"""Seconds the alert may take to fire: its ``for`` (2 min in the shipped rules) plus scrapes
and evaluations on a busy machine."""


def alerts(prom: PrometheusServer, name: str, **labels: str) -> list[dict[str, Any]]:
    """The alerts named ``name`` whose labels include ``labels`` (pending or firing)."""
    return [a for a in prom._api("/api/v1/alerts")["alerts"]
            if a["labels"].get("alertname") == name
            and all(a["labels"].get(k) == v for k, v in labels.items())]


def test_a_one_off_burst_of_kernel_losses_fires_the_shipped_alert(tmp_path: Path) -> None:
    port = free_port()
    binary = unique_binary(tmp_path)
    with DaemonProcess("--metrics-listen", f"127.0.0.1:{port}") as d, \
            PrometheusServer([f"127.0.0.1:{port}"], rule_files=[ALERTS], scrape_interval="1s",
                             evaluation_interval="1s") as prom, d.client() as c:
        stream = c.run("trace_exec", {
            "operator.oci.ebpf.comm": binary.name[:15],
            "operator.bcc.ringbuf-size": "16384",   # 4 pages: two 5.7 KiB records
            "operator.bcc.wakeup-fill": "100",      # drained on the timer only
            "operator.bcc.drain-interval": "20ms",
            "operator.grpc.batch-max": "256"})
        try:
            stream.wait_ready()
            # Before any loss, Prometheus already holds the loss series, at 0.
            lost = prom.wait_for('gadgetpipe_kernel_lost_records_total{gadget_instance=~"run-.*"}',
                                 timeout=60)
            [series] = lost
            label = series["metric"]["gadget_instance"]
            assert float(series["value"][1]) == 0
            selector = f'{{gadget_instance="{label}"}}'
            dropped = prom.query(f"gadgetpipe_records_dropped_total{selector}")
            assert {(r["metric"]["stage"], r["metric"]["reason"]) for r in dropped} >= {
                ("kernel", "ringbuf_full"), ("grpc:" + _peer(dropped), "queue_full"),
                ("grpc:" + _peer(dropped), "client_gone")}
            assert all(float(r["value"][1]) == 0 for r in dropped)
            # A scrape after the 0 and before the burst: rate() has its two samples.
            scrapes = prom.query_value(f"count_over_time(gadgetpipe_kernel_lost_records_total"
                                       f"{selector}[1m])") or 0
            prom.wait_for(f"count_over_time(gadgetpipe_kernel_lost_records_total{selector}[1m])"
                          f" > {scrapes}", timeout=30)

            done = subprocess.run([str(exec_loop_path()), "-p", str(binary), "2000"],
                                  capture_output=True, text=True, check=True)
            assert json.loads(done.stdout)["failed"] == 0
            burst_end = time.monotonic()
            prom.wait_for(f"gadgetpipe_kernel_lost_records_total{selector} > 0", timeout=60)
            increase = prom.wait_for(
                f"increase(gadgetpipe_kernel_lost_records_total{selector}[5m]) > 0", timeout=60)
            assert float(increase[0]["value"][1]) > 0
            deadline = time.monotonic() + FIRE_TIMEOUT
            while True:
                states = {a["state"] for a in alerts(prom, ALERT, gadget_instance=label)}
                if "firing" in states:
                    break
                assert time.monotonic() < deadline, f"{ALERT} did not fire: {states}"
                time.sleep(1.0)  # polling Prometheus' alert state (it evaluates every 1 s)
            print(f"\n{ALERT} fired {time.monotonic() - burst_end:.0f} s after a one-off "
                  "burst of kernel losses")
        finally:
            stream.stop()
            list(stream.raw())


def _peer(rows: list[dict[str, Any]]) -> str:
    """The peer part of the run's one gRPC stage (``grpc:<peer>``)."""
    [stage] = {r["metric"]["stage"] for r in rows if r["metric"]["stage"].startswith("grpc:")}
    return str(stage)[len("grpc:"):]
