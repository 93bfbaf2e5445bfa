"""Keeps the container collection in step with containerd: a listing at connection, then its
event stream.

Events taken (containerd's topics): ``/containers/create|update`` (metadata: labels, image),
``/containers/delete``, ``/tasks/create`` (the init process exists, paused before the
container's program: its namespaces are read then, so the container is known before its first
process runs), ``/tasks/start`` (start time), ``/tasks/exit`` and ``/tasks/delete`` of the
init process (the container stops). The stream is subscribed before the listing, so a
container created meanwhile is not missed; both are idempotent.

No runtime at the socket: the watcher says so once (a warning), the daemon goes on without
containers, and the watcher keeps trying in the background; when the runtime appears (or comes
back) it is listed again. A re-listing every :data:`RESYNC_S` seconds repairs anything an
event could not tell (a container created in the instant between subscribing and listing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from grpclib.exceptions import GRPCError, StreamTerminatedError

from pipeline.containers.collection import ContainerCollection
from pipeline.containers.containerd import (
    DEFAULT_NAMESPACE,
    DEFAULT_SOCKET,
    LIVE_STATUSES,
    ContainerdClient,
    Event,
)
from pipeline.containers.model import RUNTIME_CONTAINERD, Container

_logger = logging.getLogger(__name__)

RETRY_S = (0.5, 1.0, 2.0, 5.0)
"""Waits between connection attempts, the last repeated."""
RESYNC_S = 60.0
_ERRORS = (OSError, GRPCError, StreamTerminatedError, asyncio.TimeoutError, ConnectionError)


class RuntimeWatcher:
    """Follows one containerd namespace into ``collection``.

    Args:
        collection: what is kept up to date.
        socket_path: containerd's gRPC socket; "" disables the watcher.
        namespace: the containerd namespace (Kubernetes' is ``k8s.io``).
    """

    def __init__(self, collection: ContainerCollection, socket_path: str = DEFAULT_SOCKET,
                 namespace: str = DEFAULT_NAMESPACE) -> None:
        self.collection = collection
        self.socket_path = socket_path
        self.namespace = namespace
        self.synced = asyncio.Event()
        """Set once the runtime's containers were listed (and again after each reconnect)."""
        self._task: asyncio.Task[None] | None = None
        self._client: ContainerdClient | None = None
        self._digests: dict[str, str] = {}
        self._told_absent = False

    async def start(self) -> None:
        if not self.socket_path:
            self.collection.status = "container runtime disabled (no containerd socket)"
            _logger.info("containers: %s", self.collection.status)
            return
        self._task = asyncio.create_task(self._run(), name="containers:containerd")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is not None:
            self._client.close()
            self._client = None
        self.collection.connected = False

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._session()
                attempt = 0  # the stream ended: containerd restarted, try again soon
            except _ERRORS as e:
                self._lost(e)
            finally:
                if self._client is not None:
                    self._client.close()
                    self._client = None
            await asyncio.sleep(RETRY_S[min(attempt, len(RETRY_S) - 1)])
            attempt += 1

    def _lost(self, e: BaseException) -> None:
        why = str(e) or type(e).__name__
        if self.collection.connected:
            _logger.warning("containers: lost containerd at %s (%s); records carry no container "
                            "until it is back (retrying)", self.socket_path, why)
        elif not self._told_absent:
            _logger.warning("containers: no container runtime at %s (%s); the daemon runs "
                            "without container enrichment and selection until one appears "
                            "there (retrying in the background)", self.socket_path, why)
        self._told_absent = True
        if self.collection.connected:
            self.collection.clear()
        self.collection.connected = False
        self.collection.status = f"no container runtime at {self.socket_path}: {why}"
        self.synced.clear()

    async def _session(self) -> None:
        if not os.path.exists(self.socket_path):
            raise FileNotFoundError(f"{self.socket_path} does not exist")
        client = self._client = ContainerdClient(self.socket_path, self.namespace)
        version = await client.version()
        events = client.events()
        # Subscribed first: the listing then cannot miss what happens while it runs.
        pending: asyncio.Future[Event] = asyncio.ensure_future(anext(events))
        try:
            await asyncio.sleep(0)  # lets the subscription request go out before the listing
            await self._list(client)
            self.collection.connected = True
            self.collection.status = (f"containerd {version} at {self.socket_path}, namespace "
                                      f"{self.namespace}")
            _logger.info("containers: watching %s (%d containers)", self.collection.status,
                         len(self.collection.containers()))
            self._told_absent = False
            self.synced.set()
            loop = asyncio.get_running_loop()
            resync = loop.time() + RESYNC_S
            while True:
                done, _ = await asyncio.wait({pending}, timeout=max(0.0, resync - loop.time()))
                if not done:
                    await self._list(client)
                    resync = loop.time() + RESYNC_S
                    continue
                try:
                    ev = pending.result()
                except StopAsyncIteration:
                    return
                await self._handle(client, ev)
                pending = asyncio.ensure_future(anext(events))
        finally:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
            with contextlib.suppress(Exception):
                await events.aclose()

    async def _list(self, client: ContainerdClient) -> None:
        listed = await client.containers()
        tasks = {t.container_id or t.id: t for t in await client.tasks()}
        seen = set()
        for pb in listed:
            seen.add(pb.id)
            await self._metadata(client, pb.id, dict(pb.labels), pb.image)
        for c in self.collection.containers(running=False):
            if c.id not in seen:
                self.collection.remove(c.id)
        live = {cid: t.pid for cid, t in tasks.items() if t.status in LIVE_STATUSES and t.pid}
        for c in self.collection.containers(running=False):
            if c.id in live:
                self.collection.start_task(c.id, live[c.id])
            else:
                self.collection.end_task(c.id)

    async def _metadata(self, client: ContainerdClient, container_id: str,
                        labels: dict[str, str], image: str) -> None:
        digest = ""
        if image:
            digest = self._digests.get(image, "")
            if not digest:
                digest = self._digests[image] = await client.image_digest(image)
        self.collection.set_metadata(Container.from_labels(
            container_id, labels, image, RUNTIME_CONTAINERD).with_(image_digest=digest))

    async def _ensure_known(self, client: ContainerdClient, container_id: str) -> bool:
        if self.collection.get(container_id) is not None:
            return True
        pb = await client.container(container_id)
        if pb is None:
            return False
        await self._metadata(client, pb.id, dict(pb.labels), pb.image)
        return self.collection.get(container_id) is not None

    async def _handle(self, client: ContainerdClient, ev: Event) -> None:
        p = ev.payload
        if p is None:
            return
        if ev.topic in ("/containers/create", "/containers/update"):
            await self._refresh(client, p.id)
        elif ev.topic == "/containers/delete":
            self.collection.remove(p.id)
        elif ev.topic == "/tasks/create":
            await self._task_started(client, p.container_id, p.pid, 0)
        elif ev.topic == "/tasks/start":
            await self._task_started(client, p.container_id, p.pid, ev.timestamp_ns)
        elif ev.topic in ("/tasks/exit", "/tasks/delete") and p.id in ("", p.container_id):
            # An exec'd process has its own id; only the init process (id == container id,
            # or none on /tasks/delete of older runtimes) ends the container's task.
            self.collection.end_task(p.container_id)

    async def _refresh(self, client: ContainerdClient, container_id: str) -> None:
        pb = await client.container(container_id)
        if pb is not None:
            await self._metadata(client, pb.id, dict(pb.labels), pb.image)

    async def _task_started(self, client: ContainerdClient, container_id: str, pid: int,
                            started_at: int) -> None:
        if pid and await self._ensure_known(client, container_id):
            self.collection.start_task(container_id, pid, started_at)
