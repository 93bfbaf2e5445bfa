"""Scenarios a-d: the kernel-side limit, the drain's CPU, the full chain per record and
batched, interleaved (h and i, the chain with sinks, are in bench/sinks.py)."""

from __future__ import annotations

from typing import Any

from bench.common import IMAGE, Generator, log, median
from bench.consumer import consume
from bench.session import Bench


def run_core(bench: Bench, which: set[str]) -> None:
    """Each repeat runs every selected measurement once, back to back, so a change in the
    machine's load (other work on the two cores) hits the floor and the chains alike; the
    ratios are taken per repeat, then their median."""
    p = bench.profile
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in ("off", "on", "bcc", "b", "c")}
    for i in range(p.repeats):
        log(f"core repeat {i + 1}/{p.repeats}")
        if "a" in which:
            g = Generator(bench.gen_binary, p.count)
            g.go()
            runs["off"].append({"generated": p.count, "events_per_s": g.result()["rate"]})
        if which & set("abcd"):
            for mode, key in (("ours", "on"), ("bcc-count", "bcc")):
                if key == "bcc" and "d" not in which:
                    continue
                c = consume(mode, bench.gen_binary, bench.comm, p.count)
                runs[key].append({
                    "generated": p.count, "received": c["received"],
                    "kernel_lost": c["kernel_lost"], "events_per_s": c["gen_rate"],
                    "cpu_s_per_m": c["cpu_s"] / max(c["received"], 1) * 1e6,
                    "us_per_event": c["us_per_event"], "drains": c.get("drains", 0)})
        for key, batched in (("b", False), ("c", True)):
            if key in which:
                r = bench.chain_run(p.count, 0, batched)
                r["ratio"] = r["events_per_s"] / runs["on"][-1]["events_per_s"]
                runs[key].append(r)
    on = runs["on"]
    if runs["off"]:
        bench.row("a: generator, tracing off", runs["off"])
    if on:
        r_on = bench.row("a: tracing on, ring reader only", on,
                         note=f"{median([r['drains'] for r in on]):.0f} drains")
        bench.floor = r_on.events_per_s
        if runs["off"]:
            bench.lines["a"] = (f"kernel {IMAGE}: off="
                                f"{median([r['events_per_s'] for r in runs['off']]):.0f}/s "
                                f"on={r_on.events_per_s:.0f}/s")
    if runs["bcc"]:
        bench.row("d: bcc open_ring_buffer(cb)", runs["bcc"], note="callback counts")
        bench.lines["d"] = (f"drain {IMAGE}: us_per_event="
                            f"{median([r['us_per_event'] for r in on]):.3f} "
                            "baseline_us_per_event="
                            f"{median([r['us_per_event'] for r in runs['bcc']]):.2f}")
    for key, label, name in (("b", "grpc-per-record", "b: grpc-per-record, Go client"),
                             ("c", "grpc-batched", "c: grpc-batched, grpcio client")):
        rs = runs[key]
        if not rs:
            continue
        row = bench.row(name, rs,
                        note=f"generator {median([x['gen_rate'] for x in rs]):.0f}/s")
        bench.lines[key] = (f"{label} {IMAGE}: ours={row.events_per_s:.0f}/s "
                            f"floor={bench.floor:.0f}/s "
                            f"ratio={median([x['ratio'] for x in rs]):.2f} "
                            f"lost={median([x['lost'] for x in rs]):.0f}")
