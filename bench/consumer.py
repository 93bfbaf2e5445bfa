"""Child role ``_consume``: a standalone ring consumer (the kernel floor, the drain's cost, and
the bcc baselines), run in its own process so its CPU time is its own."""

from __future__ import annotations

import ctypes
import json
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import IMAGE, PYTHON, RUN, Generator


def consume_main(argv: list[str]) -> None:
    """``_consume MODE GENERATOR COMM COUNT RATE [PROCS]``: loads trace_open's program as the daemon
    would (same cflags: 8 MiB ring, no-wakeup submits, forced wake-up at 25 %), filtered on
    COMM, starts the generator, consumes until it has exited and the ring is empty; prints JSON.

    MODE: ``ours`` (RingReader.drain on a 2 ms timer or a forced wake-up, records discarded);
    ``bcc-count`` (bcc's open_ring_buffer with a callback that only counts, same program);
    ``bcc-json`` (bcc tools' style: the program's two ring calls become bcc's
    ``events.ringbuf_reserve`` / ``events.ringbuf_submit(e, 0)``, i.e. the kernel wakes the
    reader whenever it has caught up, and a ``ring_buffer_poll()`` loop runs a callback that
    casts the record to the struct bcc parsed (what ``.event()`` does; it cannot build nested
    structs itself) and formats a JSON line); ``bcc-json-nowakeup`` (the same callback on the
    unchanged program, polled every 10 ms).
    """
    mode, gen_path, comm, count, rate = argv[0], argv[1], argv[2], int(argv[3]), int(argv[4])
    procs = int(argv[5]) if len(argv) > 5 else 1
    import bcc

    from pipeline.gadget import EBPF_PREFIX, RUNTIME_PREFIX
    from pipeline.params import resolve
    from pipeline.sources.catalog import Catalog
    from pipeline.sources.ringbuf import RingReader, RingWakeups, read_lost
    from pipeline.sources.tracer import COMPILE_LOCK, TracerSource

    spec = Catalog().resolve(IMAGE)
    values = resolve(spec.params, {EBPF_PREFIX + "comm": comm}, (EBPF_PREFIX, RUNTIME_PREFIX))
    cflags = TracerSource(spec, values)._cflags
    gen = Generator(Path(gen_path), count, rate, procs)
    text = spec.program.read_text()
    if mode == "bcc-json":
        for old, new in (("gadget_reserve(events, sizeof(*r))",
                          "({ void *r_ = events.ringbuf_reserve(sizeof(*r)); "
                          "if (!r_) gadget_count_lost(1); r_; })"),
                         ("gadget_submit(events, r)", "events.ringbuf_submit(r, 0)")):
            if old not in text:
                raise SystemExit(f"{spec.program} has no {old!r} to make bcc-tools-like")
            text = text.replace(old, new)
    with COMPILE_LOCK:
        b = bcc.BPF(text=text.encode(), cflags=cflags)
    record_size = spec.datasources[0].record_size
    received = 0
    cpu0 = time.process_time()
    t0 = time.monotonic()
    if mode == "ours":
        reader = RingReader(b[b"events"].get_fd(), record_size)
        wakeups = RingWakeups([reader.fileno()])
        ep = select.epoll()
        ep.register(wakeups.fileno(), select.EPOLLIN)
        drains = 0
        gen.go()
        done = False
        while True:
            while True:
                rows = reader.drain()
                received += len(rows)
                drains += 1
                if len(rows) < 65536:
                    break
            if done and reader.pending_bytes == 0:
                break
            done = not gen.running()
            if not done and ep.poll(0.002):
                wakeups.consume()
        extra = {"drains": drains}
    else:
        event_class = b[b"gadget_layout_open"].Leaf
        sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
        ptr = ctypes.POINTER(event_class)

        def count_cb(ctx: Any, data: Any, size: int) -> int:
            nonlocal received
            received += 1
            return 0

        def json_cb(ctx: Any, data: Any, size: int) -> int:
            nonlocal received
            e = ctypes.cast(data, ptr).contents
            p = e.proc
            sink.write(json.dumps({
                "timestamp": e.timestamp_raw, "comm": p.comm.decode("utf-8", "replace"),
                "pid": p.pid, "tid": p.tid, "uid": p.creds.uid, "gid": p.creds.gid,
                "mntns_id": p.mntns_id, "ret": -e.error_raw if e.error_raw else e.fd,
                "flags": e.flags_raw, "mode": e.mode_raw,
                "fname": e.fname.decode("utf-8", "replace")}) + "\n")
            received += 1
            return 0

        b[b"events"].open_ring_buffer(count_cb if mode == "bcc-count" else json_cb)
        gen.go()
        if mode == "bcc-json":
            while gen.running():
                b.ring_buffer_poll(100)  # woken by the kernel as records come
        else:
            while gen.running():  # no-wakeup submits: a timed drain
                b.ring_buffer_poll(10)
                b.ring_buffer_consume()
        idle = 0
        while idle < 5:  # what was submitted before the generator exited
            before = received
            b.ring_buffer_consume()
            idle = idle + 1 if received == before else 0
            time.sleep(0.01)
        extra = {}
    cpu = time.process_time() - cpu0
    wall = time.monotonic() - t0
    g = gen.result()
    lost = read_lost(b[b"gadget_lost"], 1)
    print(json.dumps({"mode": mode, "count": count, "received": received, "kernel_lost": lost,
                      "gen_rate": g["rate"], "gen_seconds": g["seconds"], "cpu_s": cpu,
                      "wall_s": wall, "us_per_event": cpu / max(received, 1) * 1e6, **extra}))


def consume(mode: str, gen_path: Path, comm: str, count: int, rate: int = 0,
            procs: int = 1) -> dict[str, Any]:
    out = subprocess.run([PYTHON, RUN, "_consume", mode, str(gen_path), comm, str(count),
                          str(rate), str(procs)], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"consumer {mode} failed: {out.stderr[-2000:]}")
    r: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return r
