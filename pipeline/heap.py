"""Giving freed heap back to the kernel.

glibc keeps freed memory in its arenas for reuse; after a burst (clang/LLVM compiling ~25-30 MB
per gadget, or many runs' queues and buffers freed together) that memory stays resident until
``malloc_trim`` returns it (measured: trace_open RssAnon 63 -> 37 MB after a compile, ~2 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes

__all__ = ["MAX_ARENAS", "HeapTrimmer", "limit_arenas", "trim_heap"]

MAX_ARENAS = 2
"""malloc arenas a daemon uses. glibc gives threads arenas of their own (up to 8 per core);
the daemon's threads (BPF compiles, sinks' encoders and writers, to_thread calls) then leave
freed memory scattered over them, where it stays resident. Measured with nine idle instances
(five trace_exec, four trace_open): RssAnon 88-98 MB with the default, 79-93 MB with two; runs
vary by ~10 MB either way (when the compiles' heaps are trimmed), so the gain is within the
noise of a few runs, not beyond it."""
_M_ARENA_MAX = -8  # mallopt parameter (glibc malloc.h)

TRIM_DELAY = 0.5
"""Seconds a requested trim waits, so a burst of runs ending is trimmed once, after it."""


def trim_heap() -> None:
    """Returns the heap's free memory to the kernel (a no-op where libc has no malloc_trim)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def limit_arenas(count: int = MAX_ARENAS) -> bool:
    """Caps glibc's malloc arenas (call before threads start); False where libc has no
    mallopt."""
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_ARENA_MAX, count))
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
