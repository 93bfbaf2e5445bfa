"""Containers from a real runtime: Debian's containerd runs busybox containers with Kubernetes'
CRI labels (tests/peers/containerd.py); the daemon watches it, and records of processes in
those containers carry their pod, namespace and container, from their first exec on.

Every test waits on what it observes (a record, a runtime event), never on time: time only
bounds how long a test may wait before it fails.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from api.client import RunStream
from api.decode import DataSourceDecoder, flatten
from pipeline._gen import gadget_service_pb2 as pb
from pipeline.containers.collection import ContainerCollection
from pipeline.containers.watcher import RuntimeWatcher
from pipeline.graph import EdgeClosed, Overflow
from pipeline.ledger import Ledger
from pipeline.run import STAGE_FILTER, STAGE_SOURCE, GadgetRun
from pipeline.sources.catalog import Catalog
from tests.daemon import DaemonProcess
from tests.e2e.gadget_helpers import decode_all
from tests.peers.containerd import Containerd

pytestmark = pytest.mark.bpf

LOCAL = "operator.LocalManager."


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    with Containerd() as c:
        yield c


@pytest.fixture(scope="module")
def cdaemon(containerd: Containerd) -> Iterator[DaemonProcess]:
    """A daemon watching the test's containerd."""
    d = DaemonProcess("--containerd-socket", str(containerd.socket))
    d.start()
    try:
        yield d
    finally:
        d.close()


def unique(what: str) -> str:
    return f"{what}-{uuid.uuid4().hex[:8]}"


def marker(containerd: Containerd, name: str) -> str:
    """A file in the containers' root filesystem that only this test opens."""
    path = f"/etc/{unique(name)}"
    (containerd.rootfs / path.lstrip("/")).write_text("gadgetpipe\n")
    return path


class Reader:
    """A run stream's records, decoded by the spec's rule (strings as str), read on demand;
    the run is stopped when ``timeout`` passes, so a quiet stream still ends."""

    def __init__(self, stream: RunStream, timeout: float) -> None:
        self.stream = stream
        self.seen: list[dict[str, Any]] = []
        self._timer = threading.Timer(timeout, stream.stop)
        self._timer.start()
        self._timeout = timeout
        self._records = self._read()

    def _read(self) -> Iterator[dict[str, Any]]:
        info: pb.GadgetInfo | None = None
        for ev in self.stream.raw():
            if ev.type == 4:
                info = pb.GadgetInfo.FromString(ev.payload)
            elif ev.type == 0:
                assert info is not None, "payload before GadgetInfo"
                ds = next(d for d in info.dataSources if d.id == ev.dataSourceID)
                els = (list(pb.GadgetDataArray.FromString(ev.payload).dataArray)
                       if ds.type == 2 else [pb.GadgetData.FromString(ev.payload).data])
                texts = {f.fullName for f in ds.fields if f.kind in (12, 13)}  # String, CString
                for el in els:
                    r = decode_all(ds, el)
                    yield {k: v.decode() if k in texts else v for k, v in r.items()}

    def first(self, want: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The next record ``want`` accepts (the ones before it are kept in ``seen``)."""
        for r in self._records:
            self.seen.append(r)
            if want(r):
                return r
        raise AssertionError(f"no such record within {self._timeout} s "
                             f"({len(self.seen)} others)")

    def finish(self) -> None:
        self._timer.cancel()
        self.stream.stop()
        for _ in self._records:
            pass


def loop(cmd: str, pause: str = "0.1") -> list[str]:
    """A container program doing ``cmd`` again and again (the pause paces the workload)."""
    return ["/bin/sh", "-c", f"while true; do {cmd}; sleep {pause}; done"]


def test_a_container_started_during_a_run_carries_its_pod_from_its_first_exec(
        containerd: Containerd, cdaemon: DaemonProcess) -> None:
    ns = unique("ns")
    canary = containerd.run("canary", loop("/bin/true"), pod="canary", namespace=ns,
                            container="canary")
    target_cmd = f"/bin/cat /etc/{unique('nofile')}; exec /bin/sleep 1000"
    started: list[Any] = []
    try:
        with cdaemon.client() as c:
            reader = Reader(c.run("trace_exec", {LOCAL + "k8s-namespace": ns}), 120)
            # The canary's execs show that tracing is live; only then the target starts.
            reader.first(lambda r: r["k8s.podName"] == "canary")
            t = threading.Thread(target=lambda: started.append(containerd.run(
                "target", ["/bin/sh", "-c", target_cmd], pod="web-0", namespace=ns,
                container="app")))
            t.start()
            try:
                rec = reader.first(lambda r: r["k8s.podName"] == "web-0")
            finally:
                t.join()
                reader.finish()
    finally:
        containerd.remove(canary.id)
    [target] = started
    # The first exec of the container is its init process becoming /bin/sh.
    assert rec["args"].split("\xa0")[:2] == ["/bin/sh", "-c"], rec["args"]
    assert rec["proc.pid"] == target.pid
    assert (rec["k8s.namespace"], rec["k8s.podName"], rec["k8s.containerName"]) == \
        (ns, "web-0", "app")
    assert rec["runtime.containerName"] == "app"
    assert rec["runtime.containerId"] == target.id
    assert rec["runtime.runtimeName"] == "containerd"
    assert rec["runtime.containerPid"] == target.pid
    assert rec["runtime.containerStartedAt"] > 0
    assert rec["proc.mntns_id"] == Containerd.mntns_of(target.pid)
    # Only the selected namespace's containers, no host process.
    assert {r["k8s.namespace"] for r in reader.seen} == {ns}
    containerd.remove(target.id)


def test_opens_in_a_container_carry_pod_namespace_container_and_pod_labels(
        containerd: Containerd, cdaemon: DaemonProcess) -> None:
    path = marker(containerd, "open")
    uid = uuid.uuid4().hex
    pod = unique("pod")
    # The pod's labels live on its sandbox container, as the CRI plugin keeps them.
    sandbox = containerd.run("sandbox", ["/bin/sleep", "1000"], pod=pod, namespace="shop",
                             pod_uid=uid, sandbox=True, labels={"app": "cart", "tier": "web"})
    app = containerd.run("opener", loop(f"/bin/cat {path} >/dev/null"), pod=pod,
                         namespace="shop", container="cart", pod_uid=uid)
    try:
        with cdaemon.client() as c:
            reader = Reader(c.run("trace_open", {LOCAL + "k8s-podname": pod}), 60)
            try:
                rec = reader.first(lambda r: r["fname"] == path)
            finally:
                reader.finish()
    finally:
        containerd.remove(app.id)
        containerd.remove(sandbox.id)
    assert (rec["k8s.namespace"], rec["k8s.podName"], rec["k8s.containerName"]) == \
        ("shop", pod, "cart")
    assert rec["k8s.podLabels"] == "app=cart,tier=web"
    assert rec["runtime.containerId"] == app.id
    assert rec["k8s.hostnetwork"] is False


async def _follow(run: GadgetRun, until: Callable[[list[dict[str, Any]]], bool],
                  timeout: float) -> list[dict[str, Any]]:
    """An in-process run's records (decoded through its own schema) until ``until`` holds."""
    edge = run.subscribe("test", 1 << 16, Overflow.BLOCK)
    decoders = {s.name: DataSourceDecoder(s.to_proto()) for s in run.schemas}
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not until(got):
        left = deadline - time.monotonic()
        assert left > 0, f"not seen within {timeout} s ({len(got)} records)"
        try:
            _, batch = await asyncio.wait_for(edge.get(), left)
        except EdgeClosed:
            break
        dec = decoders[batch.schema.name]
        got += [flatten(dec.decode(pb.DataElement(payload=batch.payloads(i))))
                for i in range(len(batch))]
        edge.delivered(len(batch))
    return got


async def test_a_pod_filter_yields_only_that_pods_records_and_keeps_others_in_the_kernel(
        containerd: Containerd) -> None:
    a_path, b_path = marker(containerd, "a"), marker(containerd, "b")
    pod_a, pod_b = unique("a"), unique("b")
    a = containerd.run("a", loop(f"/bin/cat {a_path} >/dev/null", "0.05"), pod=pod_a,
                       namespace="f", container="a")
    # B opens as fast as its shell can (a builtin reading the file: no fork per open): were its
    # records to reach user space, thousands per second would.
    b = containerd.run("b", ["/bin/sh", "-c", f"while true; do read x < {b_path}; done"],
                       pod=pod_b, namespace="f", container="b")
    collection = ContainerCollection()
    watcher = RuntimeWatcher(collection, str(containerd.socket))
    await watcher.start()
    ledger = Ledger()
    run = GadgetRun(Catalog().resolve("trace_open"),
                    {"operator.KubeManager.podname": pod_a},  # kubectl-gadget's key
                    ledger, "sel", containers=collection)
    try:
        await asyncio.wait_for(watcher.synced.wait(), 30)
        await run.start()
        t0 = time.monotonic()
        got = await _follow(run, lambda rs: sum(r["fname"] == a_path for r in rs) >= 20, 60)
        traced_s = time.monotonic() - t0
        b_rate = await _count_opens(b_path)
    finally:
        await run.stop()
        await watcher.stop()
        collection.close()
        containerd.remove(a.id)
        containerd.remove(b.id)
    assert {r["k8s.podName"] for r in got} == {pod_a}
    assert b_path not in {r["fname"] for r in got}
    # What the selection dropped in user space: namespaces the kernel map did not hold yet
    # (new host namespaces, classified once); B's were in it from the start.
    filtered = ledger.get("sel", STAGE_FILTER, "dropped", "filtered")
    produced = ledger.get("sel", STAGE_SOURCE, "produced")
    b_meanwhile = b_rate * traced_s
    assert b_meanwhile > 2000, f"container B did not run its loop ({b_rate} opens/s)"
    assert filtered < b_meanwhile / 20, (filtered, produced, b_meanwhile)


async def _count_opens(path: str) -> int:
    """Opens of ``path`` per second by anyone, measured with an unselected trace_open run."""
    ledger = Ledger()
    run = GadgetRun(Catalog().resolve("trace_open"), {"operator.filter.filter": f"fname=={path}"},
                    ledger, "count")
    await run.start()
    try:
        got = await _follow(run, lambda rs: len(rs) >= 2000, 30)
        stamps = [r["timestamp_raw"] for r in got]
    finally:
        await run.stop()
    return int(len(stamps) / max((stamps[-1] - stamps[0]) / 1e9, 1e-3))


def test_dns_inside_a_containers_network_namespace(containerd: Containerd,
                                                   cdaemon: DaemonProcess) -> None:
    pod = unique("dns")
    name = f"{unique('gp')}.test"
    box = containerd.run("dns", ["/bin/sleep", "1000"], pod=pod, namespace="net",
                         container="resolver")
    netns = Containerd.netns_of(box.pid)
    # A DNS server inside the container's network namespace (which has only a loopback).
    dnsmasq = subprocess.Popen(
        ["nsenter", "-t", str(box.pid), "-n", "dnsmasq", "--no-daemon", "--port=53",
         "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
         f"--address=/{name}/10.1.2.3"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stop = threading.Event()

    def ask() -> None:
        # The run traces once its sockets exist; ask until the answer is seen.
        while not stop.is_set():
            containerd.exec(box.id, ["/bin/nslookup", name, "127.0.0.1"])

    try:
        with cdaemon.client() as c:
            reader = Reader(c.run("trace_dns", {LOCAL + "k8s-podname": pod}), 60)
            t = threading.Thread(target=ask)
            t.start()
            try:
                resp = reader.first(lambda r: r["name"] == name + "." and r["qr"] == "R"
                                    and r["addresses"] == "10.1.2.3")
            finally:
                stop.set()
                t.join()
                reader.finish()
    finally:
        dnsmasq.terminate()
        dnsmasq.wait()
        containerd.remove(box.id)
    queries = [r for r in reader.seen if r["name"] == name + "." and r["qr"] == "Q" and
               r["pkt_type"] == "OUTGOING"]
    assert queries, "no query seen leaving nslookup"
    q = queries[0]
    assert q["proc.comm"] == "nslookup"
    for r in (q, resp):
        assert (r["k8s.podName"], r["k8s.namespace"]) == (pod, "net")
        assert r["runtime.containerId"] == box.id
    assert q["netns_id"] == resp["netns_id"] == netns


def test_snapshot_process_limited_to_a_pod(containerd: Containerd,
                                           cdaemon: DaemonProcess) -> None:
    pod = unique("snap")
    box = containerd.run("snap", ["/bin/sleep", "1000"], pod=pod, namespace="s",
                         container="sleeper")
    try:
        with cdaemon.client() as c:
            reader = Reader(c.run("snapshot_process", {LOCAL + "k8s-podname": pod}), 60)
            try:
                reader.first(lambda r: r["pid"] == box.pid)
            finally:
                reader.finish()
            rows = reader.seen
    finally:
        containerd.remove(box.id)
    assert {r["pid"] for r in rows} == {box.pid}
    assert rows[0]["k8s.podName"] == pod and rows[0]["runtime.containerId"] == box.id


def test_without_a_runtime_the_daemon_runs_and_says_so_once(tmp_path: Any) -> None:
    missing = tmp_path / "no-containerd.sock"
    comm = unique("h")[:15]
    exe = tmp_path / comm  # a process's comm is the name it was executed by
    exe.symlink_to("/bin/true")
    with DaemonProcess("--containerd-socket", str(missing)) as d:
        with d.client() as c:
            reader = Reader(c.run("trace_exec", {"operator.oci.ebpf.comm": comm}), 60)
            stop = threading.Event()

            def spawn() -> None:
                while not stop.is_set():
                    subprocess.run([str(exe)], check=False)
                    stop.wait(0.1)

            t = threading.Thread(target=spawn)
            t.start()
            try:
                rec = reader.first(lambda r: True)
            finally:
                stop.set()
                t.join()
                reader.finish()
            # A selection without a runtime: the run starts, says why nothing matches.
            logs: list[str] = []
            sel = c.run("trace_exec", {LOCAL + "k8s-podname": "nothing"})
            for ev in sel:
                if ev.log:
                    logs.append(ev.log)
                    sel.stop()
        log = d.log()
    assert rec["k8s.podName"] == "" and rec["runtime.containerId"] == ""
    assert rec["runtime.containerPid"] == 0
    assert log.count(f"containers: no container runtime at {missing}") == 1, log
    assert any("no container matches" in m for m in logs), logs
