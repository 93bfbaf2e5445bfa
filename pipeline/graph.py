"""The queue graph's edges and fan-out: bounded queues of batches, measured in records.

Each subscriber (a gRPC stream, a sink) owns one :class:`Edge`, so a slow one never stalls
another. A full edge either blocks its producer (back-pressure up to the ring buffer, where the
kernel counts what it cannot hold) or drops by policy; every drop lands in the ledger.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from enum import StrEnum

from pipeline.batch import Batch
from pipeline.ledger import REASON_CLOSED, REASON_QUEUE_FULL, Ledger


class Overflow(StrEnum):
    """What a full edge does with a new batch."""

    BLOCK = "block"
    DROP_OLDEST = "drop-oldest"
    DROP_NEWEST = "drop-newest"


class EdgeClosed(Exception):
    """The edge was closed and holds nothing more."""


class Edge:
    """A bounded FIFO of batches between a producer and one consumer.

    Every record offered gets a position (``offered`` counts them, dropped ones included), so a
    consumer that numbers its output from :meth:`get`'s first position shows drops as gaps.

    Args:
        name: the stage name used in the ledger (``grpc:<peer>``, ``sink:kafka``).
        capacity: how many records may wait; one batch larger than that is still accepted
            into an empty queue, so nothing is unsendable.
        overflow: the policy when full.
        ledger: where drops are counted.
        instance: the ledger's instance label.
        on_drop: called with the number of records dropped (e.g. to tell a client).
    """

    def __init__(self, name: str, capacity: int, overflow: Overflow, ledger: Ledger,
                 instance: str, on_drop: Callable[[int], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"edge {name!r}: capacity must be at least 1, got {capacity}")
        self.name = name
        self.capacity = capacity
        self.overflow = overflow
        self._ledger = ledger
        self._instance = instance
        self._on_drop = on_drop
        self._items: deque[tuple[int, Batch]] = deque()
        self._depth = 0
        self.offered = 0
        self._closed = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    @property
    def depth(self) -> int:
        """Records waiting."""
        return self._depth

    @property
    def closed(self) -> bool:
        return self._closed

    def _fits(self, n: int) -> bool:
        return self._depth == 0 or self._depth + n <= self.capacity

    def _append(self, batch: Batch) -> None:
        n = len(batch)
        self._items.append((self.offered, batch))
        self.offered += n
        self._depth += n
        self._ledger.produced(self._instance, self.name, n)
        self._readable.set()
        if not self._fits(1):
            self._writable.clear()

    def _drop(self, n: int, reason: str) -> None:
        self._ledger.produced(self._instance, self.name, n)
        self._ledger.dropped(self._instance, self.name, n, reason)
        if self._on_drop is not None:
            self._on_drop(n)

    async def put(self, batch: Batch) -> None:
        """Offers a batch, waiting for room under :attr:`Overflow.BLOCK`."""
        if self.overflow is Overflow.BLOCK:
            while not self._closed and not self._fits(len(batch)):
                self._writable.clear()
                await self._writable.wait()
        self.put_nowait(batch)

    def put_nowait(self, batch: Batch) -> None:
        """Offers a batch without waiting; a full edge drops by its policy (BLOCK: the new one)."""
        n = len(batch)
        if n == 0:
            return
        if self._closed:
            self.offered += n
            self._drop(n, REASON_CLOSED)
            return
        if self._fits(n):
            self._append(batch)
            return
        if self.overflow is Overflow.DROP_OLDEST:
            while self._items and not self._fits(n):
                _, old = self._items.popleft()
                self._depth -= len(old)
                self._ledger.dropped(self._instance, self.name, len(old), REASON_QUEUE_FULL)
                if self._on_drop is not None:
                    self._on_drop(len(old))
            self._append(batch)
            return
        self.offered += n
        self._drop(n, REASON_QUEUE_FULL)

    async def get(self) -> tuple[int, Batch]:
        """The next batch and the position of its first record; raises EdgeClosed when drained
        after :meth:`close`."""
        while not self._items:
            if self._closed:
                raise EdgeClosed(self.name)
            self._readable.clear()
            await self._readable.wait()
        pos, batch = self._items.popleft()
        self._depth -= len(batch)
        if self._fits(1):
            self._writable.set()
        return pos, batch

    def get_nowait(self) -> tuple[int, Batch] | None:
        if not self._items:
            return None
        pos, batch = self._items.popleft()
        self._depth -= len(batch)
        if self._fits(1):
            self._writable.set()
        return pos, batch

    def delivered(self, n: int) -> None:
        """The consumer reports ``n`` records handed on."""
        self._ledger.delivered(self._instance, self.name, n)

    def discard_pending(self, reason: str) -> int:
        """Drops everything queued (a consumer that gives up), counted under ``reason``."""
        n = self._depth
        self._items.clear()
        self._depth = 0
        self._writable.set()
        if n:
            self._ledger.dropped(self._instance, self.name, n, reason)
        return n

    def close(self) -> None:
        """No more puts; the consumer drains what is queued, then gets EdgeClosed."""
        self._closed = True
        self._readable.set()
        self._writable.set()


class Fanout:
    """Hands each batch to every subscribed edge, in subscription order."""

    def __init__(self) -> None:
        self._edges: list[Edge] = []

    def subscribe(self, edge: Edge) -> Edge:
        self._edges.append(edge)
        return edge

    def unsubscribe(self, edge: Edge) -> None:
        if edge in self._edges:
            self._edges.remove(edge)
        edge.close()

    @property
    def edges(self) -> tuple[Edge, ...]:
        return tuple(self._edges)

    async def publish(self, batch: Batch) -> None:
        for edge in tuple(self._edges):
            if edge.overflow is Overflow.BLOCK:
                await edge.put(batch)
            else:
                edge.put_nowait(batch)

    def close(self) -> None:
        for edge in self._edges:
            edge.close()
