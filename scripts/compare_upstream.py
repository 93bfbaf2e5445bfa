#!/usr/bin/env python3
"""Side by side: ``gadgetctl run GADGET -o json`` against our daemon and against upstream's
``ig daemon``, on the same workload at the same time.

For each gadget it prints the JSON field paths only upstream sends, those only we send, and
the values that differ on the workload's record (pids, tids, timestamps and other per-event
values left out). Both binaries and the ig gadget images come from ``scripts/setup upstream``;
the workloads are tests/peers/upstream_workloads.py. Needs root (eBPF).

    .venv/bin/python scripts/compare_upstream.py [--json] [GADGET...]

A gadget upstream's daemon cannot run on this kernel (several need kprobes this VM lacks) is
reported with upstream's error instead.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(ROOT))

from tests.daemon import DaemonProcess  # noqa: E402
from tests.peers.upstream import (  # noqa: E402
    UPSTREAM_GADGETS,
    Gadgetctl,
    GadgetctlProcess,
    IgDaemon,
    upstream_paths,
)
from tests.peers.upstream_workloads import Workload, leaves, running  # noqa: E402

RECORD_WITHIN = 60.0
VOLATILE = re.compile(
    r"(^|\.)(pid|tid|ppid|tpid|timestamp|timestamp_raw|t|t_raw|ts|start_time|start_time_raw|"
    r"latency_ns|latency_ns_raw|id|fd|reads|writes|rbytes|rbytes_raw|wbytes|wbytes_raw|"
    r"port|pages|ctime|pctime|cwd|args)$")
"""Values that belong to one event, not to the gadget: never compared. (``args`` carries
the workload's own temporary path; ``id`` the DNS query id; ``port`` an ephemeral port.)"""


@dataclass
class Side:
    """What one daemon's gadgetctl showed."""

    records: int = 0
    matching: int = 0
    paths: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Comparison:
    gadget: str
    token: str
    ours: Side
    upstream: Side
    only_upstream: list[str] = field(default_factory=list)
    only_ours: list[str] = field(default_factory=list)
    differing: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """path -> (upstream's value, ours), on the first workload record of each side."""


def _paths(records: list[dict[str, Any]]) -> list[str]:
    out: set[str] = set()
    for r in records:
        out.update(re.sub(r"\[\d+\]", "[]", p) for p, _ in leaves(r))
    return sorted(out)


def _error_of(p: GadgetctlProcess) -> str:
    lines = [line for line in p.stderr().splitlines() if "Error" in line or "error" in line]
    return lines[-1] if lines else f"gadgetctl exited with {p.proc.poll()}"


KNOWN_GAPS = {
    "snapshot_process": "ig daemon runs in its own pid namespace here (this VM hides "
                        "/proc/1/ns/mnt from it), and a BPF task iterator lists only the tasks "
                        "of its reader's pid namespace: upstream's snapshot shows ig alone",
}


def _watch(p: GadgetctlProcess, w: Workload, side: Side, upstream: bool) -> list[dict[str, Any]]:
    # A known gap is not worth the full wait: give it enough to show that it is still there.
    within = 15.0 if upstream and w.gadget in KNOWN_GAPS else RECORD_WITHIN
    try:
        p.wait_for_json(w.json_match, within, f"the {w.gadget} record")
    except AssertionError:
        if p.proc.poll() not in (None, 0):
            side.error = _error_of(p)
        else:
            side.error = f"no record carrying {w.token!r} within {within:.0f} s"
            if upstream and w.gadget in KNOWN_GAPS:
                side.error += f" ({KNOWN_GAPS[w.gadget]})"
    return [r for r in p.records() if w.json_match(r)]


def compare(gadget: str, ours: Gadgetctl, upstream: Gadgetctl) -> Comparison:
    with running(gadget) as w:
        po = ours.start("run", gadget, "-o", "json", "--timeout", "180")
        pu = upstream.start("run", gadget, "--host", "-o", "json", "--timeout", "180")
        try:
            side_o, side_u = Side(), Side()
            rec_o = _watch(po, w, side_o, upstream=False)
            rec_u = _watch(pu, w, side_u, upstream=True)
        finally:
            po.stop()
            pu.stop()
    for side, recs, p in ((side_o, rec_o, po), (side_u, rec_u, pu)):
        side.records = sum(1 for _ in p.records())
        side.matching = len(recs)
        side.paths = _paths(recs)
    c = Comparison(gadget, w.token, side_o, side_u)
    if rec_o and rec_u:
        po_set, pu_set = set(side_o.paths), set(side_u.paths)
        c.only_upstream = sorted(pu_set - po_set)
        c.only_ours = sorted(po_set - pu_set)
        vo, vu = dict(leaves(rec_o[0])), dict(leaves(rec_u[0]))
        for path in sorted(vo.keys() & vu.keys()):
            if not VOLATILE.search(path) and vo[path] != vu[path]:
                c.differing[path] = (vu[path], vo[path])
    return c


def render(c: Comparison) -> str:
    out = [f"== {c.gadget} (workload token {c.token})"]
    for name, side in (("ours", c.ours), ("upstream", c.upstream)):
        state = f"error: {side.error}" if side.error else "ok"
        out.append(f"{name}: {side.matching} workload record(s) of {side.records}, "
                   f"{len(side.paths)} field paths; {state}")
    if c.ours.error or c.upstream.error:
        return "\n".join(out)
    common = len(set(c.ours.paths) & set(c.upstream.paths))
    out.append(f"paths: {common} common, {len(c.only_upstream)} only upstream, "
               f"{len(c.only_ours)} only ours, {len(c.differing)} values differ")
    out.append(f"only upstream ({len(c.only_upstream)}): {', '.join(c.only_upstream) or '-'}")
    out.append(f"only ours ({len(c.only_ours)}): {', '.join(c.only_ours) or '-'}")
    out.append(f"values differ ({len(c.differing)}):")
    out += [f"  {p}: upstream {u!r}, ours {o!r}" for p, (u, o) in c.differing.items()]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gadgets", nargs="*", default=list(UPSTREAM_GADGETS))
    ap.add_argument("--json", action="store_true", help="one JSON object per gadget")
    args = ap.parse_args(argv)
    paths = upstream_paths()
    results = []
    with DaemonProcess() as daemon, IgDaemon(paths) as ig, \
            Gadgetctl(daemon.address) as ours, Gadgetctl(ig.address) as upstream:
        for gadget in args.gadgets:
            c = compare(gadget, ours, upstream)
            results.append(c)
            print(json.dumps(asdict(c)) if args.json else render(c) + "\n", flush=True)
    if not args.json:
        total_u = sum(len(c.upstream.paths) for c in results if not c.upstream.error)
        total_common = sum(len(set(c.ours.paths) & set(c.upstream.paths))
                           for c in results if not (c.upstream.error or c.ours.error))
        ran = [c.gadget for c in results if not (c.upstream.error or c.ours.error)]
        print(f"summary: upstream ran {len(ran)} of {len(results)} gadgets here "
              f"({', '.join(ran)}); we send {total_common} of the {total_u} field paths "
              "upstream sent for them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
