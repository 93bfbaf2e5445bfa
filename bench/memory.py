"""Scenario m: the daemon's memory with ten gadget instances (five trace_exec, five trace_open),
idle and with every replay buffer full.

A daemon of its own (so no earlier scenario's heap is in it) creates the ten instances, each
filtered in the kernel on one comm: a copy of /bin/true under a unique name for trace_exec
(``exec_loop -p`` runs it) and the open generator for trace_open. ``idle`` is RssAnon once all
ten run; ``full`` once each has taken at least its buffer's length (1024 packets) of records,
which the ledger's per-instance stage shows. RssFile is mostly bcc's LLVM.

Line: ``memory 5 trace_exec + 5 trace_open instances: idle_anon_mb=X full_anon_mb=Y
file_mb=Z``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from bench.common import COMM_PARAM, TARGET, log, mem_kb, wait_for
from bench.daemon import Daemon
from bench.session import Bench, Row
from bench.sinks import stage_counts

INSTANCES = (("trace_exec", 5), ("trace_open", 5))
BUFFER = 1024
"""Packets each instance keeps (the default eventBufferLength)."""
FILL = BUFFER + 200
"""Events generated per gadget: every buffer full, and wrapped."""


def _anon_mb(pid: int, samples: int = 5) -> tuple[float, float]:
    """The highest RssAnon and RssFile (MB) over a few samples 50 ms apart."""
    anon = file = 0.0
    for _ in range(samples):
        m = mem_kb(pid)
        anon = max(anon, m.get("RssAnon", 0) / 1024)
        file = max(file, m.get("RssFile", 0) / 1024)
        time.sleep(0.05)
    return anon, file


def run_memory(bench: Bench) -> None:
    from api.client import GadgetClient
    from bench.peers import exec_loop_path
    from pipeline._gen import gadget_service_pb2 as pb

    tmp = bench.tmp / "memory"
    tmp.mkdir(exist_ok=True)
    true_copy = tmp / ("gpm" + os.urandom(4).hex())
    shutil.copy("/bin/true", true_copy)
    true_copy.chmod(0o755)
    comms = {"trace_exec": true_copy.name[:15], "trace_open": bench.comm}
    d = Daemon(tmp)
    try:
        ids: list[str] = []
        with GadgetClient(d.address) as c:
            for image, n in INSTANCES:
                for k in range(n):
                    resp = c.instances.CreateGadgetInstance(pb.CreateGadgetInstanceRequest(
                        gadgetInstance=pb.GadgetInstance(
                            name=f"mem-{image.replace('_', '-')}-{k}",
                            gadgetConfig=pb.GadgetRunRequest(
                                imageName=image, version=1,
                                paramValues={COMM_PARAM: comms[image]})),
                        eventBufferLength=BUFFER))
                    ids.append(resp.gadgetInstance.id)
            log(f"memory: {len(ids)} instances created; waiting for them to run")

            def running() -> bool:
                resp = c.instances.ListGadgetInstances(pb.ListGadgetInstancesRequest())
                return sum(1 for g in resp.gadgetInstances
                           if g.state.status == pb.StatusRunning) >= len(ids)

            wait_for(running, 600, "ten instances running")
        idle, _ = _anon_mb(d.pid)
        log(f"memory: idle RssAnon {idle:.0f} MB; filling the buffers")
        subprocess.run([str(exec_loop_path()), "-p", str(true_copy), str(FILL), "0"],
                       check=True, capture_output=True, timeout=600)
        subprocess.run([str(bench.gen_binary), TARGET, str(FILL), "0"], check=True,
                       capture_output=True, timeout=600)
        stages = [f"instance:{i[:12]}" for i in ids]

        def full() -> bool:
            counts = stage_counts(d)
            return all(counts.get(("delivered", s), 0.0) >= BUFFER for s in stages)

        wait_for(full, 120, "every instance's buffer full")
        anon, file = _anon_mb(d.pid)
        with GadgetClient(d.address) as c:
            for i in ids:
                c.instances.RemoveGadgetInstance(pb.GadgetInstanceId(id=i))
    finally:
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    label = " + ".join(f"{n} {image}" for image, n in INSTANCES)
    bench.rows.append(Row(f"m: {label} instances, full buffers", rss_anon_mb=anon,
                          rss_file_mb=file, note=f"idle {idle:.0f} MB anon"))
    bench.raw["memory"] = {"idle_anon_mb": idle, "full_anon_mb": anon, "file_mb": file}
    bench.lines["memory"] = (f"memory {label} instances: idle_anon_mb={idle:.0f} "
                             f"full_anon_mb={anon:.0f} file_mb={file:.0f}")


def main() -> None:  # pragma: no cover - a manual entry point
    import tempfile

    from bench.common import QUICK, make_generator_binary, peers

    goclient, open_loop = peers()
    with tempfile.TemporaryDirectory(prefix="gp-bench-") as t:
        gen, comm = make_generator_binary(Path(t), open_loop)
        bench = Bench(QUICK, Path(t), goclient, gen, comm)
        run_memory(bench)
        print(bench.lines["memory"])


if __name__ == "__main__":
    main()
