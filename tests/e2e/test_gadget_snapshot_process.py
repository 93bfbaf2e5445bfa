"""snapshot_process: one array of every process, compared with /proc taken just before and after."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess
from tests.e2e.gadget_helpers import collect
from tests.e2e.upstream_fields import upstream_field_diff

pytestmark = pytest.mark.bpf


def _proc_table() -> dict[int, tuple[bytes, int]]:
    """pid -> (comm, ppid) of every process this root may inspect.

    Processes whose namespaces even root may not read (a sandbox supervisor, here pid 1 and its
    threads) are left out: the kernel hides them from task iterators too."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            os.readlink(entry / "ns" / "pid")
            comm = (entry / "comm").read_bytes().rstrip(b"\n")
            ppid = int(next(line for line in (entry / "status").read_text().splitlines()
                            if line.startswith("PPid:")).split()[1])
        except (OSError, StopIteration):
            continue  # gone meanwhile, or not inspectable
        out[int(entry.name)] = (comm, ppid)
    return out


def _wait_exec(comm: str, pids: list[int], timeout: float = 30.0) -> None:
    """Until every child has exec'd: before that its comm is still its parent's."""
    deadline = time.monotonic() + timeout
    want = comm.encode()
    while True:
        seen = [Path(f"/proc/{pid}/comm").read_bytes().rstrip(b"\n") for pid in pids]
        if all(c == want for c in seen):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"children did not exec {comm} within {timeout}s: {seen}")
        time.sleep(0.01)  # polling /proc


@contextlib.contextmanager
def sleepers(tmp: Path, n: int) -> Iterator[tuple[str, list[int]]]:
    """``n`` children running a copy of sleep under a unique name."""
    binary = tmp / f"gpsnap{uuid.uuid4().hex[:8]}"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", binary)
    procs = [subprocess.Popen([str(binary), "60"]) for _ in range(n)]
    try:
        _wait_exec(binary.name[:15], [p.pid for p in procs])
        yield binary.name[:15], [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_snapshot_lists_every_process_with_comm_ppid_uid_and_start_time(
        daemon: DaemonProcess, tmp_path: Path) -> None:
    t0 = time.time()
    with sleepers(tmp_path, 3) as (comm, pids), daemon.client() as c:
        before = _proc_table()
        got = collect(c.run("snapshot_process"), lambda g: bool(g.packets), timeout=15)
        after = _proc_table()
    assert got.info is not None
    ds = got.info.dataSources[0]
    assert ds.type == 2
    assert ds.annotations["fetch-interval"] == "0" and ds.annotations["fetch-count"] == "1"
    assert len(got.packets) == 1, "one snapshot per run"
    rows = {r["pid"]: r for r in got.records}
    assert len(rows) == len(got.records), "a process appears once (threads=false)"

    mine = [rows[p] for p in pids if p in rows]
    assert len(mine) == 3, f"children {pids} missing from the snapshot"
    for r in mine:
        assert r["comm"] == comm.encode()
        assert r["tid"] == r["pid"]
        assert r["parent.pid"] == os.getpid()
        assert r["creds.uid"] == 0 and r["creds.gid"] == 0
        assert r["mntns_id"] == os.stat("/proc/self/ns/mnt").st_ino
        assert t0 - 1 <= r["start_time"] / 1e9 <= time.time() + 1
        # Derived by name, as upstream's uidgidresolver does.
        assert r["creds.user"] == b"root" and r["creds.group"] == b"root"

    # Processes alive and unchanged across the snapshot must all be in it, as /proc shows them.
    stable = {p: v for p, v in before.items() if after.get(p) == v}
    missing = sorted(set(stable) - set(rows))
    assert not missing, f"processes missing from the snapshot: {missing}"
    for pid, (pcomm, ppid) in stable.items():
        name = rows[pid]["comm"]
        # /proc names kernel workers longer than their comm (kworker/0:0H-events_highpri).
        assert name == pcomm or (ppid in (0, 2) and pcomm.startswith(name)), (pid, name, pcomm)
        assert rows[pid]["parent.pid"] == ppid, pid
    # Anything else in the snapshot started or ended around it.
    unexplained = set(rows) - set(before) - set(after)
    assert len(unexplained) <= 5, f"too many processes unknown to /proc: {unexplained}"


def test_threads_param_lists_threads_and_comm_filter_applies_to_the_iterated_tasks(
        daemon: DaemonProcess, tmp_path: Path) -> None:
    ready = threading.Event()
    done = threading.Event()
    tids: list[int] = []

    def worker() -> None:
        tids.append(threading.get_native_id())
        ready.set()
        done.wait(30)

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    ready.wait(5)
    own_comm = Path("/proc/self/comm").read_bytes().rstrip(b"\n").decode()
    try:
        with daemon.client() as c:
            stream = c.run("snapshot_process", {"operator.oci.ebpf.threads": "true",
                                                "operator.oci.ebpf.comm": own_comm})
            got = collect(stream, lambda g: bool(g.packets), timeout=15)
    finally:
        done.set()
        t.join()
    assert got.records
    # The kernel-side comm filter tested each iterated task (threads inherit the comm).
    assert {r["comm"] for r in got.records} == {own_comm.encode()}
    mine = [r for r in got.records if r["pid"] == os.getpid()]
    assert {os.getpid(), tids[0]} <= {r["tid"] for r in mine}


def test_the_run_stays_open_after_its_one_snapshot_until_the_timeout(
        daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        t0 = time.monotonic()
        events = list(c.run("snapshot_process", timeout_s=2.0).raw())
        elapsed = time.monotonic() - t0
    assert [e.type for e in events].count(0) == 1
    assert 1.9 < elapsed < 15


def test_announces_every_field_upstream_does(daemon: DaemonProcess) -> None:
    diff = upstream_field_diff("snapshot_process", daemon)
    assert not diff.sources_only_upstream and not diff.sources_only_ours, diff.report()
    d = diff.sources["processes"]
    # k8s.* and runtime.* come from the container enrichment (pipeline/operators/enrich.py).
    missing = [n for n in d.only_upstream if not n.startswith(("k8s", "runtime"))]
    assert not missing, diff.report()
    assert d.only_ours == ["start_time"], diff.report()  # ours, hidden and json.skip
    assert not d.kinds and not d.flags and not d.annotations, diff.report()
