"""The daemon under test: ``gadgetpipe serve`` on a private socket with its metrics, and one
client run against it timed from the generator's start."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import (
    OPEN_PROGS,
    OUT,
    PYTHON,
    ROOT,
    Generator,
    bpf_programs,
    cpu_seconds,
    free_port,
    wait_for,
)


class Daemon:
    """``gadgetpipe serve`` on a private socket, with metrics, and no configured instances."""

    def __init__(self, tmp: Path) -> None:
        self.socket = tmp / "gp.sock"
        self.address = f"unix://{self.socket}"
        self.port = free_port()
        config = tmp / "config.yaml"
        config.write_text(f"daemon:\n  metricsListen: 127.0.0.1:{self.port}\ninstances: []\n")
        OUT.mkdir(parents=True, exist_ok=True)
        self.log_path = OUT / "daemon.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [PYTHON, "-m", "api.cli", "serve", "--listen", self.address, "--state-dir",
               str(tmp / "state"), "--metrics-listen", f"127.0.0.1:{self.port}", "--config",
               str(config), "--log-level", "info"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.socket.exists() or self.proc.poll() is not None, 60, "the daemon")
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited: {self.log_path.read_text()[-2000:]}")
        time.sleep(0.3)
        self.pid = self.proc.pid
        self._profiler = self._start_profiler()

    def _start_profiler(self) -> subprocess.Popen[bytes] | None:
        """py-spy on the daemon for the whole bench when ``GADGETPIPE_BENCH_PROFILE`` names an
        output file (raw collapsed stacks: ``bench/profile_top.py`` sums them per function)."""
        out = os.environ.get("GADGETPIPE_BENCH_PROFILE")
        if not out:
            return None
        spy = Path(PYTHON).parent / "py-spy"
        rate = os.environ.get("GADGETPIPE_BENCH_PROFILE_RATE", "200")  # samples per second
        return subprocess.Popen([str(spy), "record", "--pid", str(self.pid), "--rate", rate,
                                 "--format", "raw", "--output", out, "--nonblocking"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def metrics(self) -> dict[str, float]:
        """Sums over runs: kernel losses, drops at gRPC stages, delivered to gRPC stages."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        out = {"kernel_lost": 0.0, "grpc_dropped": 0.0, "grpc_delivered": 0.0,
               "sink_dropped": 0.0, "sink_delivered": 0.0}
        for line in text.splitlines():
            m = re.match(r"^(gadgetpipe_\w+)(?:\{(.*)\})? ([-+0-9.eE]+)$", line)
            if not m:
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m[2] or ""))
            stage = labels.get("stage", "")
            if m[1] == "gadgetpipe_kernel_lost_records_total":
                out["kernel_lost"] += float(m[3])
            elif m[1] == "gadgetpipe_records_dropped_total" and (
                    stage.startswith("grpc:") or stage.startswith("attach")):
                out["grpc_dropped"] += float(m[3])
            elif m[1] == "gadgetpipe_records_delivered_total" and stage.startswith("grpc:"):
                out["grpc_delivered"] += float(m[3])
            elif m[1] == "gadgetpipe_records_dropped_total" and stage.startswith("sink:"):
                out["sink_dropped"] += float(m[3])
            elif m[1] == "gadgetpipe_records_delivered_total" and stage.startswith("sink:"):
                out["sink_delivered"] += float(m[3])
        return out

    def stop(self) -> None:
        if self._profiler is not None:
            self._profiler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            self._profiler.wait(60)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def run_client(cmd: list[str], gen: Generator, daemon: Daemon, programs_before: int,
               count: int, attach: bool = False) -> tuple[dict[str, Any], dict[str, Any], float]:
    """Starts a client, waits until the run is attached, lets the generator go, waits for the
    client (it stops itself after ``count`` records; SIGINT sends the stop otherwise).

    Returns the client's summary, the generator's, and the daemon's CPU seconds from the
    generator's start to the client's end (the BPF compile is not in it)."""
    client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if attach:
            time.sleep(1.0)
        else:
            wait_for(lambda: bpf_programs(daemon.pid) >= programs_before + OPEN_PROGS
                     or client.poll() is not None, 60, "the run's BPF programs")
            time.sleep(0.2)
        if client.poll() is not None:
            raise RuntimeError(f"client exited early: {client.communicate()[1][-2000:]}")
        cpu0 = cpu_seconds(daemon.pid)
        gen.go()
        g = gen.result()
        try:
            out, err = client.communicate(timeout=max(5.0, count / 100_000))
        except subprocess.TimeoutExpired:
            client.send_signal(signal.SIGINT)  # a stop request: the daemon drains, then ends
            out, err = client.communicate(timeout=60)
        cpu = cpu_seconds(daemon.pid) - cpu0
        lines = out.strip().splitlines()
        if not lines:
            raise RuntimeError(f"client printed nothing: {err[-2000:]}")
        return json.loads(lines[-1]), g, cpu
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        gen.kill()
