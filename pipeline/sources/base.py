"""The contract between a run and its source."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol, TypeVar

from pipeline.batch import Batch

Emit = Callable[[Batch], Awaitable[None]]
"""Hands a batch downstream; awaiting it is the back-pressure."""

Log = Callable[[int, str], None]
"""Reports a message with a logrus severity (2 error, 3 warn, 4 info, 5 debug)."""


T = TypeVar("T")


async def load_in_thread(load: Callable[[], T], free: Callable[[T], None]) -> T:
    """``load()`` (a BPF compile and attach) in a worker thread.

    A thread cannot be cancelled: if the caller is (a client that went away during the
    compile), the thread still loads and attaches, and what it returns would be lost with its
    programs attached for good. So the load goes on shielded, and ``free`` gets its result once
    it is done. The cancelled caller returns (raising) only then: it holds the daemon's compile
    turn (api/compile_queue.py) until the thread is done, so the next run does not start a
    compile that would queue behind an abandoned one (unless it is cancelled again meanwhile).
    """
    loading = asyncio.ensure_future(asyncio.to_thread(load))
    try:
        return await asyncio.shield(loading)
    except asyncio.CancelledError:
        def free_when_loaded(f: asyncio.Future[T]) -> None:
            if not f.cancelled() and f.exception() is None:
                free(f.result())

        loading.add_done_callback(free_when_loaded)
        with contextlib.suppress(BaseException):
            await asyncio.shield(loading)
        raise


class SourceError(RuntimeError):
    """A source cannot start: the message names the cause and, where one exists, the fix."""


class Source(Protocol):
    """Produces batches from the kernel (or elsewhere) until stopped or finished."""

    async def start(self, emit: Emit, log: Log) -> None:
        """Loads and attaches; returns once events can flow. Raises SourceError."""
        ...

    async def wait(self) -> None:
        """Returns when the source ends by itself (never, for tracers)."""
        ...

    async def stop(self) -> None:
        """Detaches, hands on what is still buffered, and frees everything. Idempotent."""
        ...

    def lost(self) -> int:
        """Records the kernel side could not buffer, so far."""
        ...

    def extra_info(self) -> Mapping[str, tuple[str, bytes]]:
        """Inspection addenda: key -> (content type, content)."""
        ...


class SheddingSource(Protocol):
    """A source that can sample in the kernel (load shedding, ``operator.bcc.shed``)."""

    def set_sample_rate(self, rate: int) -> bool:
        """Keeps 1 record in ``rate`` (1: all); False when this source cannot."""
        ...

    def shed(self) -> int:
        """Records sampled out in the kernel, so far."""
        ...
