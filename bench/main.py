"""``bench/run``: runs the scenarios and prints the table and the summary lines (see
bench/README.md). ``bench/run _consume …`` and ``bench/run _pyclient …`` are the child roles
the scenarios start."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.common import FULL, QUICK, log, make_generator_binary, peers
from bench.consumer import consume_main
from bench.core import run_core
from bench.enrich import run_enrich
from bench.fanout import run_fanout
from bench.kcost import run_kcost
from bench.memory import run_memory
from bench.pyclient import pyclient_main
from bench.report import print_report
from bench.session import Bench, Row
from bench.sinks import run_sinks, run_sinks_peers
from bench.synthetic import run_synthetic
from bench.trickle import run_trickle
from bench.zero_loss import run_zero_loss

SCENARIOS = "abcdefghikmnt"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_consume"]:
        consume_main(argv[1:])
        return 0
    if argv[:1] == ["_pyclient"]:
        pyclient_main(argv[1:])
        return 0
    ap = argparse.ArgumentParser(prog="bench/run",
                                 description="gadgetpipe benchmark (see bench/README.md)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats, shorter steps")
    ap.add_argument("--only", default=SCENARIOS, help="scenarios to run, e.g. a,b,e")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/run needs root (BPF)", file=sys.stderr)
        return 2
    profile = QUICK if args.quick else FULL
    only = set(args.only.replace(",", ""))
    goclient, open_loop = peers()
    started = time.monotonic()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="gp-bench-") as tmpdir:
        tmp = Path(tmpdir)
        gen_binary, comm = make_generator_binary(tmp, open_loop)
        bench = Bench(profile, tmp, goclient, gen_binary, comm)
        steps: list[tuple[str, Callable[[Bench], None]]] = [
            ("abcd", lambda b: run_core(b, only)), ("e", run_zero_loss), ("f", run_fanout),
            ("g", run_synthetic), ("h", run_sinks), ("i", run_sinks_peers), ("k", run_kcost),
            ("m", run_memory), ("n", run_enrich), ("t", run_trickle)]
        try:
            for keys, fn in steps:
                if only & set(keys):
                    try:
                        fn(bench)
                    except Exception as e:  # one scenario failing must not lose the others
                        log(f"scenario {keys} failed: {e!r}")
                        bench.rows.append(Row(f"{keys}: FAILED", note=str(e)[:120]))
        finally:
            if bench.daemon is not None:
                bench.daemon.stop()
    print_report(bench, args.quick, time.monotonic() - started, (load0, os.getloadavg()))
    return 0
