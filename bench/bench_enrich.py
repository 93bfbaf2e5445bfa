"""Container enrichment: its cost on the per-record path, how fast a new container becomes
known, and the daemon's memory with many containers known.

Run as root, alone: ``python -m bench.bench_enrich [--count N] [--repeats R] [--containers C]``.
It starts Debian's containerd in a scratch dir (tests/peers/containerd.py) and prints:

- ``enrich trace_open: ours=N/s floor=F/s ratio=R lost=L``: bench/loadgen/open_loop (built
  static, so it runs in a busybox container) opens a file COUNT times inside a container with
  Kubernetes' CRI labels. ``floor`` is the generator's rate with tracing on and only a ring
  reader draining (the gadget's source, in this process, counting what it drains); ``ours``
  the rate through the daemon watching containerd to an unmodified grpc-go client
  (bench/goclient, one message per record), the run selecting the container's pod
  (``operator.LocalManager.k8s-podname``) so every record is looked up in the collection and
  carries upstream's k8s.* and runtime.* fields. ``lost`` = records opened but not received.
  Medians of the repeats; the ratio is taken per repeat.
- ``container known: median=...ms max=...ms``: from ``ctr run -d`` to the collection's ADDED
  event (an in-process collection and watcher on the same containerd), and from containerd's
  task-create event (its timestamp) to the same moment.
- ``memory with C containers: rss_anon=...MB (+...MB over none) fds=...``: a daemon started
  with C busybox containers running, once its watcher listed them (its log says so), against
  the same daemon with none.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import OPEN_PROGS

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "trace_open"
TARGET = "/etc/passwd"  # exists in the busybox root filesystem (tests/peers/containerd.py)
PYTHON = sys.executable


def log(msg: str) -> None:
    print(f"[bench_enrich] {msg}", file=sys.stderr, flush=True)


def static_open_loop(dest: Path) -> Path:
    """bench/loadgen/open_loop linked statically (the container has no libc)."""
    src = ROOT / "bench" / "loadgen" / "open_loop.c"
    subprocess.run(["cc", "-O2", "-static", "-o", str(dest), str(src)], check=True)
    return dest


def bpf_programs(pid: int) -> int:
    n = 0
    for entry in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            n += entry.read_text().count("prog_id:")
    return n


def mem_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0])
    return out


class ContainerGenerator:
    """open_loop inside a container of pod ``pod``: started paused (-w), released by go()."""

    def __init__(self, containerd: Any, binary: str, pod: str, count: int) -> None:
        self.cid = containerd.new_id(f"gen{uuid.uuid4().hex[:6]}")
        self._containerd = containerd
        args = ["run", "--rm", "--label", f"io.kubernetes.pod.name={pod}", "--label",
                "io.kubernetes.pod.namespace=bench", "--label",
                "io.kubernetes.container.name=gen", "--rootfs", str(containerd.rootfs),
                self.cid, f"/bin/{binary}", "-w", TARGET, str(count)]
        self.proc = subprocess.Popen(
            [containerd._ctr, "-a", str(containerd.socket), "-n", "k8s.io", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 600) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=timeout)
        lines = [x for x in out.splitlines() if x.startswith("{")]
        if not lines:
            raise RuntimeError(f"the generator printed no result: {out[-500:]!r}")
        return dict(json.loads(lines[-1]))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._containerd.remove(self.cid)


# -- the floor: the gadget's source alone, counting ---------------------------------------------

async def floor_run(containerd: Any, binary: str, count: int) -> dict[str, float]:
    from pipeline.batch import Batch
    from pipeline.params import resolve
    from pipeline.run import OPERATOR_PARAMS
    from pipeline.sources.catalog import Catalog
    from pipeline.sources.tracer import TracerSource

    spec = Catalog().resolve(IMAGE)
    values = resolve([*spec.params, *OPERATOR_PARAMS],
                     {"operator.oci.ebpf.comm": binary}, ())
    src = TracerSource(spec, values)
    got = 0

    async def emit(batch: Batch) -> None:
        nonlocal got
        got += len(batch)

    gen = ContainerGenerator(containerd, binary, "floor", count)
    try:
        await src.start(emit, lambda sev, msg: None)
        gen.go()
        g = await asyncio.to_thread(gen.result)
        deadline = time.monotonic() + 30
        while got + src.lost() < count and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the last drains
        lost = src.lost()
    finally:
        await src.stop()
        gen.kill()
    return {"rate": float(g["rate"]), "received": float(got), "kernel_lost": float(lost)}


# -- ours: the daemon watching containerd, the Go client -----------------------------------------

class Daemon:
    def __init__(self, tmp: Path, containerd_socket: str) -> None:
        self.socket = tmp / "gp.sock"
        self.address = f"unix://{self.socket}"
        config = tmp / "config.yaml"
        config.write_text("instances: []\n")
        self.log_path = tmp / "daemon.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "api.cli", "serve", "--listen", self.address, "--state-dir",
             str(tmp / "state"), "--metrics-listen", "off", "--config", str(config),
             "--containerd-socket", containerd_socket, "--log-level", "info"],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        self.wait_log(r"containers: (watching|no container runtime)", 60)
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start:\n{self.log()[-2000:]}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.log())
            if m:
                return m
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no {pattern!r} in the daemon log:\n{self.log()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def chain_run(containerd: Any, daemon: Daemon, goclient: Path, binary: str,
              count: int) -> dict[str, float]:
    pod = f"bench-{uuid.uuid4().hex[:6]}"
    before = bpf_programs(daemon.proc.pid)
    cmd = [str(goclient), "-addr", daemon.address, "-image", IMAGE, "-quiet",
           "-param", f"operator.oci.ebpf.comm={binary}",
           "-param", f"operator.LocalManager.k8s-podname={pod}",
           "-stop-after", str(count)]
    client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    gen = ContainerGenerator(containerd, binary, pod, count)
    try:
        deadline = time.monotonic() + 60
        while bpf_programs(daemon.proc.pid) < before + OPEN_PROGS:
            if client.poll() is not None or time.monotonic() > deadline:
                client.kill()  # a client still waiting would never end communicate()
                raise RuntimeError(f"the run did not attach: {client.communicate()[1][-2000:]}")
            time.sleep(0.01)
        cpu0 = _cpu(daemon.proc.pid)
        gen.go()
        g = gen.result()
        try:
            out, _ = client.communicate(timeout=max(10.0, count / 50_000))
        except subprocess.TimeoutExpired:
            client.send_signal(signal.SIGINT)
            out, _ = client.communicate(timeout=60)
        cpu = _cpu(daemon.proc.pid) - cpu0
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        gen.kill()
    summary = json.loads(out.strip().splitlines()[-1])
    received = int(summary["records"])
    return {"rate": float(summary.get("records_per_s") or g["rate"]), "gen_rate": float(g["rate"]),
            "received": float(received), "lost": float(count - received),
            "seq_gaps": float(summary["lost"]), "cpu_us_per_record": cpu / max(received, 1) * 1e6}


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- what the fields cost to encode, with and without them -------------------------------------

async def encode_cost(containerd: Any, binary: str, count: int) -> dict[str, float]:
    """Batches of a real trace (the generator in a container, the run selecting its pod),
    framed per record as the gRPC stream frames them: with the k8s/runtime columns, and the
    same batches without them (what a record cost before this enrichment). Medians of 5."""
    import timeit

    from pipeline import wire
    from pipeline.batch import Batch
    from pipeline.containers.collection import ContainerCollection
    from pipeline.containers.watcher import RuntimeWatcher
    from pipeline.graph import Overflow
    from pipeline.ledger import Ledger
    from pipeline.run import GadgetRun
    from pipeline.sources.catalog import Catalog

    coll = ContainerCollection()
    watcher = RuntimeWatcher(coll, str(containerd.socket))
    await watcher.start()
    await asyncio.wait_for(watcher.synced.wait(), 30)
    pod = f"enc-{uuid.uuid4().hex[:6]}"
    run = GadgetRun(Catalog().resolve(IMAGE), {"operator.oci.ebpf.comm": binary,
                                              "operator.LocalManager.k8s-podname": pod},
                    Ledger(), "enc", containers=coll)
    edge = run.subscribe("enc", 1 << 22, Overflow.BLOCK)
    gen = ContainerGenerator(containerd, binary, pod, count)
    batches: list[Batch] = []
    try:
        await run.start()
        gen.go()
        got = 0
        while got < count:
            _, b = await asyncio.wait_for(edge.get(), 60)
            batches.append(b)
            got += len(b)
            edge.delivered(len(b))
    finally:
        await run.stop()
        gen.kill()
        await watcher.stop()
        coll.close()
    n = sum(len(b) for b in batches)
    with_ = [b for b in batches if len(b)]
    without = [Batch(b.schema, b.rows, b.extra[: len(b.extra) - ENRICH_FIELDS]) for b in with_]
    pod_col = with_[0].schema.field("k8s.podName").payload_index - 1
    if with_[0].extra[pod_col][0] != pod.encode():
        raise RuntimeError("the records do not carry their pod: enrichment is not on")

    def frame(bs: list[Batch]) -> None:
        for b in bs:
            wire.per_record_events(b, 1, 1)

    t_with = min(timeit.repeat(lambda: frame(with_), number=1, repeat=5)) / n * 1e6
    t_without = min(timeit.repeat(lambda: frame(without), number=1, repeat=5)) / n * 1e6
    return {"with_us": t_with, "without_us": t_without, "records": float(n)}


# -- how fast a new container is known ------------------------------------------------------------

async def known_latency(containerd: Any, n: int) -> dict[str, float]:
    from pipeline.containers import procfs
    from pipeline.containers.collection import ContainerCollection, ContainerEvent, EventKind
    from pipeline.containers.watcher import RuntimeWatcher

    coll = ContainerCollection()
    watcher = RuntimeWatcher(coll, str(containerd.socket))
    added: dict[str, asyncio.Event] = {}
    seen_at: dict[str, int] = {}

    init_start: dict[str, int] = {}

    def on(ev: ContainerEvent) -> None:
        if ev.kind is EventKind.ADDED and ev.container.id in added:
            seen_at[ev.container.id] = time.time_ns()
            init_start[ev.container.id] = procfs.start_time_ns(ev.container.pid)
            added[ev.container.id].set()

    coll.subscribe(on)
    await watcher.start()
    await asyncio.wait_for(watcher.synced.wait(), 30)
    from_run: list[float] = []
    from_task: list[float] = []
    try:
        for i in range(n):
            cid = containerd.new_id(f"lat{i}")
            added[cid] = asyncio.Event()
            t0 = time.time_ns()
            proc = await asyncio.create_subprocess_exec(
                containerd._ctr, "-a", str(containerd.socket), "-n", "k8s.io", "run", "-d",
                "--label", "io.kubernetes.pod.name=lat", "--rootfs", str(containerd.rootfs),
                cid, "/bin/sleep", "1000")
            await asyncio.wait_for(added[cid].wait(), 30)
            await proc.wait()
            from_run.append((seen_at[cid] - t0) / 1e6)
            if init_start.get(cid):  # /proc's start time: clock ticks (10 ms here)
                from_task.append(max(0.0, (seen_at[cid] - init_start[cid]) / 1e6))
            containerd.remove(cid)
    finally:
        await watcher.stop()
        coll.close()
    return {"median_ms": statistics.median(from_run), "max_ms": max(from_run),
            "after_task_ms": statistics.median(from_task) if from_task else float("nan")}


# -- memory with many containers known -------------------------------------------------------------

def memory_with(containerd: Any, n: int, tmp: Path) -> dict[str, float]:
    def measure(sub: str) -> tuple[dict[str, int], int, int]:
        d = Daemon(tmp / sub, str(containerd.socket))
        try:
            m = d.wait_log(r"containers: watching .* \((\d+) containers\)", 60)
            time.sleep(1.0)  # settle: the listing just finished; RSS read once it is quiet
            fds = len(os.listdir(f"/proc/{d.proc.pid}/fd"))
            return mem_kb(d.proc.pid), int(m[1]), fds
        finally:
            d.stop()

    (tmp / "none").mkdir()
    base, _, base_fds = measure("none")
    ids = []
    try:
        for i in range(n):
            ids.append(containerd.run(f"mem{i}", ["/bin/sleep", "1000"], pod=f"mem-{i}",
                                      namespace="bench", container="c").id)
        (tmp / "many").mkdir()
        many, known, fds = measure("many")
    finally:
        for cid in ids:
            containerd.remove(cid)
    return {"known": known, "rss_anon_mb": many["RssAnon"] / 1024,
            "delta_anon_mb": (many["RssAnon"] - base["RssAnon"]) / 1024,
            "rss_mb": many["VmRSS"] / 1024, "fds": fds, "fds_none": base_fds}


def measure_enrich(containerd: Any, daemon: Daemon, goclient: Path, binary: str, count: int,
                   repeats: int) -> list[dict[str, float]]:
    """``repeats`` times the floor then the chain (so each ratio is against the same moment's
    floor): one dict per repeat with the chain's results, ``floor`` and ``ratio``.
    ``binary`` is the static open_loop in ``containerd``'s root filesystem's /bin."""
    runs = []
    for i in range(repeats):
        log(f"repeat {i + 1}/{repeats}")
        f = asyncio.run(floor_run(containerd, binary, count))
        c = chain_run(containerd, daemon, goclient, binary, count)
        log(f"floor {f} ours {c}")
        runs.append({**c, "floor": f["rate"], "floor_kernel_lost": f["kernel_lost"],
                     "ratio": c["rate"] / f["rate"], "generated": float(count)})
    return runs


def enrich_line(runs: list[dict[str, float]]) -> str:
    """The summary line: medians of the repeats (the ratio taken per repeat)."""
    def med(key: str) -> float:
        return float(statistics.median([r[key] for r in runs]))

    return (f"enrich {IMAGE}: ours={med('rate'):.0f}/s floor={med('floor'):.0f}/s "
            f"ratio={med('ratio'):.2f} lost={med('lost'):.0f}")


ENRICH_FIELDS = 15
"""The k8s.* and runtime.* payloads the enrich operator adds (pipeline/operators/enrich.py)."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--containers", type=int, default=100)
    ap.add_argument("--latency-samples", type=int, default=20)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_enrich needs root (eBPF, containerd)")
    sys.path.insert(0, str(ROOT))
    from bench.peers import goclient_path
    from tests.peers.containerd import Containerd

    tmp = Path(tempfile.mkdtemp(prefix="gp-bench-enrich-"))
    try:
        with Containerd() as containerd:
            binary = "gpe" + os.urandom(4).hex()
            static_open_loop(containerd.rootfs / "bin" / binary)
            goclient = goclient_path()
            daemon = Daemon(tmp, str(containerd.socket))
            try:
                runs = measure_enrich(containerd, daemon, goclient, binary, args.count,
                                      args.repeats)
            finally:
                daemon.stop()
            print(enrich_line(runs), flush=True)
            enc = asyncio.run(encode_cost(containerd, binary, min(args.count, 300_000)))
            print(f"enrich encode {IMAGE}: us_per_record={enc['with_us']:.3f} "
                  f"without_fields={enc['without_us']:.3f}", flush=True)
            lat = asyncio.run(known_latency(containerd, args.latency_samples))
            print(f"container known: median={lat['median_ms']:.1f}ms max={lat['max_ms']:.1f}ms "
                  f"after ctr run; median={lat['after_task_ms']:.1f}ms after its init process "
                  "started", flush=True)
            mem = memory_with(containerd, args.containers, tmp)
            print(f"memory with {mem['known']:.0f} containers: rss_anon={mem['rss_anon_mb']:.1f}MB "
                  f"(+{mem['delta_anon_mb']:.1f}MB over none) rss={mem['rss_mb']:.1f}MB "
                  f"fds={mem['fds']:.0f} (none: {mem['fds_none']:.0f})", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
