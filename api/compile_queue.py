"""The compile queue: runs take turns to compile, load and attach their BPF programs.

libbcc's clang is not thread-safe, so compiles run one at a time anyway (``COMPILE_LOCK`` in
pipeline/sources/tracer.py). A compile in a worker thread cannot be cancelled, and a run that
waited for the lock in a thread was compiled even when its client had long gone: a burst of
runs cancelled at once kept the daemon compiling for minutes while the next run waited. So a
run waits for its turn here, in the event loop, where waiting can be given up: a run whose
client leaves before its turn is dropped from the queue and never compiled (outcome
``abandoned``); one whose client leaves during its compile is freed when the compile ends
(pipeline/sources/base.py ``load_in_thread``), while the next run already takes its turn.

The queue is bounded, in all and per client, for runs a client waits on (direct and legacy
runs): past either bound a new run is refused at once with ``RESOURCE_EXHAUSTED`` and a
message naming the bound (outcome ``refused``). Instances (``client=None``) take turns in the
same order but are never refused: they are persisted, and the daemon owes them a start.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_WAITING", "DEFAULT_MAX_WAITING_PER_CLIENT", "CompileQueue",
           "CompileQueueFull", "Ticket"]

DEFAULT_MAX_WAITING = 128
"""Runs of clients that may wait for their compile at once (a compile takes ~0.3-2 s)."""
DEFAULT_MAX_WAITING_PER_CLIENT = 32
"""Of those, runs one client (one process on the unix socket, one host over TCP) may have."""

OUTCOME_COMPILED = "compiled"
OUTCOME_ABANDONED = "abandoned"
OUTCOME_REFUSED = "refused"


class CompileQueueFull(Exception):
    """A run would pass a bound of the queue; the message names the bound."""


@dataclass(eq=False)
class Ticket:
    """One run's place in the queue, from :meth:`CompileQueue.reserve` until released."""

    queue: CompileQueue
    client: str | None
    what: str
    _turn: asyncio.Future[None] | None = None
    _done: bool = False

    @property
    def waiting(self) -> bool:
        """Still in the queue: its turn has not come (or it does not wait for it yet)."""
        return not self._done and self.queue._holder is not self

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Waits for this run's turn and holds it for the block (compile and attach).

        Cancelled while waiting (the client left), the run leaves the queue uncompiled.
        """
        await self.queue._wait(self)
        try:
            yield
        finally:
            self.release()

    def release(self) -> None:
        """Gives the turn to the next run, or leaves the queue (abandoned) if it never came.
        Idempotent."""
        self.queue._release(self)


class CompileQueue:
    """Runs waiting to compile, served one at a time in arrival order.

    Args:
        max_waiting: runs of clients that may wait at once.
        max_waiting_per_client: of those, runs of one client.
    """

    def __init__(self, max_waiting: int = DEFAULT_MAX_WAITING,
                 max_waiting_per_client: int = DEFAULT_MAX_WAITING_PER_CLIENT) -> None:
        if max_waiting < 1 or max_waiting_per_client < 1:
            raise ValueError("compile queue bounds must be at least 1, got "
                             f"{max_waiting} and {max_waiting_per_client}")
        self.max_waiting = max_waiting
        self.max_waiting_per_client = max_waiting_per_client
        self._waiting: deque[Ticket] = deque()
        self._holder: Ticket | None = None
        self._clients: Counter[str] = Counter()
        self._bounded = 0
        self.outcomes: Counter[str] = Counter({OUTCOME_COMPILED: 0, OUTCOME_ABANDONED: 0,
                                               OUTCOME_REFUSED: 0})
        """Runs by what became of them: compiled (got their turn), abandoned, refused."""

    @property
    def waiting(self) -> int:
        """Runs waiting for their turn (the one compiling not included)."""
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        """A run holds the turn (is compiling or attaching)."""
        return self._holder is not None

    def reserve(self, client: str | None, what: str) -> Ticket:
        """A place at the end of the queue for a run of ``client`` (None: an instance).

        Raises:
            CompileQueueFull: ``client``'s runs or all clients' runs are at their bound.
        """
        if client is not None:
            if self._bounded >= self.max_waiting:
                self.outcomes[OUTCOME_REFUSED] += 1
                raise CompileQueueFull(
                    f"{self._bounded} runs are waiting to compile their BPF programs, the "
                    f"daemon's limit (compile queue: {self.max_waiting} in all); try again "
                    "when fewer runs are starting")
            if self._clients[client] >= self.max_waiting_per_client:
                self.outcomes[OUTCOME_REFUSED] += 1
                raise CompileQueueFull(
                    f"this client has {self._clients[client]} runs waiting to compile their "
                    f"BPF programs, the limit per client (compile queue: "
                    f"{self.max_waiting_per_client} per client); wait for them to start")
            self._clients[client] += 1
            self._bounded += 1
        ticket = Ticket(self, client, what)
        self._waiting.append(ticket)
        return ticket

    async def _wait(self, ticket: Ticket) -> None:
        if ticket._done:
            raise RuntimeError(f"compile turn of {ticket.what} was already released")
        ticket._turn = asyncio.get_running_loop().create_future()
        self._grant()
        try:
            await ticket._turn
        except asyncio.CancelledError:
            ticket.release()
            raise

    def _grant(self) -> None:
        """Hands the free turn to the first run that waits for it, in arrival order (runs
        that reserved a place but do not wait yet keep it and are passed)."""
        if self._holder is not None:
            return
        for ticket in self._waiting:
            if ticket._turn is not None and not ticket._turn.done():
                self._leave(ticket)
                self._holder = ticket
                self.outcomes[OUTCOME_COMPILED] += 1
                ticket._turn.set_result(None)
                return

    def _leave(self, ticket: Ticket) -> None:
        self._waiting.remove(ticket)
        if ticket.client is not None:
            self._clients[ticket.client] -= 1
            if not self._clients[ticket.client]:
                del self._clients[ticket.client]
            self._bounded -= 1

    def _release(self, ticket: Ticket) -> None:
        if ticket._done:
            return
        ticket._done = True
        if self._holder is ticket:
            self._holder = None
        elif ticket in self._waiting:
            self._leave(ticket)
            self.outcomes[OUTCOME_ABANDONED] += 1
        self._grant()
