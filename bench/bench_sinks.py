"""Events per second through each sink alone and all together, against real peers.

A synthetic trace_exec source (no kernel) publishes copies of pre-built batches (a fresh array
per batch, as the ring reader hands them over) into a run's fan-out as fast as the sinks take
them (every sink edge uses ``overflow=block``, so nothing is dropped
and the rate is the sinks' own); the run ends when every sink has delivered every record. The
baseline is the same source and fan-out with one subscriber that only takes batches off its
edge, measured in the same process and run, so the ratios are the sinks' cost.

Peers: a KRaft Kafka broker and an OpenTelemetry Collector (tests/peers, built by
``scripts/setup peers``); the jsonl sink writes to a temp file; the prometheus sink counts in
memory. Figures are wall-clock events/s and this process's CPU per event (the peers' CPU is
not counted, but they share the machine's cores).

Usage: ``.venv/bin/python -m bench.bench_sinks [--events 200000] [--batch 1000] [--rounds 2]``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.batch import Batch
from pipeline.gadget import GadgetSpec
from pipeline.graph import EdgeClosed, Overflow
from pipeline.ledger import Ledger
from pipeline.run import GadgetRun
from pipeline.sinks.registry import SinkManager
from pipeline.sources.catalog import Catalog
from tests.peers.kafka import KafkaBroker
from tests.peers.otelcol import OtelCollector

COMMS = [b"bash", b"sh", b"python3", b"git", b"ls", b"cat", b"make", b"cc1"]


def synthetic_batch(spec: GadgetSpec, n: int, seed: int) -> Batch:
    """``n`` trace_exec records with realistic strings (the ring buffer's layout)."""
    schema = spec.datasources[0]
    f = {k: schema.field(k) for k in ("timestamp_raw", "proc.comm", "proc.pid", "proc.tid",
                                      "proc.parent.comm", "proc.parent.pid", "file", "args",
                                      "args_count", "args_size")}
    rows = np.zeros((n, schema.record_size), dtype=np.uint8)
    now = time.time_ns()
    for i in range(n):
        rec = bytearray(schema.record_size)
        comm = COMMS[(seed + i) % len(COMMS)]
        pid = 1000 + seed * n + i
        args = b"/usr/bin/" + comm + b"\xc2\xa0--flag\xc2\xa0" + str(pid).encode()
        for name, raw in (("proc.comm", comm), ("proc.parent.comm", b"bash"),
                          ("file", b"/usr/bin/" + comm), ("args", args)):
            rec[f[name].offs: f[name].offs + len(raw)] = raw
        struct.pack_into("<Q", rec, f["timestamp_raw"].offs, now + i)
        for name in ("proc.pid", "proc.tid"):
            struct.pack_into("<I", rec, f[name].offs, pid)
        struct.pack_into("<I", rec, f["proc.parent.pid"].offs, 999)
        struct.pack_into("<i", rec, f["args_count"].offs, 3)
        struct.pack_into("<I", rec, f["args_size"].offs, len(args))
        rows[i] = np.frombuffer(bytes(rec), dtype=np.uint8)
    return Batch(schema, rows)


@dataclass
class Result:
    name: str
    events: int
    seconds: float
    cpu: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.events * 1e6


async def measure(name: str, spec: GadgetSpec, batches: list[Batch], events: int,
                  params: dict[str, str]) -> Result:
    ledger = Ledger()
    manager = SinkManager(ledger)
    await manager.start()
    run = GadgetRun(spec, params, ledger, f"bench-{name}", manager.params(), manager.prefixes())
    attached = await manager.attach(run)
    null_task: asyncio.Task[None] | None = None
    if not attached.runners:  # the baseline: one subscriber that only takes batches
        edge = run.subscribe("null", 1 << 16, Overflow.BLOCK)

        async def take() -> None:
            while True:
                try:
                    _, b = await edge.get()
                except EdgeClosed:
                    return
                edge.delivered(len(b))

        null_task = asyncio.create_task(take())
    # warm-up: connections, topic creation, encoders
    await run.fanout.publish(batches[0])
    stages = [e.name for e in run.fanout.edges]
    while any(ledger.get(run.instance, s, "delivered") < len(batches[0]) for s in stages):
        await asyncio.sleep(0.01)
    t0, c0 = time.perf_counter(), time.process_time()
    sent = 0
    i = 0
    while sent < events:
        # a fresh array per batch, as the ring reader hands over
        b = batches[i % len(batches)]
        b = Batch(b.schema, b.rows.copy())
        await run.fanout.publish(b)
        sent += len(b)
        i += 1
    total = sent + len(batches[0])
    while any(ledger.get(run.instance, s, "delivered") + ledger.get(run.instance, s, "dropped")
              < total for s in stages):
        await asyncio.sleep(0.002)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    dropped = sum(ledger.get(run.instance, s, "dropped") for s in stages)
    await run.stop()
    await attached.close(30)
    if null_task is not None:
        await null_task
    await manager.stop()
    if dropped:
        raise RuntimeError(f"{name}: {dropped} records dropped; the measurement is invalid")
    return Result(name, sent, seconds, cpu)


BLOCK = {"queue-capacity": "65536", "overflow": "block"}


def sink_params(sink: str, **own: str) -> dict[str, str]:
    p = {f"operator.{sink}.{k}": v for k, v in {**BLOCK, **own}.items()}
    if sink != "prometheus":
        p[f"operator.{sink}.enable"] = "true"
    return p


async def main_async(args: argparse.Namespace) -> list[Result]:
    spec = Catalog().resolve("trace_exec")
    batches = [synthetic_batch(spec, args.batch, k) for k in range(8)]
    tmp = Path(tempfile.mkdtemp(prefix="gp-bench-sinks-"))
    with KafkaBroker() as broker, OtelCollector() as collector:
        kafka = {"brokers": broker.bootstrap, "key": "proc.comm"}
        configs: list[tuple[str, Callable[[], dict[str, str]]]] = [
            ("baseline (no sink)", dict),
            ("prometheus", lambda: sink_params(
                "prometheus", counters="by_comm:proc.comm;by_parent:proc.parent.comm",
                histograms="args:args_size:16,32,64,128,256:proc.comm")),
            ("jsonl (file)", lambda: sink_params("jsonl", path=str(tmp / "out.jsonl"),
                                                 **{"max-bytes": "0"})),
            ("kafka json", lambda: sink_params("kafka", topic="bench.json", **kafka)),
            ("kafka protobuf", lambda: sink_params("kafka", topic="bench.pb",
                                                   encoding="protobuf", **kafka)),
            ("kafka otlp", lambda: sink_params("kafka", topic="bench.otlp", encoding="otlp",
                                               brokers=broker.bootstrap)),
            ("otel-logs grpc", lambda: sink_params("otel-logs",
                                                   endpoint=collector.grpc_endpoint)),
            ("otel-logs http", lambda: sink_params("otel-logs", protocol="http",
                                                   endpoint=collector.http_logs_endpoint)),
            ("all four", lambda: {
                **sink_params("prometheus", counters="by_comm:proc.comm",
                              histograms="args:args_size:16,32,64,128,256:proc.comm"),
                **sink_params("jsonl", path=str(tmp / "all.jsonl"), **{"max-bytes": "0"}),
                **sink_params("kafka", topic="bench.all", **kafka),
                **sink_params("otel-logs", endpoint=collector.grpc_endpoint)}),
        ]
        chosen = [(n, p) for n, p in configs
                  if not args.only or n.startswith("baseline") or any(o in n for o in args.only)]
        best: dict[str, Result] = {}
        # Rounds interleave the paths, so a slow moment of the shared machine (the peers run
        # on the same two cores) does not hit one path only; the best round counts.
        for k in range(args.rounds):
            for name, params in chosen:
                r = await measure(name, spec, batches, args.events, params())
                if name not in best or r.rate > best[name].rate:
                    best[name] = r
                print(f"  round {k + 1}: {name:<20} {r.rate:>12,.0f} events/s "
                      f"{r.cpu_us:6.2f} µs/event", file=sys.stderr)
    return [best[n] for n, _ in chosen]


def table(results: list[Result]) -> str:
    base = results[0] if results and results[0].name.startswith("baseline") else None
    lines = [f"| {'path':<20} | {'events/s':>12} | {'CPU µs/event':>12} | {'vs baseline':>11} |",
             f"|{'-' * 22}|{'-' * 13}:|{'-' * 13}:|{'-' * 12}:|"]
    for r in results:
        ratio = f"{r.rate / base.rate:.3f}" if base else "-"
        lines.append(f"| {r.name:<20} | {r.rate:>12,.0f} | {r.cpu_us:>12.2f} | {ratio:>11} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=1000, help="records per source batch")
    ap.add_argument("--rounds", type=int, default=2, help="measure each path this often")
    ap.add_argument("--only", nargs="*", help="substrings of the paths to run (and baseline)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    results = asyncio.run(main_async(args))
    print(f"\n{args.events:,} synthetic trace_exec events per path and round, batches of "
          f"{args.batch}, best of {args.rounds} rounds\n")
    print(table(results))


if __name__ == "__main__":
    main()
