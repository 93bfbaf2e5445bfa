"""When a timed tick should drain a ring, and when a few records had better wait for more.

Every drained batch costs the pipeline about 0.3 ms whatever its size (a derivation and a
framing block per field, an instance-buffer packet, the sinks' queues). At trickle rates a
drain on every 10 ms tick makes a batch of one or two records each time, so the daemon's CPU
follows the tick instead of the records: one trace_open instance at 100 opens/s took 3.5 % of
a core, at 1,000/s 4.7 %. Letting a small backlog wait a bounded time turns a hundred
one-record batches into a few larger ones, and a busy ring (or the kernel's fill-level
wake-up) still drains at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from pipeline.gadget import DRAIN_MAX_WAIT, DRAIN_MIN_BYTES, RUNTIME_PREFIX
from pipeline.params import parse_duration


class Pending(Protocol):
    @property
    def pending_bytes(self) -> int: ...


class DrainPacer:
    """Decides, on each timed tick, whether to drain now.

    Args:
        interval: the time between ticks (a record can arrive just after a tick, so it may
            have waited this long already when the next tick first sees it).
        min_bytes: a backlog this large drains at once.
        max_wait: no record waits longer than about this (rounded up to a tick); at most
            ``interval`` means every tick with data drains, as without a pacer.
    """

    def __init__(self, interval: float, min_bytes: int, max_wait: float) -> None:
        self._interval = interval
        self._min_bytes = min_bytes
        self._max_wait = max_wait
        self._since: float | None = None
        self._woken = False
        self.deferred = 0
        """Ticks that let a backlog wait (for the tests and the curious)."""

    @classmethod
    def from_values(cls, interval: float, values: Mapping[str, Any]) -> DrainPacer:
        """The pacer a run's resolved ``operator.bcc.*`` params ask for."""
        min_bytes = values.get(RUNTIME_PREFIX + "drain-min-bytes")
        max_wait = values.get(RUNTIME_PREFIX + "drain-max-wait")
        return cls(interval,
                   DRAIN_MIN_BYTES if min_bytes in (None, "") else int(min_bytes),
                   parse_duration(DRAIN_MAX_WAIT) if max_wait in (None, "") else float(max_wait))

    def woken(self) -> None:
        """The kernel signalled a filling ring: the next :meth:`due` drains at once."""
        self._woken = True

    def due(self, rings: Iterable[Pending], now: float) -> bool:
        """Whether to drain now (after a wake-up, or on a tick); ``rings`` are read only for
        their backlog."""
        if self._woken:
            self._woken = False
            self._since = None
            return True
        pending = sum(r.pending_bytes for r in rings)
        if pending == 0:
            self._since = None
            return False
        if pending >= self._min_bytes:
            self._since = None
            return True
        if self._since is None:
            self._since = now
        # The oldest record arrived after the tick before the one that first saw it.
        if now - self._since + self._interval >= self._max_wait:
            self._since = None
            return True
        self.deferred += 1
        return False
