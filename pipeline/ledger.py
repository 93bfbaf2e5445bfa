"""The loss ledger: every record produced, delivered or dropped, by instance, stage and reason.

Counting is a dict increment per batch; the Prometheus collector reads it at scrape time.
For each stage, ``produced == delivered + dropped + queued`` must hold; tests check it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import NamedTuple

PRODUCED = "produced"
DELIVERED = "delivered"
DROPPED = "dropped"


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
