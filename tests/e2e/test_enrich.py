"""The enrich operator: node name and the cgroup / container of a process placed in its own
cgroup, on an array data source (snapshot_process) and a per-record one (trace_capabilities)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from tests.daemon import DaemonProcess
from tests.e2e.gadget_helpers import cgroup, cgroup2_root, collect

pytestmark = pytest.mark.bpf

# A container-like cgroup leaf, as docker's systemd driver names them.
CID = uuid.uuid4().hex + uuid.uuid4().hex
LEAF = f"docker-{CID}.scope"


def _in_cgroup(procs: str, comm: str, then: str) -> subprocess.Popen[bytes]:
    """A child that joins the cgroup, names itself, runs ``then`` and sleeps."""
    code = (f"import os, time\nopen({procs!r}, 'w').write(str(os.getpid()))\n"
            f"open('/proc/self/comm', 'w').write({comm!r})\n{then}\ntime.sleep(30)\n")
    return subprocess.Popen([sys.executable, "-c", code])


def _fields(info: object, ds: str) -> dict[str, object]:
    d = next(x for x in info.dataSources if x.name == ds)  # type: ignore[attr-defined]
    return {f.fullName: f for f in d.fields}


def test_snapshot_rows_carry_node_cgroup_path_and_container_id(daemon: DaemonProcess) -> None:
    comm = f"gpenr{uuid.uuid4().hex[:8]}"
    with cgroup("gp-enrich", LEAF) as cg:
        child = _in_cgroup(str(cg / "cgroup.procs"), comm, "")
        try:
            deadline = time.monotonic() + 10
            while str(child.pid) not in (cg / "cgroup.procs").read_text().split():
                assert time.monotonic() < deadline, "the child did not join its cgroup"
                time.sleep(0.05)
            with daemon.client() as c:
                got = collect(c.run("snapshot_process", {
                    "operator.enrich.node": "true", "operator.enrich.container": "true",
                    "operator.oci.ebpf.pid": str(child.pid)}),
                    lambda g: bool(g.packets), timeout=15)
        finally:
            child.kill()
            child.wait()
    path = "/" + str(cg.relative_to(cgroup2_root()))
    assert got.info is not None
    fields = _fields(got.info, "processes")
    for name in ("k8s.node", "runtime.containerId", "runtime.runtimeName",
                 "runtime.cgroupPath"):
        f = fields[name]
        assert f.size == 0 and f.payloadIndex >= 1, name  # type: ignore[attr-defined]
    assert fields["k8s"].flags & 1  # type: ignore[attr-defined]  # Empty grouping node
    [row] = got.records
    assert row["pid"] == child.pid
    assert row["k8s.node"] == socket.gethostname().encode()
    assert row["runtime.cgroupPath"] == path.encode()
    assert row["runtime.containerId"] == CID.encode()
    assert row["runtime.runtimeName"] == b"docker"


def test_per_record_events_carry_the_cgroup_and_filter_sees_enriched_fields(
        daemon: DaemonProcess) -> None:
    comm = f"gpenr{uuid.uuid4().hex[:8]}"
    children: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    with cgroup("gp-enrich", LEAF) as cg:

        def trigger() -> None:
            # Tracing attaches after GadgetInfo: start children until one is seen. Each stays
            # alive (sleeping) so its /proc/<pid>/cgroup can be read.
            while not stop.is_set() and len(children) < 40:
                children.append(_in_cgroup(str(cg / "cgroup.procs"), comm, "os.setuid(65534)"))
                stop.wait(0.3)

        t = threading.Thread(target=trigger, daemon=True)
        try:
            with daemon.client() as c:
                stream = c.run("trace_capabilities", {
                    "operator.enrich.container": "true", "operator.oci.ebpf.comm": comm,
                    "operator.filter.filter": f"runtime.containerId=={CID}"})
                t.start()
                got = collect(stream, lambda g: bool(g.records), timeout=15)
        finally:
            stop.set()
            if t.is_alive():
                t.join()
            for ch in children:
                ch.kill()
                ch.wait()
    assert got.records, "no enriched capability record"
    r = got.records[0]
    assert r["proc.pid"] in [ch.pid for ch in children]
    assert r["cap"] == b"CAP_SETUID"
    assert r["runtime.containerId"] == CID.encode()
    assert r["runtime.cgroupPath"].endswith(f"/{LEAF}".encode())
    assert r["k8s.node"] == b""  # not asked for: sent empty, as upstream sends it
