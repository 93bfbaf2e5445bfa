"""What a gadget's BPF programs cost the host, per traced event, measured by the kernel.

The kernel counts, for every BPF program, how often it ran and for how long (``run_cnt`` and
``run_time_ns`` in ``/proc/<pid>/fdinfo/<prog fd>``) while BPF statistics are on; this module
turns them on with ``BPF_ENABLE_STATS`` (they stay on only while the returned fd is open, so a
crash leaves nothing behind, unlike the ``kernel.bpf_stats_enabled`` sysctl), loads the gadget's
program exactly as the daemon does (same cflags: ring size, wake-up level), lets a load
generator trigger it, drains the ring on a thread as the daemon would, and divides.

``trace_open``: ``bench/loadgen/open_loop`` opens one file COUNT times. Every program of the
gadget is counted (enter and exit, all three syscalls) and the sum is divided by the number of
exit runs, i.e. per traced open; no comm filter is set, so every open on the machine is traced
the same way and counts as an event. ``trace_exec``: ``exec_loop`` runs ``/bin/true``.

Usage: ``.venv/bin/python -m bench.kcost [--count 200000] [--gadget trace_open]``; prints
``kcost trace_open: ns_per_event=X`` and each program's own figure.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET = "/etc/hostname"
_BPF_ENABLE_STATS = 32
_BPF_STATS_RUN_TIME = 0
_SYS_BPF = {"x86_64": 321, "aarch64": 280}


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    """BPF run-time statistics on, for as long as the block runs."""
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise RuntimeError(f"no bpf syscall number known for {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 16)()  # union bpf_attr: enable_stats.type is the first u32
    attr[0] = _BPF_STATS_RUN_TIME
    fd = libc.syscall(nr, _BPF_ENABLE_STATS, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "BPF_ENABLE_STATS (needs root and kernel >= 5.8)")
    try:
        yield
    finally:
        os.close(fd)


def prog_stats(fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of the BPF program behind this process's ``fd``."""
    text = Path(f"/proc/self/fdinfo/{fd}").read_text()
    t = re.search(r"^run_time_ns:\s+(\d+)", text, re.M)
    c = re.search(r"^run_cnt:\s+(\d+)", text, re.M)
    if t is None or c is None:
        raise RuntimeError(f"fd {fd} shows no BPF run statistics")
    return int(t[1]), int(c[1])


@dataclass
class ProgCost:
    name: str
    runs: int
    ns: int

    @property
    def ns_per_run(self) -> float:
        return self.ns / self.runs if self.runs else float("nan")


@dataclass
class Cost:
    gadget: str
    events: int
    """Runs of the programs that emit (one per traced event)."""
    progs: list[ProgCost]
    generated: int

    @property
    def ns_per_event(self) -> float:
        return sum(p.ns for p in self.progs) / self.events if self.events else float("nan")

    def line(self) -> str:
        return f"kcost {self.gadget}: ns_per_event={self.ns_per_event:.0f}"


_LOADS = {"trace_open": "open", "trace_exec": "exec"}


def _generator(gadget: str, count: int) -> list[str]:
    from bench.peers import exec_loop_path, open_loop_path

    if _LOADS[gadget] == "open":
        return [str(open_loop_path()), "-w", TARGET, str(count), "0"]
    return [str(exec_loop_path()), "-w", str(count), "0"]


def measure(gadget: str = "trace_open", count: int = 200_000, text: str | None = None,
            params: dict[str, str] | None = None) -> Cost:
    """Loads ``gadget`` (or ``text``, a variant of its program) as the daemon would and
    measures its programs while the load generator makes ``count`` events."""
    from pipeline.gadget import EBPF_PREFIX, RUNTIME_PREFIX
    from pipeline.params import resolve
    from pipeline.sources.catalog import Catalog
    from pipeline.sources.ringbuf import RingReader
    from pipeline.sources.tracer import COMPILE_LOCK, TracerSource, import_bcc

    if gadget not in _LOADS:
        raise ValueError(f"no load generator for {gadget} (known: {', '.join(_LOADS)})")
    bcc = import_bcc()
    spec = Catalog().resolve(gadget)
    values = resolve(spec.params, dict(params or {}), (EBPF_PREFIX, RUNTIME_PREFIX))
    src = spec.source_factory()(spec, values)
    if not isinstance(src, TracerSource):
        raise ValueError(f"{gadget} is not a ring-buffer tracer")
    cflags = src._cflags
    source = text if text is not None else spec.program.read_text()
    with COMPILE_LOCK:
        b = bcc.BPF(text=source.encode(), cflags=cflags)
    try:
        progs = {name.decode(): f.fd for name, f in b.funcs.items()}
        if not progs:
            raise RuntimeError(f"{gadget}: no programs were loaded")
        readers = [RingReader(b[f"events_{ds.name}".encode() if len(spec.datasources) > 1
                                else b"events"].get_fd(), src.ring_record_size(ds))
                   for ds in spec.datasources]
        stop = threading.Event()

        def drain() -> None:
            while not stop.wait(0.002):
                for r in readers:
                    while len(r.drain()) >= 65536:
                        pass

        drainer = threading.Thread(target=drain, daemon=True)
        gen = subprocess.Popen(_generator(gadget, count), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
        try:
            with bpf_stats():
                drainer.start()
                before = {n: prog_stats(fd) for n, fd in progs.items()}
                assert gen.stdin is not None
                gen.stdin.write("\n")
                gen.stdin.flush()
                out, _ = gen.communicate(timeout=600)
                after = {n: prog_stats(fd) for n, fd in progs.items()}
        finally:
            stop.set()
            if gen.poll() is None:
                gen.kill()
                gen.wait()
            if drainer.is_alive():
                drainer.join()
        costs = [ProgCost(n, after[n][1] - before[n][1], after[n][0] - before[n][0])
                 for n in progs]
        events = sum(c.runs for c in costs if "exit" in c.name) or max(c.runs for c in costs)
        generated = int(json.loads(out.strip().splitlines()[-1]).get("opens", count)
                        if _LOADS[gadget] == "open" else count)
        return Cost(gadget, events, costs, generated)
    finally:
        b.cleanup()


def report(cost: Cost) -> list[str]:
    lines = [f"  {p.name}: {p.runs} runs, {p.ns_per_run:.0f} ns/run"
             for p in sorted(cost.progs, key=lambda p: -p.runs) if p.runs]
    lines.append(f"  {cost.events} traced events for {cost.generated} generated")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kcost", description=__doc__.split("\n")[0])
    ap.add_argument("--gadget", default="trace_open", choices=sorted(_LOADS))
    ap.add_argument("--count", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (BPF)", file=sys.stderr)
        return 2
    costs = [measure(args.gadget, args.count) for _ in range(args.repeats)]
    best = sorted(costs, key=lambda c: c.ns_per_event)[len(costs) // 2]  # the median
    for line in report(best):
        print(line, file=sys.stderr)
    print(best.line())
    return 0


KCOST_GADGETS = ("trace_open", "trace_exec")
"""The gadgets measured by ``bench/run --only k`` (those with a load generator)."""


def run_kcost(bench: Any) -> None:
    """Scenario k of bench/run: one ``kcost`` line per gadget (trace_open's is the summary
    line); the median of the profile's repeats. ``bench`` is bench/session.py's Bench."""
    count = 200_000 if bench.profile.repeats < 5 else 1_000_000
    for gadget in KCOST_GADGETS:
        n = count if gadget == "trace_open" else count // 100  # execs are ~100x slower
        costs = sorted((measure(gadget, n) for _ in range(bench.profile.repeats)),
                       key=lambda c: c.ns_per_event)
        cost = costs[len(costs) // 2]
        bench.raw[f"kcost {gadget}"] = [as_dict(c) for c in costs]
        key = "kcost" if gadget == "trace_open" else f"kcost {gadget}"
        bench.lines[key] = cost.line()


def as_dict(cost: Cost) -> dict[str, Any]:
    return {"gadget": cost.gadget, "events": cost.events, "generated": cost.generated,
            "ns_per_event": cost.ns_per_event,
            "progs": {p.name: {"runs": p.runs, "ns_per_run": p.ns_per_run} for p in cost.progs}}


if __name__ == "__main__":
    sys.exit(main())
