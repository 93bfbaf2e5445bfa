"""Work nobody waits for is not done: runs whose clients left before their compile are dropped
from the compile queue (api/compile_queue.py), the queue is bounded per client and in all, and
the daemon gives memory back once runs end.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.client import GadgetClient, RunStream
from tests.daemon import DaemonProcess
from tests.e2e.helpers import bpf_programs_of, unique_binary
from tests.peers.ports import free_port

pytestmark = pytest.mark.bpf

BURST = 200
CONCURRENT = 30
OUTCOMES = "gadgetpipe_compile_queue_runs_total"


def outcomes(port: int) -> dict[str, float]:
    """The compile queue's runs by outcome (compiled, abandoned, refused)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {s.labels["outcome"]: s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == OUTCOMES}


def rss_anon_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no RssAnon for pid {pid}")


def end(stream: RunStream) -> None:
    stream.stop()
    for _ in stream.raw():  # the daemon drains the run, then ends the stream with OK
        pass


@pytest.fixture
def daemon() -> Iterator[tuple[DaemonProcess, int]]:
    port = free_port()
    with DaemonProcess("--metrics-listen", f"127.0.0.1:{port}", "--compile-queue", "256",
                       "--compile-queue-per-client", "256") as d:
        yield d, port


def test_a_burst_of_cancelled_runs_is_not_compiled_and_the_next_run_is_compiled_next(
        daemon: tuple[DaemonProcess, int], tmp_path: Path) -> None:
    d, port = daemon
    assert d.proc is not None
    binary = unique_binary(tmp_path)
    programs = len(bpf_programs_of(d.proc.pid))
    with d.client() as c:
        before = outcomes(port)
        t0 = time.monotonic()
        burst = [c.run("trace_exec", {"operator.oci.ebpf.comm": "gp-burst"})
                 for _ in range(BURST)]
        for s in burst:  # all gone within a few hundred milliseconds of starting
            s.cancel()
        burst_ms = (time.monotonic() - t0) * 1000
        # A call answered on the same connection: the daemon has seen every cancel before it.
        c.info("trace_exec")
        mid = outcomes(port)
        t1 = time.monotonic()
        stream = c.run("trace_exec", {"operator.oci.ebpf.comm": binary.name[:15]})
        stream.wait_ready()
        ready_s = time.monotonic() - t1
        after = outcomes(port)
        subprocess.run([str(binary)], check=True)
        assert next(ev for ev in stream if ev.records)
        first_s = time.monotonic() - t1
        end(stream)
    burst_compiled = mid["compiled"] - before["compiled"]
    abandoned = mid["abandoned"] - before["abandoned"]
    print(f"\n{BURST} runs opened and cancelled in {burst_ms:.0f} ms; the next run traced "
          f"after {ready_s:.2f} s, its first record after {first_s:.2f} s; of the burst, "
          f"{burst_compiled:.0f} got their compile turn before their client left, "
          f"{abandoned:.0f} left the queue uncompiled")
    # Compiled next: no run of the burst got a turn once its client had gone.
    assert after["compiled"] - mid["compiled"] == 1
    assert after["abandoned"] == mid["abandoned"] and after["refused"] == before["refused"]
    deadline = time.monotonic() + 30
    while len(bpf_programs_of(d.proc.pid)) > programs:  # the last compile is freed too
        assert time.monotonic() < deadline, "BPF programs leaked"
        time.sleep(0.2)


def test_memory_goes_back_after_concurrent_runs_close(daemon: tuple[DaemonProcess, int],
                                                       ) -> None:
    d, _ = daemon
    assert d.proc is not None
    pid = d.proc.pid
    with d.client() as c:
        end_after_ready(c)  # the libraries a run loads stay: count from after one run
        baseline = rss_anon_mib(pid)
        streams = [c.run("trace_exec", {"operator.oci.ebpf.comm": "gp-concurrent"})
                   for _ in range(CONCURRENT)]
        for s in streams:
            s.wait_ready()
        peak = rss_anon_mib(pid)
        for s in streams:
            end(s)
    # The daemon trims its heap once the burst of run ends is over (api/run_session.py), with
    # one malloc arena (pipeline/heap.py) and no module kept alive (tracer.free_bpf): most of
    # what the runs took goes back; what stays is the heap's fragmentation.
    took = peak - baseline
    assert took > 20, "the runs took no memory: the test proves nothing"
    deadline = time.monotonic() + 20
    after = rss_anon_mib(pid)
    while after - baseline > took / 2:
        assert time.monotonic() < deadline, (baseline, peak, after)
        time.sleep(0.2)  # polling the daemon's RssAnon
        after = rss_anon_mib(pid)
    print(f"\nRssAnon: {baseline:.0f} MiB idle, {peak:.0f} MiB with {CONCURRENT} runs tracing, "
          f"{after:.0f} MiB after they closed")


def end_after_ready(c: GadgetClient) -> None:
    s = c.run("trace_exec", {"operator.oci.ebpf.comm": "gp-warmup"})
    s.wait_ready()
    end(s)


@pytest.mark.parametrize(("bounds", "message"), [
    (("2", "8"), "runs are waiting to compile their BPF programs, the daemon's limit "
                 "(compile queue: 2 in all)"),
    (("8", "2"), "this client has 2 runs waiting to compile their BPF programs, the limit per "
                 "client (compile queue: 2 per client)"),
], ids=["in-all", "per-client"])
def test_past_its_bounds_the_compile_queue_refuses_with_resource_exhausted(
        bounds: tuple[str, str], message: str) -> None:
    with DaemonProcess("--compile-queue", bounds[0], "--compile-queue-per-client", bounds[1]
                       ) as d, d.client() as c:
        streams = [c.run("trace_exec", {"operator.oci.ebpf.comm": "gp-bound"})
                   for _ in range(8)]
        refused: list[grpc.RpcError] = []
        served = 0
        for s in streams:
            try:
                s.wait_ready()
                served += 1
                end(s)
            except grpc.RpcError as err:
                refused.append(err)
    assert refused, "nothing was refused"
    assert served >= 2
    for r in refused:
        assert r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert message in (r.details() or ""), r.details()
