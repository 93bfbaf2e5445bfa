"""The loss ledger: every record produced, delivered or dropped, by instance, stage and reason.

Counting is a dict increment per batch; the Prometheus collector reads it at scrape time.
For each stage, ``produced == delivered + dropped + queued`` must hold; tests check it.

Rows a run can produce are declared at 0 when it starts (:meth:`Ledger.declare`): a counter
series that appears only with its first loss shows no increase to Prometheus' ``rate()``, so
an alert on a one-off burst would never fire.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import NamedTuple

PRODUCED = "produced"
DELIVERED = "delivered"
DROPPED = "dropped"

STAGE_SOURCE = "source"
"""Records the source handed to the run (after the kernel, before the operators)."""
STAGE_KERNEL = "kernel"
"""Records the BPF side wanted to write but could not (ring full) or sampled out (shed)."""
STAGE_FILTER = "filter"
STAGE_ATTACH = "attach"
"""An instance's attached clients, summed, counted in packets."""

REASON_RINGBUF_FULL = "ringbuf_full"
REASON_SHED = "shed"
REASON_FILTERED = "filtered"
REASON_QUEUE_FULL = "queue_full"
"""A bounded queue (an edge, a client's queue) had no room."""
REASON_CLOSED = "closed"
"""Offered to an edge after it closed (the run was stopping)."""
REASON_CLIENT_GONE = "client_gone"
"""Queued for a client that went away."""
REASON_SEND_FAILED = "send_failed"
"""A sink gave up retrying them."""
REASON_REJECTED = "rejected"
"""A sink's peer refused them (OTLP partial success, a non-retryable error)."""
REASON_SINK_ERROR = "sink_error"
"""A sink itself failed on them (a bug or an encoding error), not its peer."""
REASON_SHUTDOWN = "shutdown"
"""Still queued or in flight when their run or the daemon stopped."""

GRPC_STAGE_PREFIX = "grpc:"
SINK_STAGE_PREFIX = "sink:"


def grpc_stage(peer: str) -> str:
    """The stage of one gRPC client's edge of a run (``grpc:<peer>``)."""
    return GRPC_STAGE_PREFIX + peer


def sink_stage(name: str) -> str:
    """The stage of one sink's edge of a run (``sink:<type>``)."""
    return SINK_STAGE_PREFIX + name


class LedgerKey(NamedTuple):
    instance: str
    stage: str
    outcome: str
    reason: str


class Ledger:
    """Monotonic counters of records per (instance, stage, outcome, reason)."""

    def __init__(self) -> None:
        self._counts: defaultdict[LedgerKey, int] = defaultdict(int)

    def add(self, instance: str, stage: str, outcome: str, count: int, reason: str = "") -> None:
        if count:
            self._counts[LedgerKey(instance, stage, outcome, reason)] += count

    def declare(self, instance: str, stage: str, outcome: str, reason: str = "") -> None:
        """Makes a row exist (at 0 unless counted already), so its series is exported from
        the start."""
        key = LedgerKey(instance, stage, outcome, reason)
        if key not in self._counts:
            self._counts[key] = 0

    def declare_drops(self, instance: str, stage: str, reasons: Iterable[str]) -> None:
        """Declares ``stage``'s produced and delivered rows and a dropped row per reason."""
        self.declare(instance, stage, PRODUCED)
        self.declare(instance, stage, DELIVERED)
        for reason in reasons:
            self.declare(instance, stage, DROPPED, reason)

    def produced(self, instance: str, stage: str, count: int) -> None:
        self.add(instance, stage, PRODUCED, count)

    def delivered(self, instance: str, stage: str, count: int) -> None:
        self.add(instance, stage, DELIVERED, count)

    def dropped(self, instance: str, stage: str, count: int, reason: str) -> None:
        self.add(instance, stage, DROPPED, count, reason)

    def get(self, instance: str, stage: str, outcome: str, reason: str | None = None) -> int:
        """The count for one cell, or summed over reasons when ``reason`` is None."""
        return sum(v for k, v in self._counts.items()
                   if k.instance == instance and k.stage == stage and k.outcome == outcome
                   and (reason is None or k.reason == reason))

    def items(self) -> Iterator[tuple[LedgerKey, int]]:
        return iter(list(self._counts.items()))

    def retire(self, instance: str, into: str) -> None:
        """Folds a finished instance's rows into the rows of ``into`` (e.g. all direct runs),
        so series do not accumulate per run while every total stays monotonic."""
        for k in [k for k in self._counts if k.instance == instance]:
            self._counts[k._replace(instance=into)] += self._counts.pop(k)

    def forget(self, instance: str) -> None:
        """Drops an instance's rows once it is removed, so series do not accumulate forever."""
        for k in [k for k in self._counts if k.instance == instance]:
            del self._counts[k]


class LedgerFolds:
    """When finished runs' rows are folded: one policy for every kind of run.

    A run's rows stay under its own label for ``after`` seconds once it ends, so scrapes see
    its final counts, then fold into an aggregate label (``direct-runs``,
    ``removed-instances``): series do not pile up per run, and every total stays monotonic.
    A new run with the same label (an instance re-created under its name) keeps the rows.

    Args:
        ledger: the daemon's ledger.
        after: seconds a finished run's rows keep their label.
    """

    def __init__(self, ledger: Ledger, after: float) -> None:
        self._ledger = ledger
        self._after = after
        self._pending: dict[str, asyncio.TimerHandle] = {}

    def later(self, label: str, into: str) -> None:
        """Folds ``label``'s rows into ``into``'s after the delay (from the event loop)."""
        self.keep(label)
        loop = asyncio.get_running_loop()
        self._pending[label] = loop.call_later(self._after, self._fold, label, into)

    def keep(self, label: str) -> None:
        """Cancels a pending fold of ``label`` (a run with that label starts again)."""
        handle = self._pending.pop(label, None)
        if handle is not None:
            handle.cancel()

    def pending(self) -> list[str]:
        return sorted(self._pending)

    def _fold(self, label: str, into: str) -> None:
        self._pending.pop(label, None)
        self._ledger.retire(label, into)

    def close(self) -> None:
        for handle in self._pending.values():
            handle.cancel()
        self._pending.clear()
