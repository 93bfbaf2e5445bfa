"""trace_capabilities: a child that drops to nobody, then chowns a root-owned file and binds
port 80, both refused for want of a capability."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess
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


def _by_cap(got: Collected, cap: int) -> list[dict[str, object]]:
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
    assert b"cap_capable" in r["kstack"]  # type: ignore[operator]
    assert abs(r["timestamp_raw"] / 1e9 - time.time()) < 60  # type: ignore[operator]
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
                        time.sleep(0.3)  # past a drain interval: their records would be in
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
