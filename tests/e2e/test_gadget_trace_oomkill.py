"""trace_oomkill: a child in a 20 MiB memory cgroup allocates until the OOM killer kills it."""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import datetime

import pytest

from tests.daemon import DaemonProcess
from tests.e2e.gadget_fields import assert_upstream_fields
from tests.e2e.gadget_helpers import collect, memory_cgroup, memory_hog, mntns_of

pytestmark = pytest.mark.bpf

LIMIT = 20 << 20


def test_oom_kill_reports_the_killed_child_and_its_trigger(daemon: DaemonProcess) -> None:
    comm = f"gpoom{uuid.uuid4().hex[:8]}"
    pids: list[int] = []
    codes: list[int] = []
    stop = threading.Event()
    with memory_cgroup(LIMIT) as cg, daemon.client() as c:
        stream = c.run("trace_oomkill", {"operator.filter.filter": f"tcomm=={comm}"})

        def trigger() -> None:
            # Tracing attaches after the GadgetInfo event, so kill children until one is seen.
            while not stop.is_set():
                child = memory_hog(cg.procs, comm)
                pids.append(child.pid)
                codes.append(child.wait(timeout=30))
                stop.wait(0.2)

        t = threading.Thread(target=trigger, daemon=True)
        t.start()
        try:
            got = collect(stream, lambda g: bool(g.records), timeout=15)
        finally:
            stop.set()
            t.join()
    assert got.records, f"no oomkill record arrived (children exited with {codes})"
    assert -9 in codes, f"no child was OOM-killed: exit codes {codes}"
    r = got.records[0]
    assert r["tpid"] in pids
    assert r["tcomm"] == comm.encode()
    # In a memory cgroup the allocating child itself hits the limit and is the victim.
    assert r["fprocess.pid"] == r["tpid"]
    assert r["fprocess.comm"] == comm.encode()
    assert r["fprocess.parent.pid"] == os.getpid()
    assert r["tmntns_id"] == mntns_of()
    # Resident pages include shared file pages charged elsewhere, so bound loosely: at least
    # half the limit was the child's own memory, and far less than 64 MiB in all.
    assert (LIMIT // 2) // 4096 < r["pages"] < (64 << 20) // 4096
    assert abs(r["timestamp_raw"] / 1e9 - time.time()) < 60
    # The readable fields upstream derives: the timestamp as text, the trigger's user names.
    stamp = datetime.fromisoformat(r["timestamp"].decode())
    assert stamp.timestamp() == pytest.approx(r["timestamp_raw"] / 1e9, abs=1e-5)
    assert r["fprocess.creds.user"] == b"root" and r["fprocess.creds.group"] == b"root"


def test_announces_upstreams_fields(daemon: DaemonProcess) -> None:
    # Upstream's gadget.yaml settings do not apply to its data source (README), so the
    # fields whose annotations come from their types are the gadget-specific ones here.
    assert_upstream_fields(daemon, "trace_oomkill", ["tmntns_id", "tpid", "tcomm", "pages"])
