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
from typing import TYPE_CHECKING, Any

from api.builtin_manager import BuiltInGadgetManager
from api.compile_queue import DEFAULT_MAX_WAITING, DEFAULT_MAX_WAITING_PER_CLIENT, CompileQueue
from api.context import ServiceContext
from api.gadget_manager import GadgetManager
from api.instance_manager import GadgetInstanceManager, InstanceManager
from api.metrics_server import MetricsServer
from api.otel_logs import DaemonLogExport, OtelLogsSettings
from api.peers import Peer, PeerPool, PeerTLS
from api.reconcile import ConfigReconciler
from api.server import DEFAULT_SOCKET, GrpcServer, ListenAddress, TLSConfig
from pipeline.containers.collection import ContainerCollection
from pipeline.containers.containerd import DEFAULT_NAMESPACE as CONTAINERD_NAMESPACE
from pipeline.containers.containerd import DEFAULT_SOCKET as CONTAINERD_SOCKET
from pipeline.containers.watcher import RuntimeWatcher
from pipeline.heap import single_arena
from pipeline.ledger import Ledger
from pipeline.sinks.registry import SinkManager
from pipeline.sources.catalog import Catalog

if TYPE_CHECKING:
    from config.loader import LoadedConfig

_logger = logging.getLogger(__name__)

DRAIN_MARGIN = 2.0
"""Seconds the server waits for streams beyond their own drain deadline (their teardown)."""


@dataclass
class DaemonSettings:
    """How the daemon runs; the YAML config and the CLI flags both fill this."""

    listen: Sequence[str] = (DEFAULT_SOCKET,)
    state_dir: Path = Path("/var/lib/gadgetpipe")
    metrics_listen: str | None = "127.0.0.1:2224"
    tls: TLSConfig | None = None
    insecure: bool = False
    socket_group: str | None = None
    events_buffer_length: int = 131072
    node: str | None = None
    nodes: dict[str, str | Peer] = field(default_factory=dict)
    """Peer daemons by node name (``{"node-b": "unix:///run/b.sock", "node-c": "10.0.0.3:8080"}``):
    multi-node instances and legacy fan-out runs forward to them and merge their streams. A
    :class:`api.peers.Peer` carries a node's own TLS settings."""
    node_tls: PeerTLS | None = None
    """TLS towards TCP peers without their own (CA, client certificate and key for mutual
    TLS); a TCP peer without any needs ``insecure``."""
    containerd_socket: str = CONTAINERD_SOCKET
    """containerd's socket: its containers enrich every record ("" watches none)."""
    containerd_namespace: str = CONTAINERD_NAMESPACE
    sinks: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Daemon-wide sink settings by sink type, keys without prefix (``{"kafka": {"brokers":
    "10.0.0.1:9092"}}``); they become the defaults of the runs' ``operator.<sink>.*`` params."""
    otel_logs: OtelLogsSettings | None = None
    """Where the daemon's own log goes as OTLP (api.otel_logs); None: nowhere but stderr."""
    compile_queue: int = DEFAULT_MAX_WAITING
    """Runs of clients that may wait for their turn to compile (api/compile_queue.py)."""
    compile_queue_per_client: int = DEFAULT_MAX_WAITING_PER_CLIENT
    """Of those, runs of one client."""
    extra: dict[str, Any] = field(default_factory=dict)
    config: LoadedConfig | None = None
    """The validated YAML config the settings came from: its instances are created at start
    and re-read on SIGHUP (api.reconcile); None: no declared instances."""


class Daemon:
    """Start order: catalog and ledger, container watcher, sinks, metrics, instance manager,
    gRPC server; stop reversed."""

    def __init__(self, settings: DaemonSettings) -> None:
        self.settings = settings
        self.ledger = Ledger()
        self.catalog = Catalog()
        self.ctx = ServiceContext(self.catalog, self.ledger,
                                  events_buffer_length=settings.events_buffer_length,
                                  compile_queue=CompileQueue(settings.compile_queue,
                                                             settings.compile_queue_per_client))
        if settings.node:
            self.ctx.node = settings.node
        self.server: GrpcServer | None = None
        self.instances: InstanceManager | None = None
        self.sinks: SinkManager | None = None
        self.metrics: MetricsServer | None = None
        self.watcher: RuntimeWatcher | None = None
        self.reconciler: ConfigReconciler | None = None
        self._stops: list[Callable[[], Any]] = []
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        # Before any worker thread compiles: one malloc arena, so what runs free goes back.
        single_arena()
        # The log export first and stopped last, so it carries the start and the stop.
        if self.settings.otel_logs is not None:
            logs = DaemonLogExport(self.settings.otel_logs, self.ctx.node)
            logs.start()
            self.on_stop(logs.stop)
        # Containers before anything that starts runs: runs (restored instances too) enrich
        # from the collection, which the watcher fills in the background; no runtime is a
        # warning, not a failure.
        self.ctx.containers = ContainerCollection()
        self.on_stop(self.ctx.containers.close)
        self.watcher = RuntimeWatcher(self.ctx.containers, self.settings.containerd_socket,
                                      self.settings.containerd_namespace)
        await self.watcher.start()
        self.on_stop(self.watcher.stop)
        # Sinks before anything that starts runs; their stop runs after the server's (reverse
        # order), so runs end first and their sinks drain within the deadline.
        self.sinks = SinkManager(self.ledger, self.settings.sinks, node=self.ctx.node)
        await self.sinks.start()
        self.ctx.sinks = self.sinks
        self.on_stop(self.sinks.stop)
        if self.settings.metrics_listen:
            self.metrics = MetricsServer(self.settings.metrics_listen, self.ledger, self.ctx)
            await self.metrics.start()
            self.on_stop(self.metrics.stop)
        # Instances after the sinks they feed; their stop (drain, files kept) runs before the
        # sinks' stop and after the server's.
        peers = PeerPool(self.settings.nodes, self.settings.node_tls, self.settings.insecure)
        self.instances = InstanceManager(self.ctx, self.settings.state_dir, peers)
        await self.instances.start()
        self.ctx.instances = self.instances
        self.on_stop(self.instances.stop)
        # Declared instances go through the manager's create (what CreateGadgetInstance calls),
        # before the socket opens, so the first client already finds them.
        self.reconciler = ConfigReconciler.for_daemon(self)
        if self.reconciler is not None:
            await self.reconciler.start()
            self.on_stop(self.reconciler.stop)
        handlers: list[Any] = [GadgetManager(self.ctx), BuiltInGadgetManager(self.ctx),
                               GadgetInstanceManager(self.instances)]
        addresses = [ListenAddress.parse(a) for a in self.settings.listen]
        self.server = GrpcServer(handlers, addresses, self.settings.tls, self.settings.insecure,
                                 self.settings.socket_group)
        await self.server.start()
        self._stops.append(self.server.stop)

    def on_stop(self, fn: Callable[[], Any]) -> None:
        """Registers a component's stop; they run in reverse order of registration."""
        self._stops.append(fn)

    async def stop(self) -> None:
        # Streams end first, as a stop request ends them (a run drains its ring into its
        # client, which gets status OK), within the drain deadline; then components stop in
        # reverse order, the server cancelling whatever call is left.
        self.ctx.shutting_down.set()
        if self.server is not None:
            await self.server.drain(self.ctx.drain_deadline + DRAIN_MARGIN)
        while self._stops:
            fn = self._stops.pop()
            with contextlib.suppress(Exception):
                result = fn()
                if asyncio.iscoroutine(result):
                    await result
        self.ctx.folds.close()
        self.ctx.heap.close()
        self._stopped.set()

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # Before start: SIGHUP's default action would kill the daemon.
        loop.add_signal_handler(signal.SIGHUP, self.reload_config)
        try:
            await self.start()
        except BaseException:
            await self.stop()  # what started before the failure (instances hold BPF programs)
            raise
        _logger.info("gadgetpipe serving on %s", ", ".join(self.server.bound if self.server
                                                            else []))
        try:
            await stop.wait()
        finally:
            _logger.info("stopping")
            await self.stop()

    def reload_config(self) -> None:
        """SIGHUP: re-reads the config's instances; unchanged ones keep running untouched."""
        if self.reconciler is None:
            _logger.warning("SIGHUP: no config to reload (yet)")
            return
        _logger.info("SIGHUP: reloading the config")
        self.reconciler.request_reload()

