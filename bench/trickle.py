"""Scenario t: the daemon's CPU when events trickle (100 and 1,000 opens/s), with the drain
pacer (the defaults) against every tick draining (``operator.bcc.drain-max-wait=0s``, the
baseline) in the same run.

A daemon of its own runs one trace_open instance at a time, filtered in the kernel on the
generator's comm, with no client: the instance's buffer is the only consumer, as for an
instance that feeds sinks between attaches. Each step runs the paced generator, waits until the
instance's ledger stage has every record (nothing lost: a step with a missing record fails),
and takes the daemon's CPU over the generator's run. Modes alternate within each repeat.

Line: ``trickle trace_open: cpu_pct_100=X baseline_100=Y ratio_100=R cpu_pct_1000=...``
(ratio = ours / baseline: below 1 is cheaper).
"""

from __future__ import annotations

import time

from bench.common import COMM_PARAM, IMAGE, Generator, cpu_seconds, log, median, wait_for
from bench.daemon import Daemon
from bench.session import Bench, Row
from bench.sinks import stage_counts

RATES = (100, 1000)
MODES: tuple[tuple[str, dict[str, str]], ...] = (
    ("paced", {}), ("baseline", {"operator.bcc.drain-max-wait": "0s"}))


def _instance(d: Daemon, name: str, params: dict[str, str]) -> str:
    from api.client import GadgetClient
    from pipeline._gen import gadget_service_pb2 as pb

    with GadgetClient(d.address) as c:
        resp = c.instances.CreateGadgetInstance(pb.CreateGadgetInstanceRequest(
            gadgetInstance=pb.GadgetInstance(name=name, gadgetConfig=pb.GadgetRunRequest(
                imageName=IMAGE, version=1, paramValues=params))))
        gid = str(resp.gadgetInstance.id)

        def running() -> bool:
            got = c.instances.GetGadgetInstance(pb.GadgetInstanceId(id=gid))
            return bool(got.state.status == pb.StatusRunning)

        wait_for(running, 300, f"instance {name} running")
    return gid


def _remove(d: Daemon, gid: str) -> None:
    from api.client import GadgetClient
    from pipeline._gen import gadget_service_pb2 as pb

    with GadgetClient(d.address) as c:
        c.instances.RemoveGadgetInstance(pb.GadgetInstanceId(id=gid))


def _step(d: Daemon, bench: Bench, mode: str, extra: dict[str, str], rate: int,
          seconds: float) -> float:
    """Percent of a core the daemon used while ``rate`` opens/s ran for ``seconds``."""
    gid = _instance(d, f"trickle-{mode}-{rate}", {COMM_PARAM: bench.comm, **extra})
    stage = f"instance:{gid[:12]}"
    try:
        count = int(rate * seconds)
        gen = Generator(bench.gen_binary, count, rate)
        c0, t0 = cpu_seconds(d.pid), time.monotonic()
        gen.go()
        opened = gen.result()["opens"]
        cpu, wall = cpu_seconds(d.pid) - c0, time.monotonic() - t0
        wait_for(lambda: stage_counts(d).get(("delivered", stage), 0.0) >= opened, 60,
                 f"{mode} at {rate}/s: every record in the instance")
    finally:
        _remove(d, gid)
    return 100.0 * cpu / wall


def run_trickle(bench: Bench) -> None:
    seconds = 5.0 if bench.profile.repeats <= 3 else 10.0
    tmp = bench.tmp / "trickle"
    tmp.mkdir(exist_ok=True)
    d = Daemon(tmp)
    got: dict[tuple[str, int], list[float]] = {}
    try:
        for i in range(bench.profile.repeats):
            log(f"trickle repeat {i + 1}")
            for rate in RATES:
                for mode, extra in (MODES if i % 2 == 0 else MODES[::-1]):
                    got.setdefault((mode, rate), []).append(
                        _step(d, bench, mode, extra, rate, seconds))
    finally:
        d.stop()
    parts = []
    for rate in RATES:
        ours, base = median(got[("paced", rate)]), median(got[("baseline", rate)])
        ratios = [o / b for o, b in zip(got[("paced", rate)], got[("baseline", rate)],
                                        strict=True) if b]
        for mode, value in (("paced", ours), ("baseline", base)):
            bench.rows.append(Row(f"t: trickle {rate}/s, {mode}", events_per_s=rate,
                                  note=f"{value:.2f} % of a core"))
        parts.append(f"cpu_pct_{rate}={ours:.2f} baseline_{rate}={base:.2f} "
                     f"ratio_{rate}={median(ratios):.2f}")
    bench.lines["trickle"] = f"trickle {IMAGE}: " + " ".join(parts)
