"""In-kernel container selection: a run's ``gadget_mntns_filter`` BPF map, kept in step with
the container collection.

The map (pipeline/sources/bpf/gadget_filter.h) holds mount namespace ids: 1 for a selected
container's, 0 for a namespace to leave out (an unselected container's, the host's). The BPF
side drops a record whose namespace maps to 0 before it reserves ring space, and lets a
namespace the map does not hold through: user space (the enrich operator) then classifies it,
drops the record if it is not selected, and writes the answer here, so the next records of
that namespace stay in the kernel. A container's namespace is written when the runtime reports
its task (before its program runs) and deleted when the task ends.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from pipeline.containers.collection import ContainerCollection, ContainerEvent, EventKind
from pipeline.containers.procfs import ns_inode
from pipeline.containers.selector import ContainerSelector

MAP_NAME = "gadget_mntns_filter"


class KernelSelection:
    """Writes ``selector``'s view of ``collection`` into a BPF hash map (mntns -> keep).

    Args:
        table: the bcc table of the map.
        collection: the containers.
        selector: the run's selection (active).
    """

    def __init__(self, table: Any, collection: ContainerCollection,
                 selector: ContainerSelector) -> None:
        self._table = table
        self._collection = collection
        self._selector = selector
        self._unsubscribe: Any = None
        self.writes = 0

    def start(self) -> None:
        # The host's namespaces (pid 1's, the daemon's own) are no container's.
        for m in {ns_inode(1, "mnt"), ns_inode(os.getpid(), "mnt")}:
            if m:
                self._set(m, False)
        for c in self._collection.containers():
            self._set(c.mntns, self._selector.matches(c))
        self._unsubscribe = self._collection.subscribe(self._on_event)

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def exclude(self, mntns: int) -> None:
        """A namespace found to be no container's: its records stay in the kernel."""
        self._set(mntns, False)

    def _on_event(self, ev: ContainerEvent) -> None:
        c = ev.container
        if ev.kind is EventKind.REMOVED:
            with contextlib.suppress(KeyError, OSError):
                del self._table[self._table.Key(c.mntns)]
        else:
            self._set(c.mntns, self._selector.matches(c))

    def _set(self, mntns: int, keep: bool) -> None:
        if not mntns:
            return
        with contextlib.suppress(OSError):  # a full map: user space still filters
            self._table[self._table.Key(mntns)] = self._table.Leaf(1 if keep else 0)
            self.writes += 1
