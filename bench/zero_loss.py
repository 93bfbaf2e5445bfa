"""Scenario e: rising offered rates until the first loss, ours against bcc tools' style, and
the plot of it."""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

from bench.common import IMAGE, OUT, ROOT, log, median
from bench.consumer import consume
from bench.session import Bench, Row

SIDES = {"ours": "ours (daemon + Go client)", "baseline": "bcc tools' style",
         "nowakeup": "bcc cb+JSON, no-wakeup"}


def run_zero_loss(bench: Bench) -> None:
    """Two workloads: one paced generator (one core busy with it, the consumer has the
    other: what the scenario asks), and two generators sharing the rate (the workload on
    both cores, so a consumer's CPU per record decides where it starts to lose)."""
    p = bench.profile
    setups: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for procs, sides in ((1, ("baseline", "nowakeup", "ours")), (2, ("baseline", "ours"))):
        points: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        setups[procs] = points
        for side in sides:
            for rate in p.ladder:
                points[side].append(ladder_step(bench, side, rate, procs))
                if points[side][-1]["lost"] > 0:
                    break
    bench.raw["zero_loss"] = {str(k): v for k, v in setups.items()}
    bench.zero_by_procs.clear()
    for procs, points in setups.items():
        best: dict[str, float] = {}
        for side, pts in points.items():
            ok = [pt["offered"] for pt in pts if pt["lost"] == 0]
            best[side] = max(ok) if ok else 0.0
            cpu = median([pt["cpu_us"] for pt in pts if pt["lost"] == 0] or [float("nan")])
            first_loss = next((pt for pt in pts if pt["lost"] > 0), None)
            bench.rows.append(Row(
                f"e: zero-loss max, {SIDES[side]}, {procs} gen.",
                events_per_s=best[side], cpu_s_per_m=cpu,
                note=(f"first loss at {first_loss['offered']:.0f}/s "
                      f"({first_loss['lost'] / first_loss['generated']:.1%})" if first_loss
                      else "no loss up to unthrottled")))
        bench.zero_by_procs[procs] = best
    # The summary (last) line is the scenario as specified: one paced generator. With two
    # cores, a consumer then has a core of its own; the two-generator line (the workload on
    # every core, as on a busy host) is printed just before it.
    bench.zero = bench.zero_by_procs[1]
    two = bench.zero_by_procs[2]
    bench.lines["e2"] = (f"zero-loss {IMAGE}, 2 generators: ours={two['ours']:.0f}/s "
                         f"baseline={two['baseline']:.0f}/s "
                         f"ratio={two['ours'] / two['baseline'] if two['baseline'] else 0:.2f}")
    plot(bench, setups)


def ladder_step(bench: Bench, side: str, rate: int, procs: int) -> dict[str, Any]:
    p = bench.profile
    count = int((rate or floor_guess(bench)) * p.step_seconds)
    reps = []
    for _ in range(p.ladder_repeats):
        log(f"zero-loss {side}, {procs} generator(s), at {rate or 'unthrottled'}/s "
            f"({count} opens)")
        if side == "ours":
            r = bench.chain_run(count, rate, batched=False, procs=procs)
            reps.append({"offered": r["gen_rate"], "generated": count,
                         "received": r["received"], "lost": r["lost"],
                         "cpu_us": r["cpu_s_per_m"]})
        else:
            mode = "bcc-json" if side == "baseline" else "bcc-json-nowakeup"
            c = consume(mode, bench.gen_binary, bench.comm, count, rate, procs)
            reps.append({"offered": c["gen_rate"], "generated": count,
                         "received": c["received"], "lost": count - c["received"],
                         "cpu_us": c["us_per_event"]})
    point = {k: median([float(x[k]) for x in reps]) for k in reps[0]}
    point["requested"] = rate
    log(f"  -> offered {point['offered']:.0f}/s received {point['received']:.0f} "
        f"of {count}, lost {point['lost']:.0f}, {point['cpu_us']:.2f} µs/event")
    return point


def floor_guess(bench: Bench) -> float:
    return bench.floor if bench.floor == bench.floor else 300_000.0


def plot(bench: Bench, setups: dict[int, dict[str, list[dict[str, Any]]]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing (pip install -e '.[dev]'): no plot")
        return
    fig, axes = plt.subplots(len(setups), 3, figsize=(15, 4.2 * len(setups)),
                             squeeze=False)
    styles = {"ours": ("gadgetpipe (daemon + grpc-go client)", "tab:blue", "o"),
              "baseline": ("bcc tools' style (callback, ctypes, JSON)", "tab:red", "s"),
              "nowakeup": ("same callback, no-wakeup submits", "tab:orange", "^")}
    for row, (procs, points) in zip(axes, sorted(setups.items()), strict=True):
        ax1, ax2, ax3 = row
        top = 1.0
        for side, unsorted in points.items():
            if not unsorted:
                continue
            pts = sorted(unsorted, key=lambda pt: pt["offered"])
            label, color, marker = styles[side]
            x = [pt["offered"] / 1000 for pt in pts]
            top = max(top, *x)
            ax1.plot(x, [pt["offered"] * pt["received"] / pt["generated"] / 1000
                         for pt in pts], marker=marker, color=color, label=label)
            ax2.plot(x, [100 * pt["lost"] / pt["generated"] for pt in pts], marker=marker,
                     color=color, label=label)
            ax3.plot(x, [pt["cpu_us"] for pt in pts], marker=marker, color=color,
                     label=label)
        ax1.plot([0, top], [0, top], ":", color="gray", label="delivered = offered")
        gens = "1 generator" if procs == 1 else f"{procs} generators (workload on all cores)"
        ax1.set_ylabel("delivered records/s (thousands)")
        ax1.set_title(f"{IMAGE}, {gens}: delivered")
        ax2.set_ylabel("records lost (%)")
        ax2.set_title("loss (each side stops at its first loss)")
        ax3.set_ylabel("consumer CPU per record (µs)")
        ax3.set_title("CPU: the daemon's, or the bcc script's")
        ax3.set_ylim(bottom=0)
        for ax in row:
            ax.set_xlabel("offered opens/s, as the generators achieved them (thousands)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    one = bench.zero_by_procs.get(1, {})
    two = bench.zero_by_procs.get(2, {})
    fig.suptitle(f"zero-loss max, 1 generator: ours {one.get('ours', 0) / 1000:.0f}k/s, "
                 f"baseline {one.get('baseline', 0) / 1000:.0f}k/s; 2 generators: ours "
                 f"{two.get('ours', 0) / 1000:.0f}k/s, baseline "
                 f"{two.get('baseline', 0) / 1000:.0f}k/s  ({time.strftime('%Y-%m-%d')}, "
                 f"{os.cpu_count()} shared cores)", fontsize=10)
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT / "zero_loss.png", dpi=100)
    (ROOT / "docs").mkdir(exist_ok=True)
    shutil.copy(OUT / "zero_loss.png", ROOT / "docs" / "bench.png")
    plt.close(fig)
