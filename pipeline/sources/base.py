"""What sources share: the engine's source contract (re-exported from :mod:`pipeline.source`)
and loading BPF programs off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TypeVar

from pipeline.gadget import SourceFactory
from pipeline.source import Emit, Log, SheddingSource, Source, SourceError

__all__ = ["Emit", "Log", "SheddingSource", "Source", "SourceError", "SourceFactory",
           "load_in_thread"]

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
