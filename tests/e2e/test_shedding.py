"""Adaptive load shedding end to end: a client that reads slowly makes its queue fill, the
kernel samples, every shed record is counted, and once the client catches up sampling stops.

The daemon's direct-run queues are made small (``eventsBufferLength``) so a slow client fills
one quickly; trace_exec filters a unique binary in the kernel (before sampling), so the
generator's count is exactly what the gadget's hooks saw.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.client import RunStream
from bench.peers import exec_loop_path
from tests.daemon import DaemonProcess
from tests.e2e.helpers import unique_binary
from tests.peers.ports import free_port

pytestmark = pytest.mark.bpf

QUEUE = 256
"""Records a direct run's stream may queue (the daemon's eventsBufferLength here)."""
EXECS = 3000
SLOW = 0.004
"""Seconds the slow client sleeps per record: ~250 records/s against thousands of execs/s."""
WARN = 3


@dataclass
class Env:
    daemon: DaemonProcess
    metrics_port: int


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    config = tmp_path_factory.mktemp("shed") / "config.yaml"
    config.write_text(f"daemon:\n  eventsBufferLength: {QUEUE}\ninstances: []\n")
    port = free_port()
    with DaemonProcess("--metrics-listen", f"127.0.0.1:{port}", config=config) as d:
        yield Env(d, port)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def total(m: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in m.items() if n == name and want <= set(ls))


@dataclass
class SlowReader:
    """Reads a stream slowly until :meth:`catch_up`, then as fast as it can."""

    stream: RunStream
    records: int = 0
    logs: list[tuple[int, str]] = field(default_factory=list)
    error: grpc.RpcError | None = None
    fast: threading.Event = field(default_factory=threading.Event)
    ready: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        try:
            for ev in self.stream:
                if ev.ready:
                    self.ready.set()
                if ev.log is not None:
                    self.logs.append((ev.severity, ev.log))
                    continue
                self.records += len(ev.records)
                if not self.fast.is_set():
                    time.sleep(SLOW)
        except grpc.RpcError as e:
            self.error = e
        finally:
            self.ended.set()

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until the gadget traces (its ready event); fails if the stream ends first."""
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.1):
            assert not self.ended.is_set(), f"the stream ended before it traced: {self.error}"
            assert time.monotonic() < deadline, f"not tracing after {timeout} s"

    def catch_up(self) -> None:
        self.fast.set()

    def join(self, timeout: float) -> None:
        self._t.join(timeout)
        assert not self._t.is_alive(), "the stream did not end"


def live_runs(port: int) -> set[str]:
    """Ledger labels of the runs live now (the sampling-rate gauge has one per run)."""
    return {dict(ls)["gadget_instance"] for (n, ls), _ in scrape(port).items()
            if n == "gadgetpipe_kernel_sample_rate"}


def test_a_slow_client_makes_the_kernel_shed_and_every_record_is_counted(
        env: Env, tmp_path: Path) -> None:
    binary = unique_binary(tmp_path)
    known = live_runs(env.metrics_port)
    with env.daemon.client() as c:
        reader = SlowReader(c.run("trace_exec", {"operator.oci.ebpf.comm": binary.name[:15],
                                                 "operator.bcc.shed": "true"}))
        reader.wait_ready()
        (label,) = live_runs(env.metrics_port) - known
        done = subprocess.run([str(exec_loop_path()), "-p", str(binary), str(EXECS)],
                              capture_output=True, text=True, check=True)
        made = json.loads(done.stdout)
        assert made["failed"] == 0
        during = scrape(env.metrics_port)
        rate_during = total(during, "gadgetpipe_kernel_sample_rate", gadget_instance=label)
        reader.catch_up()
        # Once the client has caught up, the queue drains and N halves back to 1.
        deadline = time.monotonic() + 30
        while True:
            m = scrape(env.metrics_port)
            rate = total(m, "gadgetpipe_kernel_sample_rate", gadget_instance=label)
            depth = total(m, "gadgetpipe_queue_depth_records", gadget_instance=label)
            told = any("load shedding ended" in t for _, t in reader.logs)
            if rate == 1 and depth == 0 and told:
                break
            assert time.monotonic() < deadline, \
                f"sampling at 1 in {rate}, depth {depth}, logs {reader.logs}"
            time.sleep(0.1)
        reader.stream.stop()
        reader.join(30)
    assert reader.error is None, reader.error
    m = scrape(env.metrics_port)
    produced = total(m, "gadgetpipe_records_produced_total", gadget_instance=label,
                     stage="source")
    shed = total(m, "gadgetpipe_records_dropped_total", gadget_instance=label, stage="kernel",
                 reason="shed")
    lost = total(m, "gadgetpipe_records_dropped_total", gadget_instance=label, stage="kernel",
                 reason="ringbuf_full")
    queue_dropped = sum(v for (n, ls), v in m.items() if n == "gadgetpipe_records_dropped_total"
                        and dict(ls)["gadget_instance"] == label
                        and dict(ls)["stage"].startswith("grpc:"))
    print(f"\nshedding: generated {EXECS}, produced {produced:.0f}, shed {shed:.0f}, ring lost "
          f"{lost:.0f}, queue dropped {queue_dropped:.0f}, delivered {reader.records}, "
          f"N during the storm {rate_during:.0f}")
    assert shed > 0, "nothing was shed"
    assert produced + shed + lost == EXECS
    assert reader.records + queue_dropped == produced
    warns = [text for sev, text in reader.logs if sev <= WARN]
    assert any("shedding load" in t for t in warns), reader.logs


def test_shedding_is_off_by_default_and_its_thresholds_are_checked(env: Env) -> None:
    with env.daemon.client() as c:
        info = c.info("trace_exec")
        defaults = {p.prefix + p.key: p.defaultValue for p in info.params}
        assert defaults["operator.bcc.shed"] == "false"
        assert (defaults["operator.bcc.shed-high"], defaults["operator.bcc.shed-low"]) == \
            ("75", "25")
        with pytest.raises(grpc.RpcError) as e:
            list(c.run("trace_exec", {"operator.bcc.shed": "true",
                                      "operator.bcc.shed-low": "90"}).raw())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "operator.bcc.shed-low" in (e.value.details() or "")
