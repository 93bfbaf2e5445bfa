"""How a run's started source is given what it needs to follow containers.

Two optional capabilities a source may have (checked structurally, so sources import nothing
from here): BPF maps by name (the tracer's, for the in-kernel selection map), and following
containers itself (trace_dns opens a packet socket in each container's network namespace).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from pipeline.containers.collection import ContainerCollection
from pipeline.containers.kernel_filter import MAP_NAME, KernelSelection
from pipeline.containers.selector import ContainerSelector
from pipeline.severity import Severity

Log = Callable[[Severity, str], None]


@runtime_checkable
class HasTables(Protocol):
    def table(self, name: str) -> Any | None:
        """The loaded program's BPF map ``name``, None when it has none."""
        ...


@runtime_checkable
class FollowsContainers(Protocol):
    def follow_containers(self, collection: ContainerCollection,
                          selector: ContainerSelector) -> Callable[[], None]:
        """Starts following the collection; returns the function that stops it."""
        ...


def attach_to_source(source: object, collection: ContainerCollection,
                     selector: ContainerSelector, log: Log,
                     ) -> tuple[KernelSelection | None, Callable[[], None]]:
    """The kernel selection written for ``source`` (None without one) and the function that
    detaches everything attached here."""
    stops: list[Callable[[], None]] = []
    kernel = None
    if selector.active:
        if not collection.connected:
            log(Severity.WARN, f"container selection ({selector.describe()}): "
                f"{collection.status}; no container matches until a runtime is reachable")
        table = source.table(MAP_NAME) if isinstance(source, HasTables) else None
        if table is not None:
            kernel = KernelSelection(table, collection, selector)
            kernel.start()
            stops.append(kernel.stop)
    if isinstance(source, FollowsContainers):
        stops.append(source.follow_containers(collection, selector))

    def detach() -> None:
        for stop in reversed(stops):
            stop()

    return kernel, detach
