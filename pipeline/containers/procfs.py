"""What /proc says about a process: its namespaces, its cgroup, when it started.

Reads the host's /proc (the daemon runs in the host's pid namespace). Every function returns a
neutral value (0, empty) for a process that is gone, since processes may exit at any time.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PROC = "/proc"
# Preferred cgroup v1 hierarchies when the unified (v2) path is the root (hybrid hosts).
_V1_ORDER = ("name=systemd", "memory", "pids", "cpu,cpuacct", "cpu")


def ns_inode(pid: int, kind: str, proc: str = PROC) -> int:
    """The inode of ``/proc/<pid>/ns/<kind>`` (``mnt``, ``net``): the namespace's id as BPF
    programs see it; 0 when the process is gone."""
    try:
        return os.stat(f"{proc}/{pid}/ns/{kind}").st_ino
    except OSError:
        return 0


def open_ns(pid: int, kind: str, proc: str = PROC) -> tuple[int, int]:
    """An open fd on ``/proc/<pid>/ns/<kind>`` and the namespace's inode, (-1, 0) when the
    process is gone. Holding the fd keeps the namespace, and so its inode number, from being
    reused by a new namespace while records may still name it (upstream holds them too)."""
    try:
        fd = os.open(f"{proc}/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1, 0
    try:
        return fd, os.fstat(fd).st_ino
    except OSError:
        os.close(fd)
        return -1, 0


def parse_cgroup_file(text: str) -> bytes:
    """The process's cgroup path from ``/proc/<pid>/cgroup``: the unified (v2) path unless it
    is the root on a hybrid host, then the first non-root v1 path by ``_V1_ORDER``."""
    v2 = ""
    v1: dict[str, str] = {}
    for line in text.splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hid == "0" and controllers == "":
            v2 = path
        elif path and path != "/":
            v1[controllers] = path
    if v2 and v2 != "/":
        return v2.encode()
    for name in _V1_ORDER:
        if name in v1:
            return v1[name].encode()
    if v1:
        return next(iter(v1.values())).encode()
    return v2.encode()


def unified_path(text: str) -> str:
    """The v2 path in a ``/proc/<pid>/cgroup`` text, "" without one."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return ""


@cache
def cgroup2_mount() -> str:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup``, or
    ``/sys/fs/cgroup/unified`` on hybrid hosts); "" when it is not."""
    try:
        with open(f"{PROC}/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split(" ")[4]
    except OSError:
        pass
    return ""


@dataclass(frozen=True, slots=True)
class ProcessCgroup:
    path: str
    """The cgroup path (v2, or v1 on hosts where v2 is the root)."""
    id: int
    """The v2 cgroup's id: the inode of its directory, as ``bpf_get_current_cgroup_id``."""


def cgroup_of(pid: int, proc: str = PROC) -> ProcessCgroup | None:
    """The cgroup of ``pid``, None when the process is gone."""
    try:
        with open(f"{proc}/{pid}/cgroup") as f:
            text = f.read()
    except OSError:
        return None
    v2 = unified_path(text)
    cg_id = 0
    mount = cgroup2_mount()
    if v2 and mount:
        try:
            cg_id = os.stat(mount + v2).st_ino
        except OSError:
            cg_id = 0
    return ProcessCgroup(parse_cgroup_file(text).decode(), cg_id)


def _is_ns_init(pid: int, proc: str) -> bool:
    """Whether ``pid`` is pid 1 of its innermost pid namespace (``NSpid`` ends in 1)."""
    try:
        with open(f"{proc}/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return line.split()[-1] == "1"
    except OSError:
        pass
    return False


def container_init(pid: int, cgroup_path: str, proc: str = PROC) -> int:
    """The init process of the container ``pid`` runs in: ``pid`` itself when it is pid 1 of
    its pid namespace, else that member of its cgroup (v2); 0 when none is found. For a
    container the daemon learns from a record before the runtime's task event names it."""
    if _is_ns_init(pid, proc):
        return pid
    mount = cgroup2_mount()
    if not mount:
        return 0
    try:
        members = Path(mount + cgroup_path, "cgroup.procs").read_text().split()
    except OSError:
        return 0
    return next((int(m) for m in members if _is_ns_init(int(m), proc)), 0)


def start_time_ns(pid: int, proc: str = PROC) -> int:
    """Wall-clock ns at which ``pid`` started (``/proc/<pid>/stat`` start time, in clock
    ticks since boot); 0 when the process is gone."""
    try:
        stat = Path(f"{proc}/{pid}/stat").read_text()
    except OSError:
        return 0
    # The command name may hold spaces and parentheses: fields count from the last ')'.
    ticks = int(stat.rsplit(")", 1)[1].split()[19])
    boot = time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    return boot + ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
