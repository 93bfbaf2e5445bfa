"""Consumer CPU per event: the mmap batch reader against bcc's per-record callback.

One BPF program (a trace_open-like 288-byte record from ``sys_enter_openat``, written only for
the load generator's pid, through ``gadget_ringbuf.h``: no-wakeup submits, a forced wake-up past
a quarter of the ring) is loaded twice in one run, each time fed by a fresh unthrottled C
open/close loop (``bench/loadgen/open_loop.c``, compiled here with ``cc -O2``):

- ours: ``RingReader.drain()`` on a forced wake-up (``RingWakeups``) or every ``--interval``
  seconds;
- baseline: ``open_ring_buffer(cb)``, then ``ring_buffer_poll(interval)`` followed by
  ``ring_buffer_consume()`` (libbpf only consumes the rings epoll reported, and with no-wakeup
  submits most drains are timed), with a callback that only counts.

The consumer's CPU (``time.thread_time()`` over its whole loop, waits included) is divided by
the records it received. Prints one line::

    drain trace_open: us_per_event=X baseline_us_per_event=Y

followed by the details of each side, and of a third run that shows what the wake-ups cost: the
callback consumer on the program built with ``-DSUBMIT_LIKE_BCC_TOOLS`` (submit flags 0, the
kernel wakes the reader whenever it has caught up, i.e. about once per record), which is how
bcc's own tools run. Needs root, bcc and a C compiler.

Usage: ``.venv/bin/python bench/bench_drain.py [--opens N] [--ring-pages P] [--interval S]``
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "bench" / "loadgen" / "open_loop.c"
RECORD_SIZE = 288

PROGRAM = r"""
#include "gadget_ringbuf.h"

struct event {
    u64 timestamp;
    u32 pid;
    u32 tid;
    u32 uid;
    u32 gid;
    s32 flags;
    u32 mode;
    char comm[16];
    char fname[240];
};

GADGET_RINGBUF(events, RING_PAGES, 1);
#include "gadget_lost.h"

TRACEPOINT_PROBE(syscalls, sys_enter_openat)
{
    u64 id = bpf_get_current_pid_tgid();
    if ((u32)(id >> 32) != TARGET_PID)
        return 0;
    struct event *e = gadget_reserve(events, sizeof(*e));
    if (!e)
        return 0;
    u64 ug = bpf_get_current_uid_gid();
    e->timestamp = bpf_ktime_get_boot_ns();
    e->pid = id >> 32;
    e->tid = (u32)id;
    e->uid = (u32)ug;
    e->gid = ug >> 32;
    e->flags = args->flags;
    e->mode = args->mode;
    bpf_get_current_comm(e->comm, sizeof(e->comm));
    bpf_probe_read_user_str(e->fname, sizeof(e->fname), args->filename);
#ifdef SUBMIT_LIKE_BCC_TOOLS
    bpf_ringbuf_submit(e, 0);  /* the kernel's adaptive wake-up, as bcc's tools submit */
#else
    gadget_submit(events, e);
#endif
    return 0;
}
"""


@dataclass
class Result:
    events: int
    lost: int
    cpu_s: float
    drains: int
    opens_per_s: float

    @property
    def us_per_event(self) -> float:
        return self.cpu_s * 1e6 / self.events if self.events else float("nan")


def build_loadgen(tmp: Path) -> Path:
    exe = tmp / "open_loop"
    subprocess.run(["cc", "-O2", "-o", str(exe), str(LOADGEN)], check=True)
    return exe


def run_side(bcc: Any, loadgen: Path, target: Path, args: argparse.Namespace,
             consume: Callable[[Any, subprocess.Popen[bytes]], tuple[int, float, int]],
             cflags: tuple[str, ...] = ()) -> Result:
    """Starts the generator paused, loads the program for its pid, lets it run while
    ``consume`` drains, and collects what each side counted."""
    from pipeline.gadget import BPF_INCLUDE_DIR
    from pipeline.sources.ringbuf import read_lost

    gen = subprocess.Popen([str(loadgen), "-w", str(target), str(args.opens)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        bpf = bcc.BPF(text=PROGRAM.encode(), cflags=[
            f"-I{BPF_INCLUDE_DIR}", f"-DTARGET_PID={gen.pid}", f"-DRING_PAGES={args.ring_pages}",
            *cflags])
        try:
            events, cpu, drains = consume(bpf, gen)
            lost = read_lost(bpf[b"gadget_lost"])
        finally:
            bpf.cleanup()
        # stdin is closed already, which communicate() would trip over.
        out = gen.stdout.read() if gen.stdout is not None else b""
        gen.wait(timeout=60)
    finally:
        if gen.poll() is None:
            gen.kill()
            gen.wait()
    report = json.loads(out)
    return Result(events, lost, cpu, drains, float(report["rate"]))


def release(gen: subprocess.Popen[bytes]) -> None:
    """Lets the paused generator (``open_loop -w``) start its loop."""
    if gen.stdin is None:
        raise RuntimeError("the generator was started without a stdin pipe")
    gen.stdin.write(b"go\n")
    gen.stdin.close()


def consume_batches(interval: float) -> Callable[[Any, subprocess.Popen[bytes]],
                                                 tuple[int, float, int]]:
    def consume(bpf: Any, gen: subprocess.Popen[bytes]) -> tuple[int, float, int]:
        from pipeline.sources.ringbuf import RingReader, RingWakeups

        events = drains = 0
        with RingReader(bpf[b"events"].get_fd(), RECORD_SIZE) as reader, \
                RingWakeups([reader.fileno()]) as wakeups:
            poller = select.poll()
            poller.register(wakeups.fileno(), select.POLLIN)
            start = time.thread_time()
            release(gen)
            while True:
                running = gen.poll() is None
                poller.poll(interval * 1000)
                wakeups.consume()
                while True:
                    n = len(reader.drain())
                    events += n
                    drains += 1
                    if n < 65536:
                        break
                if not running:
                    break
            cpu = time.thread_time() - start
        return events, cpu, drains

    return consume


def consume_callbacks(interval: float) -> Callable[[Any, subprocess.Popen[bytes]],
                                                   tuple[int, float, int]]:
    def consume(bpf: Any, gen: subprocess.Popen[bytes]) -> tuple[int, float, int]:
        count = [0]

        def callback(ctx: Any, data: Any, size: int) -> int:
            count[0] += 1
            return 0

        bpf[b"events"].open_ring_buffer(callback)
        timeout_ms = max(1, round(interval * 1000))
        drains = 0
        start = time.thread_time()
        release(gen)
        while True:
            running = gen.poll() is None
            bpf.ring_buffer_poll(timeout_ms)
            bpf.ring_buffer_consume()
            drains += 1
            if not running:
                break
        return count[0], time.thread_time() - start, drains

    return consume


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--opens", type=int, default=1_000_000)
    parser.add_argument("--ring-pages", type=int, default=1024, help="power of two")
    parser.add_argument("--interval", type=float, default=0.002, help="drain period, seconds")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_drain: needs root to load BPF programs", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    import bcc

    with tempfile.TemporaryDirectory(prefix="bench-drain-") as tmp_dir:
        tmp = Path(tmp_dir)
        loadgen = build_loadgen(tmp)
        target = tmp / "target"
        target.write_bytes(b"")
        ours = run_side(bcc, loadgen, target, args, consume_batches(args.interval))
        base = run_side(bcc, loadgen, target, args, consume_callbacks(args.interval))
        tools = run_side(bcc, loadgen, target, args, consume_callbacks(args.interval),
                         ("-DSUBMIT_LIKE_BCC_TOOLS",))
    print(f"drain trace_open: us_per_event={ours.us_per_event:.3f} "
          f"baseline_us_per_event={base.us_per_event:.3f}")
    sides = (("ours", ours), ("baseline", base), ("baseline, submits as bcc tools", tools))
    for name, r in sides:
        print(f"  {name}: us_per_event={r.us_per_event:.3f} events={r.events} lost={r.lost} "
              f"drains={r.drains} "
              f"events_per_drain={r.events / max(r.drains, 1):.0f} cpu_s={r.cpu_s:.3f} "
              f"generator_opens_per_s={r.opens_per_s:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
