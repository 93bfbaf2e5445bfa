"""The ledger's vocabulary in one place: the stages a record passes and the reasons it can be
dropped at one. The ledger (:mod:`pipeline.ledger`) counts by these strings, the self-metrics
export them as the ``stage`` and ``reason`` labels, and tests and alerts match on them, so a
stage or reason is named here and nowhere else.

For each stage ``produced == delivered + dropped + queued``; the stages chain as
``kernel`` (records the BPF side could not or chose not to write) -> ``source`` (records the
source handed to the run) -> ``filter`` (records the operators removed) -> one stage per
subscriber edge of the run's fan-out (``grpc:<peer>``, ``sink:<type>``, an instance's own
edge) -> ``attach`` (an instance's attacher queues).
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["GRPC_STAGE_PREFIX", "SINK_STAGE_PREFIX", "Reason", "Stage", "grpc_stage",
           "sink_stage"]


class Stage(StrEnum):
    """The fixed stages (a member is its string, so it keys the ledger as the string does)."""

    KERNEL = "kernel"
    SOURCE = "source"
    FILTER = "filter"
    ATTACH = "attach"


GRPC_STAGE_PREFIX = "grpc:"
SINK_STAGE_PREFIX = "sink:"


def grpc_stage(peer: str) -> str:
    """The stage of one gRPC client's edge of a run (``grpc:<peer>``)."""
    return GRPC_STAGE_PREFIX + peer


def sink_stage(name: str) -> str:
    """The stage of one sink's edge of a run (``sink:<type>``)."""
    return SINK_STAGE_PREFIX + name


class Reason(StrEnum):
    """Why records were dropped."""

    RINGBUF_FULL = "ringbuf_full"
    """The BPF ring buffer was full: the kernel could not write them."""
    SHED = "shed"
    """Load shedding sampled them out in the kernel, on purpose (``operator.bcc.shed``)."""
    FILTERED = "filtered"
    """An operator (``operator.filter``) removed them, on purpose."""
    QUEUE_FULL = "queue_full"
    """A bounded queue (an edge, an attacher's queue) had no room."""
    CLOSED = "closed"
    """They reached an edge whose consumer had gone."""
    CLIENT_GONE = "client_gone"
    """They were queued for a client that went away."""
    SEND_FAILED = "send_failed"
    """A sink gave up retrying them."""
    REJECTED = "rejected"
    """The sink's peer refused them (OTLP partial success, a non-retryable error)."""
    SINK_ERROR = "sink_error"
    """The sink itself failed on them (a bug or an encoding error), not its peer."""
    SHUTDOWN = "shutdown"
    """They were still queued or in flight when their run or the daemon stopped."""
