"""Helpers for the gadget tests (trace_oomkill, trace_capabilities, snapshot_process, top_file,
enrichment): reading a run's records with the spec decoder, and cgroups to put triggers in."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from api.client import RunStream
from pipeline._gen import gadget_service_pb2 as pb
from tests.specdecode import field_value

READY_TIMEOUT = 120.0
"""Seconds a run may take to compile and attach (a busy machine compiles slowly)."""


@dataclass
class Collected:
    """What a run stream delivered: the GadgetInfo and the decoded records, per packet."""

    info: pb.GadgetInfo | None = None
    packets: list[tuple[int, list[dict[str, Any]]]] = field(default_factory=list)

    @property
    def records(self) -> list[dict[str, Any]]:
        return [r for _, recs in self.packets for r in recs]


def decode_all(ds: pb.DataSource, element: pb.DataElement) -> dict[str, Any]:
    """Every valued field of one element by full name, read by the spec's rule only."""
    out: dict[str, Any] = {}
    for f in ds.fields:
        if f.flags & (1 | 32):  # Empty, Unreferenced
            continue
        out[f.fullName] = field_value(f, element)
    return out


def collect(stream: RunStream, until: Callable[[Collected], bool], timeout: float,
            ) -> Collected:
    """Waits until the gadget traces (its ready event), then reads ``stream`` until ``until``
    holds or ``timeout`` passes; then stops the run and drains the stream. A type-2 (done)
    event fails the test, as upstream never sends one."""
    got = Collected()
    before = stream.wait_ready(timeout=READY_TIMEOUT)
    got.info = stream.info
    assert all(ev.type != 0 for ev in before), "a record before the ready event"
    deadline = time.monotonic() + timeout
    timer = threading.Timer(timeout, stream.stop)  # a quiet stream still ends in time
    timer.start()
    try:
        for ev in stream.raw():
            if ev.type == 4:
                got.info = pb.GadgetInfo.FromString(ev.payload)
            elif ev.type == 0:
                if got.info is None:
                    raise AssertionError("payload before GadgetInfo")
                ds = next(d for d in got.info.dataSources if d.id == ev.dataSourceID)
                if ds.type == 2:
                    els = list(pb.GadgetDataArray.FromString(ev.payload).dataArray)
                else:
                    els = [pb.GadgetData.FromString(ev.payload).data]
                got.packets.append((ev.seq, [decode_all(ds, el) for el in els]))
            elif ev.type == 2:
                raise AssertionError("a type-2 'done' event must never be sent")
            if until(got) or time.monotonic() > deadline:
                break
        stream.stop()
        for _ in stream.raw():
            pass  # the server ends the stream with OK after a stop
    finally:
        timer.cancel()
    return got


# -- cgroups ---------------------------------------------------------------------------------

def _mounts() -> list[tuple[str, str, str]]:
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        out.append((parts[1], parts[2], parts[3]))
    return out


def cgroup2_root() -> Path:
    """Where the unified (v2) hierarchy is mounted; fails the test when it is not."""
    for mnt, fstype, _ in _mounts():
        if fstype == "cgroup2":
            return Path(mnt)
    raise AssertionError("no cgroup2 hierarchy is mounted: cannot make a test cgroup")


def _remove(path: Path) -> None:
    """Kills what is left in the cgroup tree at ``path`` and removes it, leaves first."""
    if not path.exists():
        return
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _remove(sub)
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError):
            for pid in (path / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        try:
            path.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def cgroup(*parts: str) -> Iterator[Path]:
    """A fresh cgroup (nested ``parts``, the first made unique) in the v2 hierarchy."""
    top = cgroup2_root() / f"{parts[0]}-{uuid.uuid4().hex[:8]}"
    path = top.joinpath(*parts[1:])
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        _remove(top)


@dataclass
class MemoryCgroup:
    path: Path
    procs: Path
    version: int


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[MemoryCgroup]:
    """A fresh cgroup with a memory limit of ``limit`` bytes and no swap: cgroup v2 when its
    memory controller is available, else the v1 memory hierarchy (hybrid hosts)."""
    name = f"gp-oom-{uuid.uuid4().hex[:8]}"
    v2 = None
    with contextlib.suppress(AssertionError):
        v2 = cgroup2_root()
    if v2 is not None and "memory" in (v2 / "cgroup.subtree_control").read_text().split():
        path = v2 / name
        path.mkdir()
        try:
            (path / "memory.max").write_text(str(limit))
            with contextlib.suppress(OSError):  # no swap accounting: nothing to limit
                (path / "memory.swap.max").write_text("0")
            yield MemoryCgroup(path, path / "cgroup.procs", 2)
        finally:
            _remove(path)
        return
    v1 = next((Path(m) for m, t, o in _mounts() if t == "cgroup" and "memory" in o.split(",")),
              None)
    if v1 is None:
        raise AssertionError("no memory cgroup controller (v2 or v1): cannot trigger an OOM kill")
    path = v1 / name
    path.mkdir()
    try:
        (path / "memory.limit_in_bytes").write_text(str(limit))
        with contextlib.suppress(OSError):  # only with swap accounting
            (path / "memory.memsw.limit_in_bytes").write_text(str(limit))
        yield MemoryCgroup(path, path / "cgroup.procs", 1)
    finally:
        _remove(path)


HOG = """
import os, sys
open('/proc/self/comm', 'w').write(sys.argv[2])
open(sys.argv[1], 'w').write(str(os.getpid()))  # join the memory cgroup, then eat memory
chunks = []
while True:
    chunks.append(bytearray(b'\\x01') * (1 << 20))  # written, so the pages are really used
"""


def memory_hog(procs: Path, comm: str) -> subprocess.Popen[bytes]:
    """A child that moves itself into the cgroup whose ``cgroup.procs`` is ``procs``, names
    itself ``comm`` and allocates until the OOM killer kills it."""
    return subprocess.Popen([sys.executable, "-c", HOG, str(procs), comm])


def mntns_of(pid: int | str = "self") -> int:
    return os.stat(f"/proc/{pid}/ns/mnt").st_ino
