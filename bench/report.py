"""What the benchmark prints: the table, the summary lines (the last one is the zero-loss
comparison), and the raw results file."""

from __future__ import annotations

import json
import os
import time

from bench.common import IMAGE, OUT
from bench.session import Bench

SUMMARY_KEYS = ("a", "b", "c", "d", "g", "sinks", "sinks-peers", "fanout4", "fanout16",
                "kcost", "kcost trace_exec", "memory", "enrich", "trickle", "e2")
"""The summary lines in the order they are printed; the zero-loss line comes last."""


def fmt(v: float, spec: str = ",.0f") -> str:
    return "-" if v != v else format(v, spec)


def print_table(bench: Bench) -> None:
    head = ("scenario", "generated", "received", "k.lost", "drops", "seq gaps", "events/s",
            "CPU s/M", "anon MB", "file MB", "note")
    rows = [head]
    for r in bench.rows:
        rows.append((r.scenario, fmt(r.generated), fmt(r.received), fmt(r.kernel_lost),
                     fmt(r.ledger_dropped), fmt(r.seq_gaps), fmt(r.events_per_s),
                     fmt(r.cpu_s_per_m, ".2f"), fmt(r.rss_anon_mb), fmt(r.rss_file_mb), r.note))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    for j, row in enumerate(rows):
        print("  ".join(str(c).ljust(w) if i in (0, 10) else str(c).rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))


def print_report(bench: Bench, quick: bool, elapsed: float,
                 load: tuple[tuple[float, float, float], tuple[float, float, float]]) -> None:
    """The header, the table, the summary lines and, last, the zero-loss comparison; the raw
    results go to ``bench/out/results-<time>.json``."""
    load0, load1 = load
    print(f"# {IMAGE}, {'--quick' if quick else 'full'}: {bench.profile.repeats} repeats "
          f"(medians), {os.cpu_count()} CPUs, load average {load0[0]:.2f} -> {load1[0]:.2f}, "
          f"{elapsed:.0f} s")
    print_table(bench)
    print()
    for key in SUMMARY_KEYS:
        if key in bench.lines:
            print(bench.lines[key])
    zero = bench.zero
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (OUT / f"results-{stamp}.json").write_text(json.dumps(
        {"profile": bench.profile.__dict__, "rows": [r.__dict__ for r in bench.rows],
         "lines": bench.lines, "raw": bench.raw, "load": [load0, load1]}, indent=1,
        default=str))
    if zero is not None:
        ratio = zero["ours"] / zero["baseline"] if zero["baseline"] else float("inf")
        print(f"zero-loss {IMAGE}: ours={zero['ours']:.0f}/s baseline={zero['baseline']:.0f}/s "
              f"ratio={ratio:.2f}")  # one generator: see zero_loss.run_zero_loss()
