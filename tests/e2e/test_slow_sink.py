"""A sink that cannot keep up loses its own records, counted, and nobody else's: a JSON-lines
sink writing into a FIFO nobody reads (its writer thread blocks once the pipe is full) beside a
gRPC client that reads everything."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import urllib.request
import uuid
from pathlib import Path

import pytest

from bench.peers import open_loop_path
from pipeline._gen import gadget_service_pb2 as pb
from tests.daemon import DaemonProcess
from tests.e2e.gadget_run import READY_TIMEOUT

pytestmark = pytest.mark.bpf

OPENS = 20_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ledger(port: int) -> dict[tuple[str, str, str], float]:
    """(outcome, stage, reason) -> records, summed over runs."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    out: dict[tuple[str, str, str], float] = {}
    for line in text.decode().splitlines():
        m = re.match(r"^gadgetpipe_records_(\w+)_total\{(.*)\} (\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m[2]))
            key = (m[1], labels.get("stage", ""), labels.get("reason", ""))
            out[key] = out.get(key, 0.0) + float(m[3])
    return out


def test_a_blocked_sink_loses_only_its_own_records(tmp_path: Path) -> None:
    gen = tmp_path / ("gps" + uuid.uuid4().hex[:8])
    shutil.copy(open_loop_path(), gen)
    fifo = tmp_path / "blocked.jsonl"
    os.mkfifo(fifo)
    # A reader that never reads: the daemon's open succeeds, its writes stop at 64 KiB.
    idle_reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)

    def drain() -> None:  # unblocks the sink's writer at the end, so the run can stop
        with open(fifo, "rb") as f:
            while f.read(1 << 16):
                pass

    port = free_port()
    params = {"operator.oci.ebpf.comm": gen.name[:15],
              "operator.jsonl.jsonl-enable": "true", "operator.jsonl.jsonl-path": str(fifo),
              "operator.jsonl.jsonl-max-bytes": "0",
              "operator.jsonl.jsonl-queue-capacity": "256"}
    received = 0
    try:
        with DaemonProcess("--metrics-listen", f"127.0.0.1:{port}") as d, d.client() as c:
            stream = c.run("trace_open", params, timeout_s=120)
            stream.wait_ready(timeout=READY_TIMEOUT)
            loop = subprocess.Popen([str(gen), "-w", "/etc/hostname", str(OPENS), "20000"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert loop.stdin is not None
            loop.stdin.write(b"\n")
            loop.stdin.close()
            assert stream.info is not None
            arrays = {ds.id for ds in stream.info.dataSources if ds.type == 2}
            for ev in stream.raw():
                if ev.type == 0:
                    received += (len(pb.GadgetDataArray.FromString(ev.payload).dataArray)
                                 if ev.dataSourceID in arrays else 1)
                    if received >= OPENS:
                        break
            loop.wait(60)
            counts = ledger(port)
            threading.Thread(target=drain, daemon=True).start()
            stream.stop()
            for _ in stream.raw():
                pass
    finally:
        os.close(idle_reader)
    assert received == OPENS  # the client got every record
    grpc_dropped = sum(v for (o, s, _), v in counts.items() if o == "dropped" and
                       s.startswith("grpc:"))
    sink_full = counts.get(("dropped", "sink:jsonl", "queue_full"), 0.0)
    assert grpc_dropped == 0
    assert sink_full > 0  # the sink lost records, and said so
    assert counts.get(("produced", "sink:jsonl", ""), 0.0) >= OPENS
