"""The daemon: owns the catalog, the ledger, the gRPC server and (when configured) the
instance manager and the sinks; starts them in order and stops them in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from api.builtin_manager import BuiltInGadgetManager
from api.context import ServiceContext
from api.gadget_manager import GadgetManager
from api.server import DEFAULT_SOCKET, GrpcServer, ListenAddress, TLSConfig
from pipeline.gadget import Catalog
from pipeline.ledger import Ledger

_logger = logging.getLogger(__name__)


@dataclass
class DaemonSettings:
    """How the daemon runs; the YAML config and the CLI flags both fill this."""

    listen: Sequence[str] = (DEFAULT_SOCKET,)
    state_dir: Path = Path("/var/lib/gadgetpipe")
    metrics_listen: str | None = "127.0.0.1:2224"
    tls: TLSConfig | None = None
    insecure: bool = False
    socket_group: str | None = None
    events_buffer_length: int = 16384
    node: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Daemon:
    """Start order: catalog and ledger, metrics, instance manager, gRPC server; stop reversed."""

    def __init__(self, settings: DaemonSettings) -> None:
        self.settings = settings
        self.ledger = Ledger()
        self.catalog = Catalog()
        self.ctx = ServiceContext(self.catalog, self.ledger,
                                  events_buffer_length=settings.events_buffer_length)
        if settings.node:
            self.ctx.node = settings.node
        self.server: GrpcServer | None = None
        self._stops: list[Callable[[], Any]] = []
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        handlers: list[Any] = [GadgetManager(self.ctx), BuiltInGadgetManager(self.ctx)]
        for hook in _optional_components():
            handler = await hook(self)
            if handler is not None:
                handlers.append(handler)
        addresses = [ListenAddress.parse(a) for a in self.settings.listen]
        self.server = GrpcServer(handlers, addresses, self.settings.tls, self.settings.insecure,
                                 self.settings.socket_group)
        await self.server.start()
        self._stops.append(self.server.stop)

    def on_stop(self, fn: Callable[[], Any]) -> None:
        """Registers a component's stop; they run in reverse order of registration."""
        self._stops.append(fn)

    async def stop(self) -> None:
        while self._stops:
            fn = self._stops.pop()
            with contextlib.suppress(Exception):
                result = fn()
                if asyncio.iscoroutine(result):
                    await result
        self._stopped.set()

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        _logger.info("gadgetpipe serving on %s", ", ".join(self.server.bound if self.server
                                                            else []))
        try:
            await stop.wait()
        finally:
            _logger.info("stopping")
            await self.stop()


def _optional_components() -> list[Callable[[Daemon], Any]]:
    """Components that plug into the daemon when their modules exist (instances, metrics)."""
    hooks: list[Callable[[Daemon], Any]] = []
    with contextlib.suppress(ImportError):
        from api.instance_manager import install as install_instances
        hooks.append(install_instances)
    with contextlib.suppress(ImportError):
        from pipeline.sinks.registry import install as install_sinks
        hooks.insert(0, install_sinks)
    return hooks
