"""The contract between a run and its source."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from pipeline.batch import Batch

Emit = Callable[[Batch], Awaitable[None]]
"""Hands a batch downstream; awaiting it is the back-pressure."""

Log = Callable[[int, str], None]
"""Reports a message with a logrus severity (2 error, 3 warn, 4 info, 5 debug)."""


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
