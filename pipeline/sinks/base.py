"""The sink contract, and the runner that feeds one sink from one run.

A sink only encodes and sends (the "where"); :class:`SinkRunner` owns the "when": its bounded
edge, retries with backoff, and the ledger. A sink never sees a record twice unless it asked for
a retry, and every record a runner accepted ends as delivered or as a counted drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from pipeline.batch import Batch
from pipeline.graph import Edge, EdgeClosed, Overflow
from pipeline.ledger import Ledger
from pipeline.params import ParamSpec

_logger = logging.getLogger(__name__)


class SinkError(RuntimeError):
    """A send failed. ``retryable`` says whether trying again can help."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class Status(Enum):
    DELIVERED = "delivered"
    ERRORED = "errored"  # transient; the runner retries
    REJECTED = "rejected"  # permanent; the runner drops and counts


class Sink(Protocol):
    """Encodes batches for one protocol and sends them.

    Lifecycle: :meth:`start` once, :meth:`write` any number of times (never concurrently),
    :meth:`flush`, :meth:`stop`. ``write`` returns only when the batch is delivered (or raises
    SinkError): "accepted" is the runner's edge, "delivered" is this await.
    """

    name: str

    async def start(self) -> None: ...

    async def write(self, batch: Batch) -> None: ...

    async def flush(self, timeout: float) -> bool: ...

    async def stop(self, timeout: float) -> None: ...


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff; after ``max_attempts`` a batch is dropped and counted."""

    initial: float = 0.2
    maximum: float = 5.0
    max_attempts: int = 8

    def delay(self, attempt: int) -> float:
        return min(self.maximum, self.initial * (2 ** (attempt - 1)))


class SinkRunner:
    """Feeds one sink from one edge: retries, backoff, ledger, supervised task.

    Ledger stage ``sink:<name>``: produced (accepted into the edge) = delivered + dropped
    (reasons: queue_full, send_failed, rejected, shutdown) + still queued.
    """

    def __init__(self, sink: Sink, edge: Edge, ledger: Ledger, instance: str,
                 retry: RetryPolicy | None = None) -> None:
        self.sink = sink
        self.edge = edge
        self._ledger = ledger
        self._instance = instance
        self._retry = retry or RetryPolicy()
        self._task: asyncio.Task[None] | None = None
        self.state = "new"
        self.last_error: str | None = None

    @property
    def stage(self) -> str:
        return self.edge.name

    async def start(self) -> None:
        await self.sink.start()
        self.state = "running"
        self._task = asyncio.create_task(self._loop(), name=f"sink:{self.sink.name}")

    async def _loop(self) -> None:
        while True:
            try:
                _, batch = await self.edge.get()
            except EdgeClosed:
                return
            await self._deliver(batch)

    async def _deliver(self, batch: Batch) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                await self.sink.write(batch)
            except SinkError as e:
                self.last_error = str(e)
                if not e.retryable:
                    self._ledger.dropped(self._instance, self.stage, len(batch), "rejected")
                    _logger.error("sink %s rejected %d records: %s", self.sink.name, len(batch), e)
                    return
                if attempt >= self._retry.max_attempts:
                    self._ledger.dropped(self._instance, self.stage, len(batch), "send_failed")
                    _logger.error("sink %s dropped %d records after %d attempts: %s",
                                  self.sink.name, len(batch), attempt, e)
                    return
                self._ledger.add(self._instance, self.stage, "retried", len(batch))
                self.state = "retrying"
                await asyncio.sleep(self._retry.delay(attempt))
                continue
            except Exception as e:  # a bug in a sink must not kill the run: count and go on
                self.last_error = f"{type(e).__name__}: {e}"
                self._ledger.dropped(self._instance, self.stage, len(batch), "sink_error")
                _logger.exception("sink %s failed", self.sink.name)
                return
            self.state = "running"
            self.edge.delivered(len(batch))
            return

    async def stop(self, timeout: float = 5.0) -> None:
        """Closes the edge, lets the sink send what is queued within ``timeout``, then stops."""
        self.edge.close()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self.edge.discard_pending("shutdown")
        with contextlib.suppress(Exception):
            await self.sink.flush(timeout)
        await self.sink.stop(timeout)
        self.state = "stopped"


class SinkType(Protocol):
    """A registered kind of sink: its params, and how to build one for a run."""

    name: str
    prefix: str

    def params(self) -> tuple[ParamSpec, ...]: ...

    def enabled(self, values: Mapping[str, Any]) -> bool: ...

    def build(self, values: Mapping[str, Any], context: Mapping[str, Any]) -> Sink: ...

    def edge_settings(self, values: Mapping[str, Any]) -> tuple[int, Overflow]: ...
