"""Scenario n: container enrichment on the per-record path (the chain of b, with the generator
in a container of a pod and the run selecting that pod, so every record is looked up in the
container collection and carries upstream's k8s.* and runtime.* fields).

The measurement is bench/bench_enrich.py's (``python -m bench.bench_enrich`` runs it alone,
with the container-latency and memory lines besides): Debian's containerd in a scratch dir
(tests/peers/containerd.py), a daemon of its own watching it, the static open_loop inside a
busybox container; each repeat measures the floor (tracing on, only a ring reader draining)
before the chain. Prints ``enrich trace_open: ours=N/s floor=F/s ratio=R lost=L``.
"""

from __future__ import annotations

import os
from typing import Any

from bench.bench_enrich import Daemon, enrich_line, measure_enrich, static_open_loop
from bench.common import log, median
from bench.session import Bench


def run_enrich(bench: Bench) -> None:
    """n: the profile's repeats of ``count`` opens inside a pod-selected container."""
    from tests.peers.containerd import Containerd

    p = bench.profile
    tmp = bench.tmp / "enrich"
    tmp.mkdir()
    with Containerd() as containerd:
        binary = "gpe" + os.urandom(4).hex()
        static_open_loop(containerd.rootfs / "bin" / binary)
        log(f"enrich: containerd at {containerd.socket}, {p.repeats} repeats of {p.count:,}")
        daemon = Daemon(tmp, str(containerd.socket))
        try:
            runs = measure_enrich(containerd, daemon, bench.goclient, binary, p.count,
                                  p.repeats)
        finally:
            daemon.stop()
    rows: list[dict[str, Any]] = [
        {"generated": r["generated"], "received": r["received"], "seq_gaps": r["seq_gaps"],
         "events_per_s": r["rate"],
         # µs of daemon CPU per record are CPU seconds per million records
         "cpu_s_per_m": r["cpu_us_per_record"]} for r in runs]
    bench.row("n: b, generator in a pod-selected container", rows,
              note=f"floor {median([r['floor'] for r in runs]):,.0f}/s, "
                   f"ratio {median([r['ratio'] for r in runs]):.2f}")
    bench.lines["enrich"] = enrich_line(runs)
