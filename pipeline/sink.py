"""The contract every sink implements: the engine defines it, ``pipeline/sinks`` implements
it (one module per protocol) and runs it (:class:`pipeline.sinks.base.SinkRunner`)."""

from __future__ import annotations

from typing import Protocol

from pipeline.batch import Batch

__all__ = ["Sink", "SinkError"]


class SinkError(RuntimeError):
    """A send failed. ``retryable`` says whether trying again can help; ``retry_after`` is
    the peer's own wish for a delay in seconds (OTLP RetryInfo, HTTP Retry-After)."""

    def __init__(self, message: str, retryable: bool = True,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class Sink(Protocol):
    """Encodes batches for one protocol and sends them.

    Lifecycle: :meth:`start` once, :meth:`write` any number of times (never concurrently),
    :meth:`flush`, :meth:`stop`. ``write`` returns only when the batch is delivered (or raises
    SinkError): "accepted" is the runner's edge, "delivered" is this await. After a retryable
    SinkError the runner calls ``write`` again with the *same* batch object, so a sink whose
    peer may still deliver an earlier attempt (Kafka's idempotent producer) can recognise the
    retry and wait instead of sending twice.
    """

    name: str

    async def start(self) -> None: ...

    async def write(self, batch: Batch) -> int:
        """Delivers ``batch``; returns how many of its records the peer refused after taking
        the request (OTLP partial success), normally 0."""
        ...

    async def flush(self, timeout: float) -> bool: ...

    async def stop(self, timeout: float) -> None: ...
