"""Scenarios h and i: the per-record chain (b) with sinks beside the gRPC stream.

h: JSON lines to a file and a Prometheus counter (no peer needed). i: Kafka (JSON, one message
per record, acks=all) and OTLP logs over gRPC, against the real broker and Collector the set-up
caches (tests/peers). Each repeat measures the floor first (the generator with tracing on and
only the ring reader draining), then the chain, so the ratio is taken against the same moment's
floor; the line shows medians.

``lost`` counts every generated record that did not reach every consumer: what the Go client
did not receive plus, for each sink, what its ledger stage does not show as delivered (the
sinks' own acknowledgement: written to the file, counted, acknowledged by the broker, accepted
by the Collector). A record missed by two consumers counts twice, so ``lost`` is an upper
bound of the records lost, and exact when it is 0.
"""

from __future__ import annotations

import contextlib
import re
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

from bench.common import IMAGE, log, median
from bench.consumer import consume
from bench.daemon import Daemon
from bench.session import Bench

SETTLE_TIMEOUT = 60.0
"""Seconds the sinks may take, after the client's end, to hand on what they hold."""


def stage_counts(d: Daemon) -> dict[tuple[str, str], float]:
    """(outcome, stage) -> records, summed over runs, from the daemon's ledger metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{d.port}/metrics", timeout=10).read()
    out: dict[tuple[str, str], float] = {}
    for line in text.decode().splitlines():
        m = re.match(r"^gadgetpipe_records_(produced|delivered|dropped)_total\{(.*)\} (\S+)$",
                     line)
        if m:
            stage = dict(re.findall(r'(\w+)="([^"]*)"', m[2])).get("stage", "")
            out[(m[1], stage)] = out.get((m[1], stage), 0.0) + float(m[3])
    return out


def _delta(after: dict[tuple[str, str], float], before: dict[tuple[str, str], float],
           outcome: str, stage: str) -> float:
    return after.get((outcome, stage), 0.0) - before.get((outcome, stage), 0.0)


def settle(d: Daemon, before: dict[tuple[str, str], float], stages: list[str],
           timeout: float = SETTLE_TIMEOUT) -> dict[tuple[str, str], float]:
    """Waits until every sink stage has handed on (delivered or dropped) what it took."""
    deadline = time.monotonic() + timeout
    while True:
        now = stage_counts(d)
        done = all(_delta(now, before, "delivered", s) + _delta(now, before, "dropped", s)
                   >= _delta(now, before, "produced", s) for s in stages)
        if done or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


def chain_with_sinks(bench: Bench, extra: tuple[str, ...],
                     sinks: list[str]) -> dict[str, Any]:
    """One repeat: the floor, then the chain with ``extra`` params; per sink what it got."""
    p = bench.profile
    floor = consume("ours", bench.gen_binary, bench.comm, p.count)["gen_rate"]
    d = bench.need_daemon()
    before = stage_counts(d)
    r = bench.chain_run(p.count, 0, False, extra)
    after = settle(d, before, [f"sink:{s}" for s in sinks])
    got = {s: _delta(after, before, "delivered", f"sink:{s}") for s in sinks}
    r["floor"] = floor
    r["ratio"] = r["events_per_s"] / floor
    r["sinks"] = got
    r["lost"] = (p.count - r["received"]) + sum(max(0.0, p.count - v) for v in got.values())
    return r


def _line(name: str, runs: list[dict[str, Any]]) -> str:
    return (f"{name} {IMAGE}: ours={median([r['events_per_s'] for r in runs]):.0f}/s "
            f"floor={median([r['floor'] for r in runs]):.0f}/s "
            f"ratio={median([r['ratio'] for r in runs]):.2f} "
            f"lost={median([r['lost'] for r in runs]):.0f}")


def _note(runs: list[dict[str, Any]], sinks: list[str]) -> str:
    return ", ".join(f"{s} got {median([r['sinks'][s] for r in runs]):,.0f}" for s in sinks)


def run_sinks(bench: Bench) -> None:
    """h: b + jsonl (to a file) + prometheus (a counter by comm)."""
    out = bench.tmp / "sink.jsonl"
    extra = ("operator.jsonl.jsonl-enable=true", f"operator.jsonl.jsonl-path={out}",
             "operator.jsonl.jsonl-max-bytes=0",
             "operator.prometheus.prometheus-counters=opens_by_comm:proc.comm")
    sinks = ["jsonl", "prometheus"]
    runs = []
    for i in range(bench.profile.repeats):
        log(f"sinks repeat {i + 1}/{bench.profile.repeats}")
        runs.append(chain_with_sinks(bench, extra, sinks))
        with contextlib.suppress(OSError):
            out.unlink()
    bench.row("h: b + jsonl and prometheus sinks", runs, note=_note(runs, sinks))
    bench.lines["sinks"] = _line("sinks", runs)


@contextlib.contextmanager
def peers() -> Iterator[tuple[str, str]]:
    """A Kafka broker and a Collector (tests/peers; ``scripts/setup peers`` caches them); the
    Collector discards what it accepts (its debug exporter), so the file exporter's JSON
    writing is not what the benchmark measures. Yields (bootstrap, OTLP gRPC endpoint)."""
    from tests.peers.kafka import KafkaBroker
    from tests.peers.otelcol import OtelCollector

    class Collector(OtelCollector):
        def config(self) -> dict[str, Any]:
            c = super().config()
            c["exporters"]["debug"] = {"verbosity": "basic"}
            c["service"]["pipelines"]["logs"]["exporters"] = ["debug"]
            return c

    with KafkaBroker() as broker, Collector() as collector:
        yield broker.bootstrap, collector.grpc_endpoint


def run_sinks_peers(bench: Bench) -> None:
    """i: b + kafka (JSON, one message per record) + otel-logs (OTLP over gRPC)."""
    sinks = ["kafka", "otel-logs"]
    runs = []
    with peers() as (bootstrap, endpoint):
        for i in range(bench.profile.repeats):
            log(f"sinks-peers repeat {i + 1}/{bench.profile.repeats}")
            extra = ("operator.kafka.kafka-enable=true",
                     f"operator.kafka.kafka-brokers={bootstrap}",
                     f"operator.kafka.kafka-topic=bench.{i}", "operator.kafka.kafka-encoding=json",
                     "operator.otel-logs.otel-logs-enable=true",
                     f"operator.otel-logs.otel-logs-endpoint={endpoint}")
            runs.append(chain_with_sinks(bench, extra, sinks))
    bench.row("i: b + kafka (json) and otel-logs (grpc)", runs, note=_note(runs, sinks))
    bench.lines["sinks-peers"] = _line("sinks-peers", runs)
