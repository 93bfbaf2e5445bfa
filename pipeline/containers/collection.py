"""The daemon's container collection: every container the runtime has, keyed by the ids the
kernel side sees cheaply (mount namespace, network namespace, cgroup), with change events.

Who fills it: the runtime watcher (``pipeline.containers.watcher``), from the runtime's
listing and events; and :meth:`ContainerCollection.classify`, when a record names a mount
namespace no event has announced yet (a container's first process can run before the
runtime's task event reaches the daemon): the record's process's cgroup names the container.

Who reads it: the enrich operator (a :class:`LookupTable` per version, looked up per batch with
numpy), the in-kernel selection maps (change events) and trace_dns (one packet socket per
container network namespace, from the events).

A container whose task ended stays findable by its namespaces for :data:`RETIRE_S` seconds:
records its last processes wrote are still being drained then. Meanwhile the collection holds
an fd on each of its namespaces, as upstream's does, so the kernel cannot hand the inode number
to a new namespace that would then be taken for the container's (seen: a new mount namespace
of the host took an ended container's number within a second).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import numpy as np
import numpy.typing as npt

from pipeline.containers import procfs
from pipeline.containers.model import Container, pod_labels

_logger = logging.getLogger(__name__)

RETIRE_S = 5.0
"""Seconds an ended container's namespaces still enrich records (what the rings still hold)."""


class EventKind(Enum):
    ADDED = "added"
    """The container has a task: its namespaces are known."""
    UPDATED = "updated"
    """Its metadata changed (pod labels learnt, start time, image digest)."""
    REMOVED = "removed"
    """Its task ended (or it was deleted): its namespaces no longer name it."""


@dataclass(frozen=True, slots=True)
class ContainerEvent:
    kind: EventKind
    container: Container


Listener = Callable[[ContainerEvent], None]


class Classified(Enum):
    """What :meth:`ContainerCollection.classify` learnt about a mount namespace."""

    CONTAINER = "container"
    NOT_CONTAINER = "not-container"
    UNKNOWN = "unknown"  # the process is gone: nothing can be said


@dataclass(frozen=True)
class LookupTable:
    """The containers with namespaces, as sorted key arrays for vectorised lookups.

    Row 0 stands for "no container"; row ``i`` (1-based) is ``containers[i - 1]``. Rows past
    the real containers are pods seen through a shared network namespace (a pod's containers
    share one): the first container's metadata with ``pid`` 0, as upstream enriches by
    network namespace.
    """

    version: int
    containers: tuple[Container, ...]
    mntns_keys: npt.NDArray[np.uint64]
    mntns_rows: npt.NDArray[np.intp]
    netns_keys: npt.NDArray[np.uint64]
    netns_rows: npt.NDArray[np.intp]

    @staticmethod
    def _rows(keys: npt.NDArray[np.uint64], rows: npt.NDArray[np.intp],
              col: npt.NDArray[np.uint64]) -> npt.NDArray[np.intp]:
        if not len(keys):
            return np.zeros(col.shape[0], dtype=np.intp)
        pos = np.searchsorted(keys, col)
        pos[pos == len(keys)] = 0
        return np.where(keys[pos] == col, rows[pos], 0)

    def rows_by_mntns(self, col: npt.NDArray[np.uint64]) -> npt.NDArray[np.intp]:
        """Each record's row by its mount namespace id (0: none)."""
        return self._rows(self.mntns_keys, self.mntns_rows, col)

    def rows_by_netns(self, col: npt.NDArray[np.uint64]) -> npt.NDArray[np.intp]:
        """Each record's row by its network namespace id (0: none, or the host's)."""
        return self._rows(self.netns_keys, self.netns_rows, col)


def _keyed(pairs: list[tuple[int, int]]) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.intp]]:
    pairs.sort()
    return (np.array([k for k, _ in pairs], dtype=np.uint64),
            np.array([r for _, r in pairs], dtype=np.intp))


@dataclass
class _Entry:
    container: Container
    retired_at: float = 0.0  # monotonic time its task ended; 0 while it runs


class ContainerCollection:
    """Containers by id; see the module doc.

    Args:
        proc: the /proc the processes are read from.
        host_netns: the host's network namespace (containers in it use the host network);
            read from /proc/1 when not given.
    """

    def __init__(self, proc: str = procfs.PROC, host_netns: int | None = None) -> None:
        self.proc = proc
        self.host_netns = procfs.ns_inode(1, "net", proc) if host_netns is None else host_netns
        self.connected = False
        """Whether a runtime is being watched (set by the watcher)."""
        self.status = "no container runtime is watched"
        """What the watcher last said about the runtime, for logs and errors."""
        self._entries: dict[str, _Entry] = {}
        self._sandboxes: dict[str, Container] = {}  # by pod uid
        self._listeners: list[Listener] = []
        self._version = 0
        self._table: LookupTable | None = None
        self._next_expiry = float("inf")
        self._held: dict[str, tuple[int, list[int]]] = {}  # id -> (mntns, namespace fds)

    # -- changes (from the watcher) -------------------------------------------------------------

    def set_metadata(self, c: Container) -> None:
        """What the runtime says about container ``c.id`` (labels, image, names): merged into
        what the collection knows of its task."""
        if c.is_sandbox:
            self._add_sandbox(c)
            return
        e = self._entries.get(c.id)
        if e is not None:
            old = e.container
            c = c.with_(pid=old.pid, mntns=old.mntns, netns=old.netns,
                        cgroup_path=old.cgroup_path, cgroup_id=old.cgroup_id,
                        host_network=old.host_network,
                        started_at=c.started_at or old.started_at,
                        image_digest=c.image_digest or old.image_digest)
            if e.retired_at:
                e.container = c
                self._changed()
                return
        self.upsert(c)

    def start_task(self, container_id: str, pid: int, started_at: int = 0) -> Container | None:
        """Container ``container_id`` has a task whose init process is ``pid``: its namespaces
        and cgroup are read now (the init process exists from task creation on, before the
        container's own program runs). None when the container or the process is unknown."""
        e = self._entries.get(container_id)
        if e is None:
            return None  # unknown, or a pod's sandbox (not traced as a container)
        mnt_fd, mntns = procfs.open_ns(pid, "mnt", self.proc)
        if not mntns:
            return None  # gone already
        net_fd, netns = procfs.open_ns(pid, "net", self.proc)
        self._hold(container_id, mntns, [mnt_fd, net_fd])
        cg = procfs.cgroup_of(pid, self.proc)
        same_task = e.container.pid == pid
        c = e.container.with_(
            pid=pid, mntns=mntns, netns=netns, host_network=netns == self.host_netns,
            cgroup_path=cg.path if cg else "", cgroup_id=cg.id if cg else 0,
            started_at=started_at or (e.container.started_at if same_task else 0) or
            procfs.start_time_ns(pid, self.proc))
        self.upsert(c)
        return c

    def upsert(self, c: Container) -> None:
        """Adds or replaces the container ``c.id`` as given; listeners hear what changed."""
        if c.is_sandbox:
            self._add_sandbox(c)
            return
        if c.pod_uid and not c.pod_labels and c.pod_uid in self._sandboxes:
            c = c.with_(pod_labels=pod_labels(self._sandboxes[c.pod_uid].labels))
        old = self._entries.get(c.id)
        if old is not None and old.container == c and not old.retired_at:
            return
        self._entries[c.id] = _Entry(c)
        self._changed()
        before = old.container if old is not None and not old.retired_at else None
        if c.mntns and (before is None or before.mntns != c.mntns):
            if before is not None and before.mntns:
                self._emit(EventKind.REMOVED, before)
            self._emit(EventKind.ADDED, c)
        elif c.mntns:
            self._emit(EventKind.UPDATED, c)

    def end_task(self, container_id: str) -> None:
        """The container's task ended: its namespaces stop naming it after :data:`RETIRE_S`."""
        e = self._entries.get(container_id)
        if e is None or e.retired_at or not e.container.mntns:
            return
        e.retired_at = time.monotonic()
        self._next_expiry = min(self._next_expiry, e.retired_at + RETIRE_S)
        self._emit(EventKind.REMOVED, e.container)

    def remove(self, container_id: str) -> None:
        """The container was deleted."""
        self.end_task(container_id)
        e = self._entries.get(container_id)
        if e is not None and not e.container.mntns:
            del self._entries[container_id]  # never ran, or retired entries expire by time
            self._release(container_id)
            self._changed()
        for uid, sb in list(self._sandboxes.items()):
            if sb.id == container_id:
                del self._sandboxes[uid]

    def _add_sandbox(self, sb: Container) -> None:
        if not sb.pod_uid:
            return
        self._sandboxes[sb.pod_uid] = sb
        labels = pod_labels(sb.labels)
        for e in list(self._entries.values()):
            c = e.container
            if c.pod_uid == sb.pod_uid and c.pod_labels != labels and not e.retired_at:
                self.upsert(c.with_(pod_labels=labels))

    def clear(self) -> None:
        """The runtime went away: forget everything (listeners hear each removal)."""
        for cid in list(self._entries):
            self.end_task(cid)
            self._release(cid)
        self._entries.clear()
        self._sandboxes.clear()
        self._changed()

    # -- reading ----------------------------------------------------------------------------

    def get(self, container_id: str) -> Container | None:
        e = self._entries.get(container_id)
        return e.container if e is not None else None

    def containers(self, running: bool = True) -> list[Container]:
        """The known containers (``running``: only those with a live task)."""
        return [e.container for e in self._entries.values()
                if not running or (e.container.mntns and not e.retired_at)]

    def __len__(self) -> int:
        return len(self._entries)

    def subscribe(self, fn: Listener) -> Callable[[], None]:
        """Calls ``fn`` on every change; returns the function that unsubscribes it."""
        self._listeners.append(fn)

        def unsubscribe() -> None:
            if fn in self._listeners:
                self._listeners.remove(fn)

        return unsubscribe

    def table(self) -> LookupTable:
        """The lookup table of this version (rebuilt only after a change)."""
        if time.monotonic() >= self._next_expiry:
            self._expire()
        if self._table is None or self._table.version != self._version:
            self._table = self._build()
        return self._table

    def _build(self) -> LookupTable:
        rows: list[Container] = []
        mnt: list[tuple[int, int]] = []
        by_netns: dict[int, list[int]] = {}
        claimed: set[int] = set()
        # Running containers first: a namespace inode reused by a new container is its.
        for e in sorted(self._entries.values(), key=lambda e: e.retired_at != 0):
            c = e.container
            if not c.mntns or c.mntns in claimed:
                continue
            claimed.add(c.mntns)
            rows.append(c)
            mnt.append((c.mntns, len(rows)))
            if c.netns and c.netns != self.host_netns and not c.host_network:
                by_netns.setdefault(c.netns, []).append(len(rows))
        net: list[tuple[int, int]] = []
        for ns, members in by_netns.items():
            first = rows[members[0] - 1]
            if len(members) == 1:
                net.append((ns, members[0]))
            elif first.pod_name and first.namespace and all(
                    rows[m - 1].pod_uid == first.pod_uid for m in members):
                rows.append(first.with_(pid=0))  # the pod, as upstream's SetPodMetadata
                net.append((ns, len(rows)))
        mk, mr = _keyed(mnt)
        nk, nr = _keyed(net)
        return LookupTable(self._version, tuple(rows), mk, mr, nk, nr)

    def _expire(self) -> None:
        now = time.monotonic()
        self._next_expiry = float("inf")
        for cid, e in list(self._entries.items()):
            if not e.retired_at:
                continue
            if now >= e.retired_at + RETIRE_S:
                del self._entries[cid]
                self._release(cid)
                self._changed()
            else:
                self._next_expiry = min(self._next_expiry, e.retired_at + RETIRE_S)

    # -- learning from records ----------------------------------------------------------------

    def classify(self, mntns: int, pid: int) -> Classified:
        """What the mount namespace ``mntns`` of process ``pid`` is, from /proc: a known
        container's (bound to it from now on), not a container's, or unknown (the process is
        gone or in another namespace by now)."""
        if procfs.ns_inode(pid, "mnt", self.proc) != mntns:
            return Classified.UNKNOWN
        cg = procfs.cgroup_of(pid, self.proc)
        if cg is None:
            return Classified.UNKNOWN
        c = self._container_in(cg.path)
        if c is None:
            return Classified.NOT_CONTAINER
        if c.mntns != mntns:
            mnt_fd, held = procfs.open_ns(pid, "mnt", self.proc)
            net_fd, netns = procfs.open_ns(pid, "net", self.proc)
            if held != mntns:  # the process left (or exited) meanwhile
                for fd in (mnt_fd, net_fd):
                    if fd >= 0:
                        os.close(fd)
                return Classified.UNKNOWN
            self._hold(c.id, mntns, [mnt_fd, net_fd])
            # The runtime's task event (which names the init process) may still be on its
            # way: the init is found from /proc then.
            init = c.pid or procfs.container_init(pid, cg.path, self.proc)
            self.upsert(c.with_(mntns=mntns, netns=netns, cgroup_path=cg.path,
                                cgroup_id=cg.id, host_network=netns == self.host_netns,
                                pid=init))
        return Classified.CONTAINER

    def _container_in(self, path: str) -> Container | None:
        """The known container a cgroup path names: a component equal to its id, possibly
        as ``<runtime>-<id>.scope`` (systemd cgroup driver); innermost first."""
        for comp in reversed(path.split("/")):
            if not comp:
                continue
            name = comp.removesuffix(".scope")
            for cand in (name, name.rpartition("-")[2]):
                e = self._entries.get(cand)
                if e is not None and not e.retired_at:
                    return e.container
        return None

    # -- internals ------------------------------------------------------------------------------

    def _hold(self, container_id: str, mntns: int, fds: list[int]) -> None:
        """Keeps ``fds`` (the namespaces of the container's task) open until it is gone."""
        old = self._held.get(container_id)
        if old is not None and old[0] == mntns:
            fds, extra = old[1], fds  # the same task: keep the first fds
        else:
            extra = old[1] if old is not None else []
            self._held[container_id] = (mntns, [fd for fd in fds if fd >= 0])
        for fd in extra:
            if fd >= 0:
                os.close(fd)

    def _release(self, container_id: str) -> None:
        held = self._held.pop(container_id, None)
        for fd in held[1] if held is not None else ():
            os.close(fd)

    def close(self) -> None:
        """Closes every namespace fd held (the daemon stops)."""
        for cid in list(self._held):
            self._release(cid)

    def _changed(self) -> None:
        self._version += 1

    def _emit(self, kind: EventKind, c: Container) -> None:
        ev = ContainerEvent(kind, c)
        for fn in tuple(self._listeners):
            try:
                fn(ev)
            except Exception:  # one listener's failure must not starve the others
                _logger.exception("container listener failed on %s %s", kind.value, c.id)

