"""Giving freed heap back to the kernel.

glibc keeps freed memory in its arenas for reuse; after a burst (clang/LLVM compiling ~25-30 MB
per gadget, or many runs' queues and buffers freed together) that memory stays resident until
``malloc_trim`` returns it (measured: trace_open RssAnon 63 -> 37 MB after a compile, ~2 ms).

Trimming is not enough when threads allocate: glibc gives each thread that contends for the
main arena an arena of its own, and the BPF compiles run in worker threads, so a run's
compiled module lives in a thread arena that trimming returns badly (measured, 30 concurrent
trace_exec runs closed: RssAnon 57 MB before, 132 MB with them, still 90 MB after, vs 62 MB
with a single arena; peak 100 MB). :func:`single_arena` makes every thread share one arena:
compiles are serialized anyway, and the event loop is the only other thread that allocates.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes

__all__ = ["HeapTrimmer", "single_arena", "trim_heap"]

_M_ARENA_MAX = -8
"""glibc's mallopt parameter for the number of malloc arenas (malloc.h)."""

TRIM_DELAY = 0.5
"""Seconds a requested trim waits, so a burst of runs ending is trimmed once, after it."""


def trim_heap() -> None:
    """Returns the heap's free memory to the kernel (a no-op where libc has no malloc_trim)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def single_arena() -> bool:
    """Has every thread allocate from one arena (see the module docstring); call it before
    threads start. False where libc has no mallopt (not glibc)."""
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 1))
    except (OSError, AttributeError):
        return False


class HeapTrimmer:
    """Coalesces trim requests: one :func:`trim_heap` :data:`TRIM_DELAY` after the last of a
    burst of requests (each request pushes it back, up to ten delays after the first)."""

    def __init__(self, delay: float = TRIM_DELAY) -> None:
        self._delay = delay
        self._handle: asyncio.TimerHandle | None = None
        self._first = 0.0
        self.trims = 0

    def request(self) -> None:
        """Asks for a trim soon (from the event loop)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._handle is not None:
            if now - self._first > 10 * self._delay:
                return  # a steady stream of run ends: let the pending trim happen
            self._handle.cancel()
        else:
            self._first = now
        self._handle = loop.call_later(self._delay, self._trim)

    def _trim(self) -> None:
        self._handle = None
        trim_heap()
        self.trims += 1

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
