"""The contract between a run and its source: the engine defines it, ``pipeline/sources``
implements it (the ring-buffer tracer and the gadget folders' ``hooks.py``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from pipeline.batch import Batch
from pipeline.severity import Severity

__all__ = ["Emit", "Log", "SheddingSource", "Source", "SourceError"]

Emit = Callable[[Batch], Awaitable[None]]
"""Hands a batch downstream; awaiting it is the back-pressure."""

Log = Callable[[Severity, str], None]
"""Reports a message with its severity."""


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
