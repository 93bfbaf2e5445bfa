"""A small containerd client over its gRPC socket, with code generated from containerd's own API
protos (``proto/containerd/``, see scripts/gen_proto.py).

Only what the container collection needs: the version (is anyone there), containers with
their labels, tasks with their pids, an image's digest, and the event stream. Namespaced calls
carry containerd's ``containerd-namespace`` header.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError, Message
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from pipeline.containers._gen.events import container_pb2 as container_events
from pipeline.containers._gen.events import task_pb2 as task_events
from pipeline.containers._gen.services.containers.v1 import containers_grpc, containers_pb2
from pipeline.containers._gen.services.events.v1 import events_grpc, events_pb2
from pipeline.containers._gen.services.images.v1 import images_grpc, images_pb2
from pipeline.containers._gen.services.tasks.v1 import tasks_grpc, tasks_pb2
from pipeline.containers._gen.services.version.v1 import version_grpc
from pipeline.containers._gen.types.task import task_pb2

DEFAULT_SOCKET = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "k8s.io"
"""The namespace Kubernetes' CRI plugin creates its containers in."""
NAMESPACE_HEADER = "containerd-namespace"
CALL_TIMEOUT = 5.0
LIVE_STATUSES = frozenset({task_pb2.CREATED, task_pb2.RUNNING, task_pb2.PAUSED,
                           task_pb2.PAUSING})
"""Task states whose init process exists (and so has namespaces to read)."""

# Event payloads by their Any type URL (containerd writes the bare message name).
_EVENT_TYPES: dict[str, type[Message]] = {
    f"containerd.events.{name}": cls for name, cls in (
        ("ContainerCreate", container_events.ContainerCreate),
        ("ContainerUpdate", container_events.ContainerUpdate),
        ("ContainerDelete", container_events.ContainerDelete),
        ("TaskCreate", task_events.TaskCreate),
        ("TaskStart", task_events.TaskStart),
        ("TaskExit", task_events.TaskExit),
        ("TaskDelete", task_events.TaskDelete),
    )}


@dataclass(frozen=True, slots=True)
class Event:
    """One runtime event: its topic (``/tasks/create``), namespace, time and payload."""

    topic: str
    namespace: str
    timestamp_ns: int
    payload: Any


class ContainerdClient:
    """Calls to one containerd over its unix socket.

    Args:
        socket_path: containerd's gRPC socket.
        namespace: the containerd namespace whose containers are listed.
    """

    def __init__(self, socket_path: str = DEFAULT_SOCKET,
                 namespace: str = DEFAULT_NAMESPACE) -> None:
        self.socket_path = socket_path
        self.namespace = namespace
        self._channel = Channel(path=socket_path)
        self._md = {NAMESPACE_HEADER: namespace}

    def close(self) -> None:
        self._channel.close()

    async def version(self) -> str:
        v = await version_grpc.VersionStub(self._channel).Version(empty_pb2.Empty(),
                                                                  timeout=CALL_TIMEOUT)
        return str(v.version)

    async def containers(self) -> list[containers_pb2.Container]:
        r = await containers_grpc.ContainersStub(self._channel).List(
            containers_pb2.ListContainersRequest(), metadata=self._md, timeout=CALL_TIMEOUT)
        return list(r.containers)

    async def container(self, container_id: str) -> containers_pb2.Container | None:
        """The container, or None when it is gone already."""
        try:
            r = await containers_grpc.ContainersStub(self._channel).Get(
                containers_pb2.GetContainerRequest(id=container_id), metadata=self._md,
                timeout=CALL_TIMEOUT)
        except GRPCError as e:
            if e.status == Status.NOT_FOUND:
                return None
            raise
        return r.container

    async def tasks(self) -> list[task_pb2.Process]:
        r = await tasks_grpc.TasksStub(self._channel).List(
            tasks_pb2.ListTasksRequest(), metadata=self._md, timeout=CALL_TIMEOUT)
        return list(r.tasks)

    async def image_digest(self, name: str) -> str:
        """The digest of image ``name``'s target (its manifest or index), "" when unknown."""
        try:
            r = await images_grpc.ImagesStub(self._channel).Get(
                images_pb2.GetImageRequest(name=name), metadata=self._md, timeout=CALL_TIMEOUT)
        except GRPCError as e:
            if e.status == Status.NOT_FOUND:
                return ""
            raise
        return str(r.image.target.digest)

    async def events(self) -> AsyncGenerator[Event, None]:
        """Every event of this client's namespace from now on, decoded; other payload types
        come with ``payload`` None."""
        stub = events_grpc.EventsStub(self._channel)
        async with stub.Subscribe.open() as stream:
            await stream.send_message(events_pb2.SubscribeRequest(), end=True)
            async for env in stream:
                if env.namespace != self.namespace:
                    continue
                cls = _EVENT_TYPES.get(env.event.type_url)
                payload: Any = None
                if cls is not None:
                    payload = cls()
                    try:
                        payload.ParseFromString(env.event.value)
                    except DecodeError:
                        payload = None
                yield Event(env.topic, env.namespace, env.timestamp.ToNanoseconds(), payload)
