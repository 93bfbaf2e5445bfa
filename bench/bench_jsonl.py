"""In-process cost per record of the jsonl and prometheus sinks on trace_open batches.

No kernel, no daemon: batches shaped like the ring reader's (payload 0 rows of trace_open)
go through a run's operators (derive, enrich: derived and container columns lazy, as in a real
run) and then through what each sink does per batch, timed per record:

- ``jsonl``: :meth:`JsonEncoder.encode_lines` (what the jsonl sink runs in its worker thread),
  on a fresh batch each time, so every derived column the JSON reads is computed as in a run
  where the sink is the first reader;
- ``jsonl (derived done)``: the same with the derived columns already computed (a run where
  the gRPC stream read them first);
- ``jsonl (2 coalesced)``: two halves of such batches merged first, as the sink runner
  merges what queued while the sink was busy (pipeline/sinks/base.py ``coalesce``);
- ``prometheus``: the sink's per-batch count (a counter by ``proc.comm``, as bench h declares);
- ``baseline: grpc framing``: :func:`pipeline.wire.per_record_events` of the same batch, the
  gRPC stream's per-record encoding; every ratio is against it, measured in the same process;
- ``baseline: copy``: a plain copy of the batch's rows.

Workloads: ``one-process`` (bench h: one generator opening one file, so most columns are
constant within a batch) and ``mixed`` (8 commands, 64 processes, several files, errors).

Usage: ``.venv/bin/python -m bench.bench_jsonl [--batch 2048] [--seconds 1.0] [--profile]
[--write DIR]`` (``--profile``: cProfile of the jsonl encoding, top entries by own time;
``--write``: the system CPU per record of appending a batch's lines to a file in DIR, in one
``write`` and in the sink's pieces of ``WRITE_CHUNK``).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import tempfile
import time
from collections.abc import Callable

import numpy as np

from pipeline import wire
from pipeline.batch import Batch
from pipeline.ledger import Ledger
from pipeline.run import GadgetRun
from pipeline.schema import DataSourceSchema
from pipeline.sinks.base import coalesce
from pipeline.sinks.encode import JsonEncoder
from pipeline.sinks.jsonl import WRITE_CHUNK
from pipeline.sinks.prometheus import GadgetMetricsStore, parse_counters
from pipeline.sources.catalog import Catalog

FILES = [b"/etc/hostname", b"/usr/lib/x86_64-linux-gnu/libc.so.6", b"/proc/self/stat",
         b"/etc/ld.so.cache", b"/dev/null"]
COMMS = [b"bash", b"sh", b"python3", b"git", b"ls", b"cat", b"make", b"cc1"]


def _put(rows: np.ndarray, ds: DataSourceSchema, name: str, vals: np.ndarray | list[int]
         ) -> None:
    f = ds.field(name)
    dtype = {1: "<u1", 2: "<u2", 4: "<u4", 8: "<u8"}[f.size]
    rows[:, f.offs: f.offs + f.size] = np.asarray(vals, dtype=dtype).view(np.uint8).reshape(
        len(rows), f.size)


def _put_str(rows: np.ndarray, ds: DataSourceSchema, name: str, vals: list[bytes]) -> None:
    f = ds.field(name)
    for i, v in enumerate(vals):
        rows[i, f.offs: f.offs + len(v)] = np.frombuffer(v, dtype=np.uint8)


def raw_batch(ds: DataSourceSchema, n: int, mixed: bool, seed: int = 0) -> Batch:
    """``n`` trace_open records as the ring reader hands them over (payload 0 only)."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((n, ds.record_size), dtype=np.uint8)
    # Stale ring memory after the strings' NULs, as a real ring has.
    rows[:] = rng.integers(0, 256, ds.record_size, dtype=np.uint8)
    now = 1_732_540_000_000_000_000 + seed * 10**9
    _put(rows, ds, "timestamp_raw", now + np.cumsum(rng.integers(800, 1200, n)))
    if mixed:
        proc = rng.integers(0, 64, n)
        comms = [COMMS[p % len(COMMS)] + b"\0" for p in proc.tolist()]
        pids = 4000 + proc
        files = [FILES[k] + b"\0" for k in rng.integers(0, len(FILES), n).tolist()]
        err = np.where(rng.random(n) < 0.1, 2, 0)
        uid = np.where(proc % 4 == 0, 1000, 0)
    else:
        comms = [b"gpb1a2b3c4d\0"] * n
        pids = np.full(n, 4242)
        files = [b"/etc/hostname\0"] * n
        err = np.zeros(n, dtype=np.int64)
        uid = np.zeros(n, dtype=np.int64)
    _put_str(rows, ds, "proc.comm", comms)
    _put_str(rows, ds, "proc.parent.comm", [b"bash\0"] * n)
    _put_str(rows, ds, "fname", files)
    _put(rows, ds, "proc.pid", pids)
    _put(rows, ds, "proc.tid", pids)
    _put(rows, ds, "proc.parent.pid", np.full(n, 1000))
    _put(rows, ds, "proc.parent.tid", np.full(n, 1000))
    _put(rows, ds, "proc.mntns_id", np.full(n, 4026531841))
    _put(rows, ds, "proc.creds.uid", uid)
    _put(rows, ds, "proc.creds.gid", uid)
    _put(rows, ds, "error_raw", err)
    _put(rows, ds, "fd", np.where(err == 0, 3, 0))
    _put(rows, ds, "flags_raw", np.full(n, 0o2000000))  # O_RDONLY|O_CLOEXEC
    _put(rows, ds, "mode_raw", np.zeros(n))
    return Batch(ds, rows)


class Chain:
    """A direct trace_open run's operators (derive, enrich), without a source."""

    def __init__(self) -> None:
        spec = Catalog().resolve("trace_open")
        self.run = GadgetRun(spec, {}, Ledger(), "bench-jsonl")
        self.raw_schema = spec.datasources[0]
        self.schema = self.run.schemas[0]

    def process(self, raw: Batch) -> Batch:
        b = Batch(raw.schema, raw.rows.copy())  # a fresh array, as the ring reader's
        for op in self.run._operators:  # the run's own chain, as its _emit runs it
            b = op.process(b)
        return b


def per_record(fn: Callable[[], object], n: int, seconds: float) -> float:
    """µs per record of ``fn`` (which handles ``n`` records), best of a few timed loops."""
    fn()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        k = 0
        while k < 3 or time.perf_counter() - t0 < seconds / 5:
            fn()
            k += 1
        best = min(best, (time.perf_counter() - t0) / k / n * 1e6)
        if time.perf_counter() > deadline:
            return best


def workload(chain: Chain, batch_size: int, mixed: bool, seconds: float, profile: bool
             ) -> None:
    """Prints one workload's table (and profile)."""
    raws = [raw_batch(chain.raw_schema, batch_size, mixed, seed) for seed in range(4)]
    batches = [chain.process(r) for r in raws]
    encoder = JsonEncoder(chain.schema)
    store = GadgetMetricsStore()
    metrics = store.build("trace_open", "bench", [chain.schema],
                          parse_counters("opens_by_comm:proc.comm"), [], 1000)
    for b in batches:  # derived columns computed once: the "done" case
        encoder.encode_lines(b)
    i = 0

    def fresh_json() -> None:
        nonlocal i
        i += 1
        encoder.encode_lines(chain.process(raws[i % len(raws)]))

    def fresh_chain() -> None:
        nonlocal i
        i += 1
        chain.process(raws[i % len(raws)])

    def done_json() -> None:
        nonlocal i
        i += 1
        encoder.encode_lines(batches[i % len(batches)])

    halves = [b.slice(0, len(b) // 2) for b in batches] + \
        [b.slice(len(b) // 2) for b in batches]

    def coalesced_json() -> None:
        nonlocal i
        i += 1
        encoder.encode_lines(coalesce([halves[i % len(halves)],
                                       halves[(i + 3) % len(halves)]]))

    def prom() -> None:
        nonlocal i
        i += 1
        metrics.count(batches[i % len(batches)])

    def framing() -> None:
        nonlocal i
        i += 1
        wire.per_record_events(batches[i % len(batches)], 1, 0)

    def copy() -> None:
        nonlocal i
        i += 1
        batches[i % len(batches)].rows.copy()

    n = batch_size
    base = per_record(framing, n, seconds)
    chain_cost = per_record(fresh_chain, n, seconds)
    results = [
        ("baseline: grpc framing", base),
        ("baseline: copy", per_record(copy, n, seconds)),
        ("jsonl", per_record(fresh_json, n, seconds) - chain_cost),
        ("jsonl (derived done)", per_record(done_json, n, seconds)),
        ("jsonl (2 coalesced)", per_record(coalesced_json, n, seconds)),
        ("prometheus", per_record(prom, n, seconds)),
    ]
    name = "mixed" if mixed else "one-process"
    print(f"\n{name}, batches of {n} (operators alone: {chain_cost:.3f} µs/record)")
    print(f"| {'path':<24} | {'µs/record':>9} | {'vs grpc framing':>15} |")
    print(f"|{'-' * 26}|{'-' * 10}:|{'-' * 16}:|")
    for label, us in results:
        print(f"| {label:<24} | {us:>9.3f} | {us / base:>15.2f} |")
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            fresh_json()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def run(batch_size: int, seconds: float, profile: bool) -> None:
    chain = Chain()
    for mixed in (False, True):
        workload(chain, batch_size, mixed, seconds, profile)
    line = chain.process(raw_batch(chain.raw_schema, 1, False))
    print("\na record:", JsonEncoder(chain.schema).encode(line)[0].decode())


def write_cost(directory: str, batch_size: int, rounds: int = 40) -> None:
    """System and wall time per record of appending encoded batches to a file."""
    chain = Chain()
    batch = chain.process(raw_batch(chain.raw_schema, batch_size, False))
    data = memoryview(bytes(JsonEncoder(chain.schema).encode_lines(batch)[0]))
    for label, chunk in (("one write per batch", len(data)),
                         (f"pieces of {WRITE_CHUNK >> 10} KiB", WRITE_CHUNK)):
        fd, path = tempfile.mkstemp(dir=directory, suffix=".jsonl")
        os.close(fd)
        with open(path, "ab") as f:
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for _ in range(rounds):
                for start in range(0, len(data), chunk):
                    f.write(data[start: start + chunk])
                f.flush()
            r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        os.unlink(path)
        n = rounds * batch_size
        print(f"write to {directory}, {label}: {(r1.ru_stime - r0.ru_stime) / n * 1e6:.2f} µs "
              f"system, {(t1 - t0) / n * 1e6:.2f} µs wall per record "
              f"({len(data) // batch_size} B)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=2048, help="records per batch")
    ap.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    ap.add_argument("--profile", action="store_true", help="cProfile the jsonl encoding")
    ap.add_argument("--write", metavar="DIR", help="measure appending the lines to a file")
    args = ap.parse_args()
    if args.write:
        write_cost(args.write, args.batch)
        return
    run(args.batch, args.seconds, args.profile)


if __name__ == "__main__":
    main()
