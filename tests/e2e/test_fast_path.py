"""The fast path through the real daemon: per-record and batched streams, a grpcio and a grpc-go
client, a client that stops reading, and the drain on stop. Records are decoded only from the
announced field table (tests/specdecode.py). No assertion here is about speed.

Runs are attached when the daemon holds the gadget's BPF programs (its tracepoints are attached
while they load); load generators start only then, so every record they cause is expected.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from api.client import RunStream
from bench.peers import goclient_path, open_loop_path
from pipeline._gen import gadget_service_pb2 as pb
from tests.daemon import DaemonProcess
from tests.e2e.helpers import unique_binary
from tests.specdecode import field_value

pytestmark = pytest.mark.bpf

PR_SET_NAME = 15


# ---- helpers --------------------------------------------------------------------------------


READY_TIMEOUT = 120.0
"""Seconds a run may take to compile and attach (a busy machine compiles slowly)."""


class Reader(threading.Thread):
    """Reads one grpcio RunStream in the background, keeping payload packets with their
    decoded elements."""

    def __init__(self, stream: RunStream) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.info: pb.GadgetInfo | None = None
        self.packets: list[tuple[int, int, list[pb.DataElement]]] = []  # seq, ds type, elements
        self.error: BaseException | None = None
        self.ready = threading.Event()
        """Set when the gadget traces (its ready event)."""
        self._cond = threading.Condition()
        self.start()

    def run(self) -> None:
        try:
            for ev in self.stream.raw():
                if self.stream.ready:
                    self.ready.set()
                with self._cond:
                    if ev.type == 4:
                        self.info = pb.GadgetInfo.FromString(ev.payload)
                    elif ev.type == 0:
                        assert self.info is not None, "payload before GadgetInfo"
                        ds_type = {d.id: d.type for d in self.info.dataSources}[ev.dataSourceID]
                        if ds_type == 2:
                            els = list(pb.GadgetDataArray.FromString(ev.payload).dataArray)
                        else:
                            els = [pb.GadgetData.FromString(ev.payload).data]
                        self.packets.append((ev.seq, ds_type, els))
                    self._cond.notify_all()
        except BaseException as e:
            self.error = e

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.1):
            assert self.is_alive(), f"the stream ended before it traced: {self.error}"
            assert time.monotonic() < deadline, f"not tracing after {timeout} s"

    def elements(self) -> list[pb.DataElement]:
        with self._cond:
            return [el for _, _, els in self.packets for el in els]

    def wait(self, pred: Callable[[list[pb.DataElement]], bool], timeout: float,
             what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred([el for _, _, els in self.packets for el in els]):
                left = deadline - time.monotonic()
                if left <= 0 or not self.is_alive():
                    raise AssertionError(f"stream: no {what} (error: {self.error})")
                self._cond.wait(min(left, 0.2))

    def finish(self, timeout: float = 60.0) -> None:
        """Sends a stop request and waits for the server to end the stream."""
        self.stream.stop()
        self.join(timeout)
        assert not self.is_alive(), "the stream did not end after a stop request"

    def fields(self, ds: str) -> dict[str, pb.Field]:
        assert self.info is not None
        d = next(d for d in self.info.dataSources if d.name == ds)
        return {f.fullName: f for f in d.fields}


def decoded(fields: dict[str, pb.Field], el: pb.DataElement, names: list[str]) -> tuple[Any, ...]:
    return tuple(field_value(fields[n], el) for n in names)


@contextlib.contextmanager
def named_thread_opens(comm: str) -> Iterator[Callable[[list[str]], None]]:
    """A thread named ``comm`` (what the kernel-side comm filter sees) that opens the paths it
    is given, in order; the callable returns once they are all opened."""
    jobs: list[list[str] | None] = []
    cond = threading.Condition()
    done = threading.Event()

    def worker() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, comm.encode(), 0, 0, 0)
        while True:
            with cond:
                while not jobs:
                    cond.wait()
                job = jobs.pop(0)
            if job is None:
                return
            for p in job:
                with contextlib.suppress(OSError):
                    os.close(os.open(p, os.O_RDONLY))
            done.set()

    t = threading.Thread(target=worker, daemon=True)
    t.start()

    def submit(paths: list[str]) -> None:
        done.clear()
        with cond:
            jobs.append(paths)
            cond.notify()
        assert done.wait(60), "opener thread stuck"

    try:
        yield submit
    finally:
        with cond:
            jobs.append(None)
            cond.notify()
        t.join(10)


class GoClient:
    """bench/goclient in the background; :meth:`finish` stops it (SIGINT: a stop request) and
    returns its JSON summary."""

    def __init__(self, address: str, image: str, params: dict[str, str],
                 dump: Path | None = None, attach: str | None = None) -> None:
        # -v with log level 4: it prints log events, the ready one among them (wait_ready).
        cmd = [str(goclient_path()), "-addr", address, "-quiet", "-v", "-log-level", "4"]
        cmd += ["-attach", attach] if attach else ["-image", image]
        for k, v in params.items():
            cmd += ["-param", f"{k}={v}"]
        if dump is not None:
            cmd += ["-dump", str(dump)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._stderr: list[bytes] = []
        self._ready = threading.Event()
        # stderr is read all along: a client blocked on a full pipe would stop reading gRPC.
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # until the client exits
            self._stderr.append(line)
            if line.startswith(b"log[4]: gadget tracing"):
                self._ready.set()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until the gadget traces: the client prints the ready log event on stderr."""
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            assert self.proc.poll() is None, f"goclient ended: {b''.join(self._stderr)!r}"
            assert time.monotonic() < deadline, f"not tracing after {timeout} s"

    def finish(self, timeout: float = 60.0) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout)  # stdout holds one summary line: no pipe to fill
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        self._reader.join(10)
        err = b"".join(self._stderr)
        assert out.strip(), f"goclient printed nothing: {err.decode()}"
        summary: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        assert summary["status"] == "OK", summary
        return summary

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def go_dump(path: Path) -> list[tuple[int, pb.DataElement]]:
    out = []
    for line in path.read_text().splitlines():
        d = json.loads(line)
        out.append((d["seq"], pb.DataElement(payload=[bytes.fromhex(p) for p in d["payloads"]])))
    return out


def generator(comm: str, tmp: Path) -> Path:
    """A copy of the open_loop load generator whose comm is ``comm``."""
    path = tmp / comm
    shutil.copy(open_loop_path(), path)
    path.chmod(0o755)
    return path


def open_loop(binary: Path, count: int, rate: int = 0, target: str = "/etc/hostname",
              ) -> dict[str, Any]:
    out = subprocess.run([str(binary), target, str(count), str(rate)], check=True,
                         capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def rss_kb(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v) for k, v in re.findall(r"^(VmRSS|RssAnon|RssFile):\s+(\d+) kB", status,
                                             re.M)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = []
    for line in text.splitlines():
        m = re.match(r"^(gadgetpipe_\w+)(?:\{(.*)\})? ([-+0-9.eE]+|NaN)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[2] or ""))
            out.append((m[1], labels, float(m[3])))
    return out


def grpc_stages(port: int) -> dict[str, dict[str, float]]:
    """Per gRPC stream stage: records produced into it, delivered, dropped and queued."""
    out: dict[str, dict[str, float]] = {}
    names = {"gadgetpipe_records_produced_total": "produced",
             "gadgetpipe_records_delivered_total": "delivered",
             "gadgetpipe_records_dropped_total": "dropped",
             "gadgetpipe_queue_depth_records": "queued"}
    for name, labels, v in scrape(port):
        # The ledger's families name the stage ``stage``; the queue gauges name it ``edge``.
        stage = labels.get("stage") or labels.get("edge") or ""
        if name in names and stage.startswith("grpc:"):
            row = out.setdefault(stage, dict.fromkeys(names.values(), 0.0))
            row[names[name]] += v
    return out


def wait_stages(port: int, what: str, pred: Callable[[dict[str, float]], bool],
                streams: int = 2, timeout: float = 60.0) -> None:
    """Until ``streams`` gRPC stages exist and ``pred`` holds for each (polling /metrics)."""
    deadline = time.monotonic() + timeout
    while True:
        stages = grpc_stages(port)
        assert all(name.startswith("grpc:") for name in stages)
        if len(stages) >= streams and all(pred(r) for r in stages.values()):
            return
        assert time.monotonic() < deadline, f"{what}: {stages}"
        time.sleep(0.05)


def unique_comm(prefix: str) -> str:
    return f"{prefix}{os.urandom(5).hex()}"[:15]


# ---- tests ----------------------------------------------------------------------------------


def test_batched_and_per_record_streams_carry_the_same_records(daemon: DaemonProcess) -> None:
    """Two runs on one trigger: one upstream-style (a GadgetEvent per record), one with
    GadgetDataArray packets; the same files, opened once each, in the same order."""
    assert daemon.proc is not None
    comm = unique_comm("gpfp")
    params = {"operator.oci.ebpf.comm": comm}
    total = 3000
    paths = [f"/gp-fast-path/{comm}/{i}" for i in range(total)]
    with daemon.client() as c1, daemon.client() as c2:
        per_record = Reader(c1.run("trace_open", params))
        batched = Reader(c2.run("trace_open", {**params, "operator.grpc.batch-max": "64",
                                               "operator.grpc.batch-linger": "5ms"}))
        per_record.wait_ready()
        batched.wait_ready()
        with named_thread_opens(comm) as opener:
            for chunk in range(0, total, 500):  # bursts: several drains, several batch sizes
                opener(paths[chunk: chunk + 500])
            end = f"/gp-fast-path/{comm}/end"
            opener([end])
        for r in (per_record, batched):
            fname = r.fields("open")["fname"]

            def ended(els: list[pb.DataElement], fname: pb.Field = fname) -> bool:
                return any(field_value(fname, e) == end.encode() for e in els)

            r.wait(ended, 60, "end marker")
        per_record.finish()
        batched.finish()
    assert per_record.error is None and batched.error is None
    assert per_record.info is not None and batched.info is not None
    assert [d.type for d in per_record.info.dataSources] == [1]
    assert [d.type for d in batched.info.dataSources] == [2]
    assert all(t == 1 and len(els) == 1 for _, t, els in per_record.packets)
    assert all(t == 2 for _, t, _ in batched.packets)
    assert max(len(els) for _, _, els in batched.packets) > 1
    assert max(len(els) for _, _, els in batched.packets) <= 64
    # Per-record seq is the record's position (+1); batched seq counts packets. No gaps.
    for r in (per_record, batched):
        seqs = [s for s, _, _ in r.packets]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    names = ["fname", "proc.comm", "proc.pid", "proc.tid", "error_raw", "flags_raw"]
    rows_a = [decoded(per_record.fields("open"), e, names) for e in per_record.elements()]
    rows_b = [decoded(batched.fields("open"), e, names) for e in batched.elements()]
    want = [p.encode() for p in paths] + [end.encode()]
    assert [r[0] for r in rows_a] == want
    assert rows_a == rows_b
    assert {r[1] for r in rows_a} == {comm.encode()}
    assert {r[2] for r in rows_a} == {os.getpid()}


def test_grpcio_and_go_clients_see_identical_records(daemon: DaemonProcess,
                                                     tmp_path: Path) -> None:
    assert daemon.proc is not None
    binary = unique_binary(tmp_path)
    comm = binary.name[:15]
    params = {"operator.oci.ebpf.comm": comm}
    dump = tmp_path / "go.jsonl"
    n = 40
    go = GoClient(daemon.address, "trace_exec", params, dump=dump)
    try:
        with daemon.client() as c:
            py = Reader(c.run("trace_exec", params))
            go.wait_ready()
            py.wait_ready()
            for i in range(n):
                subprocess.run([str(binary), f"rec-{i}"], check=True)
            py.wait(lambda els: len(els) >= n, 60, f"{n} exec records")
            py.finish()
        summary = go.finish()
    finally:
        go.kill()
    fields = py.fields("exec")
    names = ["proc.pid", "proc.comm", "proc.parent.pid", "file", "args", "args_count",
             "error_raw", "proc.creds.uid"]
    from_py = [decoded(fields, e, names) for e in py.elements()]
    go_records = go_dump(dump)
    from_go = [decoded(fields, e, names) for _, e in go_records]
    assert len(from_py) == n
    assert from_go == from_py
    assert [r[4] for r in from_py] == [f"{binary}\u00a0rec-{i}".encode() for i in range(n)]
    assert summary["records"] == n and summary["lost"] == 0 and summary["invalid"] == 0
    assert [s for s, _ in go_records] == list(range(1, n + 1))


def test_upstream_style_client_never_gets_an_array_packet(daemon: DaemonProcess,
                                                          tmp_path: Path) -> None:
    """grpc-go, no batch-max: data source type 1 and one GadgetData per event, however large
    the drained batches (the Go client counts a GadgetData with two elements as invalid)."""
    assert daemon.proc is not None
    comm = unique_comm("gpol")
    gen = generator(comm, tmp_path)
    count = 60000
    go = GoClient(daemon.address, "trace_open", {"operator.oci.ebpf.comm": comm},
                  dump=tmp_path / "go.jsonl")
    try:
        go.wait_ready()
        # The loader's own opens happen before the loop; they are traced too (same comm).
        open_loop(gen, count)
        summary = go.finish()
    finally:
        go.kill()
    assert [d["type"] for d in summary["datasources"]] == [1]
    assert summary["invalid"] == 0 and summary["unknown"] == 0 and summary["lost"] == 0
    assert count <= summary["records"] <= count + 10
    # One record per message: the records plus GadgetInfo (and any log events).
    assert summary["messages"] == summary["records"] + 1 + summary["logs"]
    records = go_dump(tmp_path / "go.jsonl")
    # Payload 0 is the BPF record; a client that selected no fields also gets one payload per
    # announced derived field (pipeline/derive).
    with daemon.client() as c:
        info = c.info("trace_open")
    payloads = max(f.payloadIndex for f in info.dataSources[0].fields) + 1
    assert payloads > 1
    assert all(len(e.payload) == payloads and len(e.payload[0]) == 344 for _, e in records)
    assert [s for s, _ in records] == list(range(1, len(records) + 1))


def test_a_client_that_stops_reading(tmp_path: Path) -> None:
    """One of two clients is frozen (SIGSTOP) during a sustained load: the daemon's memory stays
    bounded, the other client gets everything, the frozen one's losses are seq gaps once it
    resumes, and the ledger's drop counter for its stream says the same number."""
    port = free_port()
    comm = unique_comm("gpol")
    gen = generator(comm, tmp_path)
    params = {"operator.oci.ebpf.comm": comm}
    load, rate, tail = 400_000, 50_000, 2_000
    with DaemonProcess("--metrics-listen", f"127.0.0.1:{port}") as d:
        assert d.proc is not None
        pid = d.proc.pid
        fast = GoClient(d.address, "trace_open", params)
        slow = GoClient(d.address, "trace_open", params)
        try:
            fast.wait_ready()
            slow.wait_ready()
            open_loop(gen, 1000)  # warm both streams up
            wait_stages(port, "warm-up records handed to both streams",
                        lambda r: r["delivered"] >= 1000)
            rss0 = rss_kb(pid)
            slow.proc.send_signal(signal.SIGSTOP)
            peak = dict(rss0)
            stop_sampling = threading.Event()

            def sample() -> None:
                while not stop_sampling.wait(0.05):
                    for k, v in rss_kb(pid).items():
                        peak[k] = max(peak[k], v)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            open_loop(gen, load, rate)  # ~137 MB of records, 8 s
            stop_sampling.set()
            sampler.join()
            slow.proc.send_signal(signal.SIGCONT)
            # The frozen client's queue empties into its stream before the tail is made, so
            # the tail is not dropped and follows every gap.
            wait_stages(port, "both streams' queues drained", lambda r: r["queued"] == 0)
            open_loop(gen, tail)
            total = 1000 + load + tail
            wait_stages(port, "every record handed on or dropped",
                        lambda r: r["delivered"] + r["dropped"] >= total and r["queued"] == 0)
            fast_summary = fast.finish()
            slow_summary = slow.finish()
        finally:
            with contextlib.suppress(Exception):
                slow.proc.send_signal(signal.SIGCONT)
            fast.kill()
            slow.kill()
        metrics = scrape(port)
    produced = fast_summary["records"]
    assert produced >= 1000 + load + tail
    assert fast_summary["lost"] == 0
    assert slow_summary["lost"] > 0, "the frozen client lost nothing: the load was too small"
    # Every record the frozen client did not get is a gap in its seq: nothing silent.
    assert slow_summary["records"] + slow_summary["lost"] == produced
    drops: dict[tuple[str, str], float] = {}  # by stream, every reason summed
    for name, labels, v in metrics:
        if name == "gadgetpipe_records_dropped_total" and labels["stage"].startswith("grpc:"):
            key = (labels["gadget_instance"], labels["stage"])
            drops[key] = drops.get(key, 0.0) + v
    assert sum(drops.values()) == slow_summary["lost"], drops
    assert len([v for v in drops.values() if v]) == 1, "only the frozen client's stream drops"
    kernel = sum(v for name, _, v in metrics if name == "gadgetpipe_kernel_lost_records_total")
    assert kernel == 0
    grown_mb = (peak["RssAnon"] - rss0["RssAnon"]) / 1024
    print(f"frozen client: produced {produced}, got {slow_summary['records']}, gaps "
          f"{slow_summary['lost']}; daemon RssAnon {rss0['RssAnon'] // 1024} MB -> peak "
          f"{peak['RssAnon'] // 1024} MB")
    assert grown_mb < 64, f"anonymous memory grew {grown_mb:.0f} MB under a frozen client"


def test_records_submitted_just_before_a_stop_are_delivered(daemon: DaemonProcess,
                                                            tmp_path: Path) -> None:
    """With the timed drain far away (10 s), the K records are still in the ring when the stop
    request arrives: only the drain on stop can deliver them."""
    assert daemon.proc is not None
    binaries = [unique_binary(tmp_path, "gpst") for _ in range(3)]
    k = 30
    with daemon.client() as c:
        r = Reader(c.run("trace_exec", {"operator.filter.filter": "proc.comm~^gpst",
                                        "operator.bcc.drain-interval": "10s"}))
        r.wait_ready()
        t0 = time.monotonic()
        for i in range(k):
            subprocess.run([str(binaries[i % 3]), f"k{i}"], check=True)
        assert time.monotonic() - t0 < 8, "too slow to stay ahead of the 10 s timed drain"
        assert r.elements() == [], "a timed drain ran: the test proves nothing"
        r.finish()
    assert r.error is None
    fields = r.fields("exec")
    args = [field_value(fields["args"], e) for e in r.elements()]
    assert args == [f"{binaries[i % 3]}\u00a0k{i}".encode() for i in range(k)]
