"""What the servicers share: the catalog, the ledger and daemon-wide settings."""

from __future__ import annotations

import asyncio
import itertools
import socket
from dataclasses import dataclass, field
from typing import Any

from api.compile_queue import CompileQueue
from pipeline.containers.collection import ContainerCollection
from pipeline.heap import HeapTrimmer
from pipeline.ledger import Ledger, LedgerFolds
from pipeline.sources.catalog import Catalog

RETIRE_AFTER_S = 300.0
"""Seconds a finished run's ledger rows keep their own label before they are folded."""


@dataclass
class ServiceContext:
    """Daemon-wide state handed to every servicer (no module globals).

    Args:
        catalog: the gadgets this daemon can run.
        ledger: the loss ledger every run writes to.
        node: this daemon's node name (records and logs carry it).
        events_buffer_length: records a direct run's stream may queue before dropping.
        drain_deadline: seconds a stopping stream may take to send what is queued.
        instances: the instance manager, once the daemon has one.
        containers: the containers the runtime reports (every run's records are enriched from
            it and container selection reads it); empty when no runtime is watched.
        shutting_down: set when the daemon begins to stop: every stream ends as a stop request
            would end it (runs drain into their clients, which get status OK; attach streams
            send what is queued), before the server closes what is left.
        compile_queue: where runs take turns to compile (api/compile_queue.py).
        heap: trims the heap after runs end.
        folds: when finished runs' ledger rows are folded (made from ``ledger``).
    """

    catalog: Catalog
    ledger: Ledger
    node: str = field(default_factory=socket.gethostname)
    events_buffer_length: int = 131072
    drain_deadline: float = 5.0
    instances: Any = None
    sinks: Any = None
    containers: ContainerCollection = field(
        default_factory=lambda: ContainerCollection(host_netns=0))
    shutting_down: asyncio.Event = field(default_factory=asyncio.Event)
    compile_queue: CompileQueue = field(default_factory=CompileQueue)
    heap: HeapTrimmer = field(default_factory=HeapTrimmer)
    folds: LedgerFolds = field(init=False)
    _runs: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.folds = LedgerFolds(self.ledger, RETIRE_AFTER_S)

    def next_run_name(self) -> str:
        return f"run-{next(self._runs)}"
