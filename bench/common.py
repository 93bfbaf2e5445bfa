"""What every part of the benchmark shares: paths and constants, the two profiles, /proc
readings of the daemon, and the load generator."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
IMAGE = "trace_open"
COMM_PARAM = "operator.oci.ebpf.comm"
def _open_progs() -> int:
    """trace_open's BPF programs: the exits of open, openat and openat2, and their entries
    where the kernel cannot give the exit the arguments (bpf/gadget_syscall.h)."""
    from pipeline.sources.btf import gadget_cflags

    return 3 if "-DGADGET_SYSCALL_ARGS_AT_EXIT=1" in gadget_cflags() else 6


OPEN_PROGS = _open_progs()
TARGET = "/etc/hostname"  # the file the generator opens (exists: the exit path records an fd)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PYTHON = sys.executable
RUN = str(ROOT / "bench" / "run")
"""The entry point; the child roles (``_consume``, ``_pyclient``) run through it too."""


_FANOUT = tuple(int(n) for n in os.environ.get("GADGETPIPE_BENCH_FANOUT", "1,4,16").split(","))
"""Clients per fan-out run (scenario f); the environment variable picks a subset to profile."""


@dataclass
class Profile:
    repeats: int
    count: int  # opens per unthrottled run
    step_seconds: float  # duration of one paced step of the zero-loss ladder
    ladder: tuple[int, ...]  # offered rates; 0 = unthrottled
    ladder_repeats: int
    fanout: tuple[int, ...]
    fanout_count: int
    synthetic_records: int


QUICK = Profile(repeats=3, count=600_000, step_seconds=2.0,
                ladder=(25_000, 50_000, 100_000, 150_000, 200_000, 250_000, 300_000, 0),
                ladder_repeats=1, fanout=_FANOUT, fanout_count=200_000,
                synthetic_records=1_000_000)
FULL = Profile(repeats=5, count=2_000_000, step_seconds=4.0,
               ladder=(25_000, 50_000, 75_000, 100_000, 125_000, 150_000, 200_000, 250_000,
                       300_000, 350_000, 0),
               ladder_repeats=3, fanout=_FANOUT, fanout_count=600_000,
               synthetic_records=4_000_000)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def mem_kb(pid: int) -> dict[str, int]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v) for k, v in re.findall(r"^(VmRSS|RssAnon|RssFile):\s+(\d+) kB", text, re.M)}


class MemPeak:
    """Samples a process's RssAnon and RssFile every 50 ms; keeps the peaks."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = mem_kb(pid)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            with contextlib.suppress(OSError):
                for k, v in mem_kb(self.pid).items():
                    self.peak[k] = max(self.peak.get(k, 0), v)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._t.join()
        return {"rss_anon_mb": self.peak.get("RssAnon", 0) / 1024,
                "rss_file_mb": self.peak.get("RssFile", 0) / 1024}


def bpf_programs(pid: int) -> int:
    n = 0
    for entry in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            n += entry.read_text().count("prog_id:")
    return n


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def peers() -> tuple[Path, Path]:
    from bench.peers import goclient_path, open_loop_path

    return goclient_path(), open_loop_path()


def _reading_stdin(proc: subprocess.Popen[str]) -> bool:
    """Whether ``proc`` sits in read(0, ...): loaded, its own opens done, waiting for go."""
    if proc.poll() is not None:
        raise RuntimeError(f"the generator exited early ({proc.returncode})")
    try:
        fields = Path(f"/proc/{proc.pid}/syscall").read_text().split()
    except OSError:
        return False
    return len(fields) > 1 and fields[0] == "0" and int(fields[1], 16) == 0


class Generator:
    """bench/loadgen/open_loop under a unique name (the kernel-side comm filter matches it and
    nothing else), started with -w: its loader's own opens happen before tracing starts, so the
    traced opens are exactly ``count``. With ``procs`` > 1, that many processes share the count
    and the rate (a workload on every core)."""

    def __init__(self, binary: Path, count: int, rate: int = 0, procs: int = 1) -> None:
        self.count = count
        shares = [count // procs + (1 if i < count % procs else 0) for i in range(procs)]
        self.procs = [subprocess.Popen([str(binary), "-w", TARGET, str(n), str(rate // procs)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                      for n in shares]
        for p in self.procs:
            wait_for(functools.partial(_reading_stdin, p), 30, "the generator to wait for its go")

    def go(self) -> None:
        for p in self.procs:
            if p.stdin is None:
                raise RuntimeError("the generator was started without a stdin pipe")
            p.stdin.write("\n")
            p.stdin.flush()

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def result(self, timeout: float = 600) -> dict[str, Any]:
        """opens, seconds (the slowest process) and rate (all opens over that time)."""
        results = [json.loads(p.communicate(timeout=timeout)[0]) for p in self.procs]
        opens = sum(int(r["opens"]) for r in results)
        seconds = max(float(r["seconds"]) for r in results)
        return {"opens": opens, "seconds": seconds, "rate": opens / seconds if seconds else 0.0}

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def make_generator_binary(tmp: Path, open_loop: Path) -> tuple[Path, str]:
    comm = "gpb" + os.urandom(4).hex()  # 11 characters, well under the 15 of a comm
    path = tmp / comm
    shutil.copy(open_loop, path)
    path.chmod(0o755)
    return path, comm

