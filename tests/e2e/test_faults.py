"""Faults around the daemon: its state dir read-only or full, SIGTERM while a run streams, the
Prometheus server scraping it killed and restarted, and its BPF ring overrun on purpose.

Each test starts its own daemon (the fault is the daemon's alone). The state dir faults use a
tmpfs mounted for the test (remounted read-only, or filled up), so nothing else is touched.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.client import GadgetClient, RunStream
from bench.peers import exec_loop_path
from pipeline._gen import gadget_service_pb2 as pb
from tests.daemon import DaemonProcess
from tests.e2e.helpers import bpf_programs_of, keep_running, unique_binary
from tests.peers.ports import free_port
from tests.peers.prometheus import PrometheusServer

pytestmark = pytest.mark.bpf

WARN = 3
DRAIN_DEADLINE = 15.0
"""Seconds a SIGTERM'd daemon may take to end its streams and exit (its own drain deadline is
5 s per stream, plus teardown)."""


# -- helpers --------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``path`` for the block."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        # Lazy: a daemon that is still shutting down must not keep the mount behind.
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def create(c: GadgetClient, name: str) -> pb.GadgetInstance:
    resp = c.instances.CreateGadgetInstance(pb.CreateGadgetInstanceRequest(
        gadgetInstance=pb.GadgetInstance(name=name, gadgetConfig=pb.GadgetRunRequest(
            imageName="trace_exec", version=1))), timeout=30)
    gi: pb.GadgetInstance = resp.gadgetInstance
    c.info(gi.id, instance=True)  # returns once it runs (its BPF programs are loaded)
    return gi


def names(c: GadgetClient) -> list[str]:
    return sorted(gi.name for gi in c.instances.ListGadgetInstances(
        pb.ListGadgetInstancesRequest()).gadgetInstances)


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def still_serves(c: GadgetClient, tmp: Path) -> None:
    """A normal request and a run with records still work."""
    assert [d.name for d in c.info("trace_exec").dataSources] == ["exec"]
    binary = unique_binary(tmp)
    stream = c.run("trace_exec", {"operator.oci.ebpf.comm": binary.name[:15]}, timeout_s=30)
    stream.wait_ready()
    subprocess.run([str(binary)], check=True)
    assert next(ev for ev in stream if ev.records)
    stream.stop()
    list(stream.raw())


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def run_label(samples: Samples) -> str:
    """The one direct run of a test's own daemon."""
    labels = {dict(ls)["gadget_instance"] for (n, ls), _ in samples.items()
              if n == "gadgetpipe_records_produced_total"
              and dict(ls)["gadget_instance"].startswith("run-")}
    assert len(labels) == 1, labels
    return labels.pop()


class Reader:
    """Reads a run's stream in a thread: records, warn logs, and how it ended."""

    def __init__(self, stream: RunStream) -> None:
        self.stream = stream
        self.records = 0
        self.warnings: list[str] = []
        self.first_record = threading.Event()
        self.ready = threading.Event()
        self.error: grpc.RpcError | None = None
        self.ended = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        try:
            for ev in self.stream:
                if ev.ready:
                    self.ready.set()
                if ev.log is not None and ev.severity <= WARN:
                    self.warnings.append(ev.log)
                self.records += len(ev.records)
                if ev.records:
                    self.first_record.set()
        except grpc.RpcError as e:
            self.error = e
        finally:
            self.ended.set()

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until the gadget traces (its ready event): what a workload does from then on is
        seen. Fails at once if the stream ends first."""
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.1):
            assert not self.ended.is_set(), f"the stream ended before it traced: {self.error}"
            assert time.monotonic() < deadline, f"not tracing after {timeout} s"

    def join(self, timeout: float) -> None:
        self._t.join(timeout)
        assert not self._t.is_alive(), "the stream did not end"


# -- the state dir --------------------------------------------------------------------------------


def test_read_only_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with tmpfs(state, "1m"), DaemonProcess(state_dir=state) as d:
        assert d.proc is not None
        gadgets = state / "gadgets"
        with d.client() as c:
            kept = create(c, "kept")
            programs = len(bpf_programs_of(d.proc.pid))
            remount(state, "ro")
            with pytest.raises(grpc.RpcError) as e:
                create(c, "refused")
            details = e.value.details() or ""
            assert e.value.code() == grpc.StatusCode.INTERNAL
            assert f"persisting gadget instance: writing {gadgets}/" in details, details
            assert "Read-only file system" in details, details
            # Nothing half-written, nothing half-started: no file, no listing, no program.
            assert files(gadgets) == [f"{kept.id}.gadget"]
            assert names(c) == ["kept"]
            assert len(bpf_programs_of(d.proc.pid)) == programs
            # Removing cannot persist either: refused, and the instance keeps running.
            resp = c.instances.RemoveGadgetInstance(pb.GadgetInstanceId(id=kept.id))
            assert resp.result == 1
            assert f"removing {gadgets}/{kept.id}.gadget" in resp.message, resp.message
            assert "Read-only file system" in resp.message, resp.message
            got = c.instances.GetGadgetInstance(pb.GadgetInstanceId(id=kept.id))
            assert got.state.status == pb.StatusRunning
            still_serves(c, tmp_path)
            remount(state, "rw")
            again = create(c, "after")
            assert files(gadgets) == sorted([f"{kept.id}.gadget", f"{again.id}.gadget"])
            for gi in (kept, again):
                assert c.instances.RemoveGadgetInstance(pb.GadgetInstanceId(id=gi.id)).result == 0
            assert files(gadgets) == []


def test_full_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with tmpfs(state, "64k"), DaemonProcess(state_dir=state) as d:
        gadgets = state / "gadgets"
        filler = state / "filler"
        with contextlib.suppress(OSError), filler.open("wb", buffering=0) as f:
            while True:  # until ENOSPC
                f.write(b"\0" * 4096)
        with d.client() as c:
            with pytest.raises(grpc.RpcError) as e:
                create(c, "refused")
            details = e.value.details() or ""
            assert e.value.code() == grpc.StatusCode.INTERNAL
            assert f"persisting gadget instance: writing {gadgets}/" in details, details
            assert "No space left on device" in details, details
            assert files(gadgets) == []  # the temporary file was removed too
            assert names(c) == []
            still_serves(c, tmp_path)
            filler.unlink()
            gi = create(c, "after")
            assert files(gadgets) == [f"{gi.id}.gadget"]
            assert c.instances.RemoveGadgetInstance(pb.GadgetInstanceId(id=gi.id)).result == 0


# -- SIGTERM while a run streams ------------------------------------------------------------------


def test_sigterm_while_a_run_streams_drains_it_to_the_client(tmp_path: Path) -> None:
    """Records still in the ring when SIGTERM comes reach the client, which then sees OK."""
    binary = unique_binary(tmp_path)
    count = 50
    d = DaemonProcess().start()
    try:
        with d.client() as c:
            # A long drain interval, and a ring far from its wake-up level: the records wait in
            # the ring until the stop drains it.
            reader = Reader(c.run("trace_exec", {"operator.oci.ebpf.comm": binary.name[:15],
                                                 "operator.bcc.drain-interval": "30s"}))
            reader.wait_ready()
            done = subprocess.run([str(exec_loop_path()), "-p", str(binary), str(count)],
                                  capture_output=True, text=True, check=True)
            assert json.loads(done.stdout)["failed"] == 0
            assert reader.records == 0, "drained before the stop: the test proves nothing"
            t0 = time.monotonic()
            d.send_signal(signal.SIGTERM)
            reader.join(DRAIN_DEADLINE)
            assert d.wait(DRAIN_DEADLINE) == 0
            took = time.monotonic() - t0
        assert reader.error is None, f"{reader.error.code()}: {reader.error.details()}"
        assert reader.records == count
        assert took < DRAIN_DEADLINE
    finally:
        d.close()


# -- Prometheus killed and restarted --------------------------------------------------------------


def test_prometheus_killed_and_restarted_scrapes_again(tmp_path: Path) -> None:
    port = free_port()
    binary = unique_binary(tmp_path)
    with DaemonProcess("--metrics-listen", f"127.0.0.1:{port}") as d, \
            PrometheusServer([f"127.0.0.1:{port}"]) as prom, d.client() as c:
        reader = Reader(c.run("trace_exec", {"operator.oci.ebpf.comm": binary.name[:15]}))
        with keep_running([str(binary)], interval=0.05):
            assert reader.first_record.wait(30)
            label = run_label(scrape(port))
            series = (f'gadgetpipe_records_produced_total{{gadget_instance="{label}",'
                      'stage="source"}')
            before = float(prom.wait_for(series, timeout=60)[0]["value"][1])
            prom.kill()
            # The daemon does not notice: it keeps counting, its endpoint keeps answering.
            mid = sample(scrape(port), "gadgetpipe_records_produced_total", gadget_instance=label,
                         stage="source")
            assert mid >= before
            deadline = time.monotonic() + 30
            while sample(scrape(port), "gadgetpipe_records_produced_total",
                         gadget_instance=label, stage="source") <= mid:
                assert time.monotonic() < deadline, "the daemon stopped counting"
                time.sleep(0.05)  # polling the endpoint
            prom.start()
            after = prom.wait_for(series, lambda r: bool(r) and float(r[0]["value"][1]) > mid,
                                  timeout=60)
        assert float(after[0]["value"][1]) > before
        assert prom.query_value(f'up{{instance="127.0.0.1:{port}"}}') == 1
        # Monotonic across the whole history Prometheus kept, before and after its crash.
        assert prom.query_value(f"resets({series}[10m])") == 0
        reader.stream.stop()
        reader.join(30)
        assert reader.error is None
        assert d.proc is not None and d.proc.poll() is None


# -- the ring overrun on purpose ------------------------------------------------------------------


def test_ring_overrun_is_told_and_accounted(tmp_path: Path) -> None:
    """A ring of two trace_exec records, drained every 20 ms, against an exec storm: the client
    hears of the losses (warn log) and produced + kernel lost = what the generator made."""
    port = free_port()
    binary = unique_binary(tmp_path)
    count = 2000
    with DaemonProcess("--metrics-listen", f"127.0.0.1:{port}") as d, d.client() as c:
        reader = Reader(c.run("trace_exec", {
            "operator.oci.ebpf.comm": binary.name[:15],
            "operator.bcc.ringbuf-size": "16384",   # 4 pages: two 5.7 KiB records
            "operator.bcc.wakeup-fill": "100",      # no early wake-up: drained on the timer only
            "operator.bcc.drain-interval": "20ms",
            "operator.grpc.batch-max": "256"}))
        reader.wait_ready()
        done = subprocess.run([str(exec_loop_path()), "-p", str(binary), str(count)],
                              capture_output=True, text=True, check=True)
        made = json.loads(done.stdout)
        assert made["failed"] == 0
        reader.stream.stop()  # the stop drains what the ring still holds
        reader.join(30)
        assert reader.error is None
        m = scrape(port)
    label = run_label(m)
    produced = sample(m, "gadgetpipe_records_produced_total", gadget_instance=label,
                      stage="source")
    lost = sample(m, "gadgetpipe_kernel_lost_records_total", gadget_instance=label)
    kernel = sample(m, "gadgetpipe_records_dropped_total", gadget_instance=label, stage="kernel",
                    reason="ringbuf_full")
    print(f"\nring overrun: generated {count}, produced {produced:.0f}, kernel lost {lost:.0f}, "
          f"client received {reader.records}")
    assert lost > 0, "the ring did not overrun"
    assert kernel == lost
    assert produced + lost == count
    # Every produced record reached the client or is counted as dropped on its way.
    grpc_dropped = sum(v for (n, ls), v in m.items() if n == "gadgetpipe_records_dropped_total"
                       and dict(ls)["gadget_instance"] == label
                       and dict(ls)["stage"].startswith("grpc:"))
    assert reader.records + grpc_dropped == produced
    assert any("kernel ring buffer full" in w for w in reader.warnings), reader.warnings


def test_a_ring_too_small_for_one_record_is_refused(daemon: DaemonProcess) -> None:
    with daemon.client() as c, pytest.raises(grpc.RpcError) as e:
        list(c.run("trace_exec", {"operator.bcc.ringbuf-size": "4096"}).raw())
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert re.search(r"ringbuf-size: a ring of 4096 bytes cannot hold one 'exec' record "
                     r"\(\d+ bytes\); use at least 8192", e.value.details() or ""), \
        e.value.details()
