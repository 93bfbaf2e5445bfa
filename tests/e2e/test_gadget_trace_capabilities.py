"""trace_capabilities: a child that drops to nobody, then chowns a root-owned file and binds
port 80, both refused for want of a capability."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import DaemonProcess
from tests.e2e.gadget_fields import assert_upstream_fields
from tests.e2e.gadget_helpers import Collected, collect

pytestmark = pytest.mark.bpf

NOBODY = 65534
CHILD = """
import os, socket, sys
open('/proc/self/comm', 'w').write(sys.argv[1])
os.setuid(int(sys.argv[3]))             # CAP_SETUID, allowed (root), via ns_capable_setid()
try:
    os.chown(sys.argv[2], 0, 0)         # CAP_CHOWN, refused: nobody does not own the file
except PermissionError:
    pass
s = socket.socket()
try:
    s.bind(('127.0.0.1', 80))           # CAP_NET_BIND_SERVICE, refused
except PermissionError:
    pass
s.close()
"""


@pytest.fixture
def root_file() -> Iterator[Path]:
    """A root-owned file that nobody can reach (pytest's tmp_path is not traversable)."""
    d = Path(tempfile.mkdtemp(prefix="gpcap-"))
    d.chmod(0o755)
    f = d / "owned-by-root"
    f.write_text("x")
    f.chmod(0o644)
    try:
        yield f
    finally:
        shutil.rmtree(d)


def _by_cap(got: Collected, cap: int) -> list[dict[str, Any]]:
    return [r for r in got.records if r["cap_raw"] == cap]


def test_refused_chown_and_bind_are_reported_with_cap_verdict_and_syscall(
        daemon: DaemonProcess, root_file: Path) -> None:
    comm = f"gpcap{uuid.uuid4().hex[:8]}"
    target = root_file
    pids: list[int] = []
    stop = threading.Event()

    def trigger() -> None:
        # Tracing attaches after the GadgetInfo event: repeat until the records arrive.
        while not stop.is_set():
            p = subprocess.Popen([sys.executable, "-c", CHILD, comm, str(target), str(NOBODY)])
            pids.append(p.pid)
            if p.wait(timeout=30) != 0:
                raise AssertionError(f"trigger child failed with {p.returncode}")
            stop.wait(0.2)

    with daemon.client() as c:
        stream = c.run("trace_capabilities", {"operator.oci.ebpf.comm": comm})
        t = threading.Thread(target=trigger, daemon=True)
        t.start()
        try:
            got = collect(stream, lambda g: bool(_by_cap(g, 0) and _by_cap(g, 10)), timeout=15)
        finally:
            stop.set()
            t.join()
    chown, bind, setuid = _by_cap(got, 0), _by_cap(got, 10), _by_cap(got, 7)
    assert chown, f"no CAP_CHOWN record: {got.records[:3]}"
    assert bind, f"no CAP_NET_BIND_SERVICE record: {got.records[:3]}"
    r = chown[0]
    assert r["proc.pid"] in pids
    assert r["proc.comm"] == comm.encode()
    assert r["proc.creds.uid"] == NOBODY
    assert r["cap"] == b"CAP_CHOWN"
    assert r["capable"] is False
    assert r["audit"] == 1
    assert r["syscall"] in (b"SYS_CHOWN", b"SYS_FCHOWNAT")
    # Upstream's kernel stack text: each frame's symbol followed by "; ", innermost first.
    frames = r["kstack"].split(b"; ")
    assert frames[0] == b"cap_capable" and frames[-1] == b"", r["kstack"]
    assert any(b"chown" in f for f in frames), r["kstack"]
    # nobody holds no capability: an empty set; names and user from the uid.
    assert r["cap_effective_raw"] == 0 and r["cap_effective"] == b""
    assert r["proc.creds.user"] == b"nobody"
    # Collected only on request: upstream's zeros and empty strings.
    assert r["ustack.stack_id"] == r["ustack.inode"] == 0
    assert r["ustack.addresses"] == r["ustack.symbols"] == r["ustack.buildid"] == b""
    assert abs(r["timestamp_raw"] / 1e9 - time.time()) < 60
    b = bind[0]
    assert b["proc.pid"] in pids
    assert b["cap"] == b"CAP_NET_BIND_SERVICE"
    assert b["capable"] is False
    assert b["syscall"] == b"SYS_BIND"
    # setuid() as root: allowed, and made through ns_capable_setid() (CAP_OPT_INSETID).
    assert setuid, "no CAP_SETUID record"
    assert setuid[0]["capable"] is True
    assert setuid[0]["insetid"] == 1
    assert setuid[0]["proc.creds.uid"] == 0
    assert setuid[0]["cap"] == b"CAP_SETUID" and setuid[0]["syscall"] == b"SYS_SETUID"
    # root's effective set: every FLAG_<cap> name of a set bit, in capability order.
    eff = setuid[0]["cap_effective_raw"]
    names = setuid[0]["cap_effective"].split(b"|")
    assert eff & (1 << 7) and b"FLAG_CAP_SETUID" in names
    assert len(names) == bin(eff).count("1")
    assert names[0] == b"FLAG_CAP_CHOWN" and names.index(b"FLAG_CAP_KILL") < \
        names.index(b"FLAG_CAP_SETUID")


def test_user_stacks_are_collected_on_request(daemon: DaemonProcess) -> None:
    # This process checks CAP_SETUID (setuid() as root, allowed) and stays alive, so its
    # mappings are there to name the frames when the record is read.
    stop = threading.Event()

    def trigger() -> None:
        while not stop.is_set():
            os.setuid(0)
            stop.wait(0.05)

    with daemon.client() as c:
        stream = c.run("trace_capabilities", {"operator.oci.ebpf.pid": str(os.getpid()),
                                              "operator.oci.ebpf.collect-ustack": "true"})
        t = threading.Thread(target=trigger, daemon=True)
        t.start()
        try:
            got = collect(stream, lambda g: bool(_by_cap(g, 7)), timeout=15)
        finally:
            stop.set()
            t.join()
    rows = _by_cap(got, 7)
    assert rows, f"no CAP_SETUID record: {got.records[:2]}"
    r = rows[0]
    exe = os.stat("/proc/self/exe")
    # pid_level0 is the thread's id (task->thread_pid), as upstream's.
    assert r["ustack.tgid_level0"] == os.getpid() and r["ustack.pid_level0"] == r["proc.tid"]
    assert r["ustack.pidns_level0"] == os.stat("/proc/self/ns/pid").st_ino
    assert r["ustack.inode"] == exe.st_ino
    assert os.makedev(r["ustack.major"], r["ustack.minor"]) == exe.st_dev
    assert r["ustack.mtime_sec"] == int(exe.st_mtime)
    assert r["ustack.base_addr_hash"] != 0 and r["ustack.stack_id"] < 0x80000000
    addresses = r["ustack.addresses"].split(b"; ")
    assert addresses[-1] == b"" and len(addresses) > 1
    assert all(a.startswith(b"0x") and len(a) == 18 for a in addresses[:-1]), addresses
    symbols = r["ustack.symbols"].split(b"; ")
    assert len(symbols) == len(addresses)
    # glibc's setuid() reaches the kernel from setuid itself or, with other threads (this
    # process has some), from its set*id broadcast.
    assert any(b"setuid" in s or b"setxid" in s for s in symbols), symbols
    assert r["ustack.buildid"] == b""


def test_announces_upstreams_fields(daemon: DaemonProcess) -> None:
    assert_upstream_fields(daemon, "trace_capabilities", [
        "current_userns", "target_userns", "cap_effective_raw", "cap_effective", "cap_raw",
        "cap", "audit", "insetid", "syscall_raw", "syscall", "kstack_raw", "kstack", "capable"])


def test_unique_reports_each_capability_once(daemon: DaemonProcess, root_file: Path) -> None:
    comm = f"gpcap{uuid.uuid4().hex[:8]}"
    seen = threading.Event()
    stop = threading.Event()
    runs_after: list[int] = []
    with daemon.client() as c:
        stream = c.run("trace_capabilities", {"operator.oci.ebpf.comm": comm,
                                              "operator.oci.ebpf.unique": "true"})

        def trigger() -> None:
            # Children until the first CAP_CHOWN arrives, then five more, then stop the run.
            while not stop.is_set():
                subprocess.run([sys.executable, "-c", CHILD, comm, str(root_file),
                                str(NOBODY)], check=True, timeout=30)
                if seen.is_set():
                    runs_after.append(1)
                    if len(runs_after) >= 5:
                        # Their records are in the ring or further: a stop detaches, then
                        # drains the ring, so any duplicate would still reach the client.
                        stream.stop()
                        return
                stop.wait(0.1)

        def until(g: Collected) -> bool:
            if _by_cap(g, 0):
                seen.set()
            return False  # the trigger stops the run

        t = threading.Thread(target=trigger, daemon=True)
        t.start()
        try:
            got = collect(stream, until, timeout=15)
        finally:
            stop.set()
            t.join()
    assert len(runs_after) >= 5, "too few trigger runs to show uniqueness"
    assert len(_by_cap(got, 0)) == 1
    assert len(_by_cap(got, 10)) == 1
