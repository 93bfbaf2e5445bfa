"""Scenario f: 1, 4 and 16 upstream-style clients attached to one gadget instance.

Lines: ``fanout4`` is the slowest of 4 clients against the floor (measured before each repeat,
as in sinks.py), ``lost`` every record some client did not receive (summed over clients, an
upper bound that is exact at 0); ``fanout16`` is the daemon's CPU per generated record with 16
clients over the same with one."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import time
from typing import Any

from bench.common import COMM_PARAM, IMAGE, Generator, MemPeak, cpu_seconds, log, median
from bench.consumer import consume
from bench.daemon import Daemon
from bench.session import Bench


def run_fanout(bench: Bench) -> None:
    from api.client import GadgetClient
    from pipeline._gen import gadget_service_pb2 as pb

    d = bench.need_daemon()
    p = bench.profile
    by_n: dict[int, list[dict[str, Any]]] = {n: [] for n in p.fanout}
    # Every repeat runs each client count in turn, so that the 16/1 CPU ratio is taken within
    # one repeat (other work on the machine drifts between repeats), then its median.
    for i in range(p.repeats):
        for n in p.fanout:
            log(f"fan-out {n} clients, repeat {i + 1}")
            floor = consume("ours", bench.gen_binary, bench.comm, p.fanout_count)["gen_rate"]
            # Started (and waiting) before the instance traces, so its dynamic loader's opens
            # are not records: every client then gets exactly the generated ones, and its
            # first-to-last rate is not stretched by a stray early record.
            gen = Generator(bench.gen_binary, p.fanout_count)
            with GadgetClient(d.address) as c:
                resp = c.instances.CreateGadgetInstance(pb.CreateGadgetInstanceRequest(
                    gadgetInstance=pb.GadgetInstance(
                        name=f"bench-{n}-{i}-{os.urandom(2).hex()}",
                        gadgetConfig=pb.GadgetRunRequest(
                            imageName=IMAGE, version=1,
                            paramValues={COMM_PARAM: bench.comm}))))
                iid = resp.gadgetInstance.id
            try:
                r = fanout_run(bench, d, iid, n, gen)
                r["floor"] = floor
                r["ratio"] = r["events_per_s"] / floor
                by_n[n].append(r)
            finally:
                gen.kill()
                with GadgetClient(d.address) as c:
                    c.instances.RemoveGadgetInstance(pb.GadgetInstanceId(id=iid))
    for n, runs in by_n.items():
        bench.row(f"f: {n} Go client{'s' if n > 1 else ''}, one instance", runs,
                  note=f"worst client {median([r['worst'] for r in runs]):.0f}")
    if 4 in by_n:
        rs = by_n[4]
        bench.lines["fanout4"] = (
            f"fanout4 {IMAGE}: ours={median([r['events_per_s'] for r in rs]):.0f}/s "
            f"floor={median([r['floor'] for r in rs]):.0f}/s "
            f"ratio={median([r['ratio'] for r in rs]):.2f} "
            f"lost={median([r['lost'] for r in rs]):.0f}")
    if 1 in by_n and 16 in by_n:
        ratios = [b["cpu_s_per_m"] / a["cpu_s_per_m"]
                  for a, b in zip(by_n[1], by_n[16], strict=True)]
        bench.lines["fanout16"] = (f"fanout16 {IMAGE}: cpu_ratio={median(ratios):.2f} "
                                   f"lost={median([r['lost'] for r in by_n[16]]):.0f}")


def fanout_run(bench: Bench, d: Daemon, iid: str, n: int, gen: Generator) -> dict[str, Any]:
    count = gen.count
    m0 = d.metrics()
    clients = [subprocess.Popen([str(bench.goclient), "-addr", d.address, "-attach", iid,
                                 "-quiet", "-stop-after", str(count)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(n)]
    try:
        time.sleep(1.5 + 0.05 * n)  # attach streams are not visible from outside
        cpu0 = cpu_seconds(d.pid)
        mem = MemPeak(d.pid)
        gen.go()
        g = gen.result()
        summaries = []
        deadline = time.monotonic() + max(10.0, count / 50_000)
        for cl in clients:
            try:
                out, _ = cl.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                cl.send_signal(signal.SIGINT)
                out, _ = cl.communicate(timeout=30)
            summaries.append(json.loads(out.strip().splitlines()[-1]))
        cpu = cpu_seconds(d.pid) - cpu0
        peak = mem.stop()
    finally:
        for cl in clients:
            if cl.poll() is None:
                cl.kill()
                cl.wait()
        gen.kill()
    m1 = d.metrics()
    received = [int(s["records"]) for s in summaries]
    gaps = [int(s["last_seq"]) - int(s["first_seq"]) + 1 - int(s["records"])
            if s["records"] else 0 for s in summaries]
    rates = [float(s["records_per_s"]) for s in summaries]
    return {"generated": count, "received": statistics.mean(received),
            "worst": min(received), "kernel_lost": m1["kernel_lost"] - m0["kernel_lost"],
            "lost": sum(max(0, count - r) for r in received),
            "ledger_dropped": m1["grpc_dropped"] - m0["grpc_dropped"],
            "seq_gaps": sum(gaps), "events_per_s": min(rates), "gen_rate": g["rate"],
            "cpu_s_per_m": cpu / count * 1e6, **peak}
