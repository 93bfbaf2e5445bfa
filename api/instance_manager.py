"""The daemon's gadget instances: create, list, get, remove, resolve and attach
(docs/gadget-service.md §6), and the ``api.GadgetInstanceManager`` servicer over them. One instance
is api/instance.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from grpclib import GRPCError, Status

from api.context import ServiceContext
from api.instance import (
    FROM_SEQ_METADATA,
    MAX_EVENT_BUFFER,
    READY_WAIT,
    Instance,
    InstanceStatus,
)
from api.peers import PeerPool
from api.run_session import REMOVED_INSTANCES
from api.store import InstanceStore, StoreProblem
from pipeline._gen import gadget_service_grpc as svc
from pipeline._gen import gadget_service_pb2 as pb
from pipeline.run import GadgetRun

__all__ = ["ID_RE", "NAME_RE", "GadgetInstanceManager", "InstanceManager", "random_name"]

_logger = logging.getLogger(__name__)

RESTORE_REPORT_WAIT = 300.0
"""Seconds the start-up report waits for restored instances to trace."""

ID_RE = re.compile(r"^[a-f0-9]{32}$")
NAME_RE = re.compile(r"^[a-z0-9-_]{1,32}$")

_ADJECTIVES = (
    "admiring", "amazing", "awesome", "blissful", "bold", "brave", "busy", "charming",
    "clever", "cool", "dazzling", "determined", "eager", "ecstatic", "elegant", "epic",
    "festive", "focused", "friendly", "funny", "gallant", "gifted", "happy", "hopeful",
    "jolly", "keen", "kind", "laughing", "lucid", "magical", "modest", "nice", "nifty",
    "optimistic", "peaceful", "practical", "quirky", "relaxed", "serene", "sharp", "stoic",
    "tender", "trusting", "upbeat", "vibrant", "wizardly", "youthful", "zealous",
)
_SURNAMES = (
    "agnesi", "albattani", "allen", "archimedes", "babbage", "bartik", "bell", "bhabha",
    "borg", "curie", "darwin", "dijkstra", "einstein", "euler", "fermat", "feynman",
    "franklin", "galileo", "gauss", "goldberg", "hamilton", "hawking", "hopper", "hypatia",
    "johnson", "kepler", "knuth", "lamport", "lovelace", "mayer", "mccarthy", "meitner",
    "newton", "noether", "pascal", "perlman", "ritchie", "shannon", "sinoussi", "thompson",
    "torvalds", "turing", "wilson", "wozniak", "yalow", "zhukovsky",
)


def random_name(taken: Iterable[str]) -> str:
    """A Docker-style ``adjective_surname`` not in ``taken`` (a digit is added on a clash)."""
    used = set(taken)
    for attempt in range(64):
        name = f"{secrets.choice(_ADJECTIVES)}_{secrets.choice(_SURNAMES)}"
        if attempt > 8:
            name = f"{name[:30]}{secrets.randbelow(100)}"
        if name not in used and NAME_RE.match(name):
            return name
    return secrets.token_hex(8)



class InstanceManager:
    """All gadget instances of the daemon, their store and their peers.

    Args:
        ctx: the daemon's service context (catalog, ledger, sinks, node name).
        state_dir: where instances are persisted (``<state_dir>/gadgets``).
        nodes: peer daemons by node name, for multi-node instances and legacy fan-out: their
            addresses, or a :class:`PeerPool` with their TLS settings.
        ready_wait: seconds GetGadgetInfo/attach wait for a starting instance.
    """

    def __init__(self, ctx: ServiceContext, state_dir: Path,
                 nodes: Mapping[str, str] | PeerPool | None = None,
                 ready_wait: float = READY_WAIT) -> None:
        self._ctx = ctx
        self.store = InstanceStore(state_dir)
        self.peers = nodes if isinstance(nodes, PeerPool) else PeerPool(nodes or {})
        self._ready_wait = ready_wait
        self.ready_wait = ready_wait
        """Seconds CreateGadgetInstance waits for the new instance to trace."""
        self._instances: dict[str, Instance] = {}
        self._names: dict[str, str] = {}  # name -> id
        self._restore_report: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Opens the store and starts every persisted instance (in the background)."""
        began = time.monotonic()
        self.peers.start()
        await asyncio.to_thread(self.store.start)
        requests = await asyncio.to_thread(self.store.load_all)
        for req in requests:
            inst = Instance(self._ctx, req, self.peers)
            if inst.name in self._names:
                # A hand-edited store: keep the first, report the other as an error.
                inst._fail(f"gadget with name {inst.name!r} already exists")
                inst.started.set()
            else:
                self._names[inst.name] = inst.id
                inst.launch()
            self._instances[inst.id] = inst
        _logger.info("restored %d gadget instance(s) from %s (%d unreadable)", len(requests),
                     self.store.directory, len(self.store.problems()))
        if requests:
            restored = list(self._instances.values())
            self._restore_report = asyncio.create_task(self._report_restored(restored, began),
                                                       name="instances-restored")

    async def _report_restored(self, restored: list[Instance], began: float) -> None:
        """Logs when every restored instance traces again (or failed): they count as not
        ready until then."""
        await asyncio.gather(*(i.wait_tracing(RESTORE_REPORT_WAIT) for i in restored))
        tracing = sum(i.tracing.is_set() for i in restored)
        _logger.info("restored instances: %d of %d tracing %.2f s after the instance manager "
                     "started", tracing, len(restored), time.monotonic() - began)

    async def stop(self) -> None:
        """Stops every instance (their files stay, so the next start restores them)."""
        if self._restore_report is not None:
            self._restore_report.cancel()
        await asyncio.gather(*(i.stop(self._ctx.drain_deadline)
                               for i in self._instances.values()), return_exceptions=True)
        self.peers.stop()
        self.store.stop()

    def problems(self) -> list[StoreProblem]:
        return self.store.problems()

    def list_states(self) -> list[InstanceStatus]:
        """One summary per instance, in id order (for metrics and the CLI)."""
        return [self._instances[k].summary() for k in sorted(self._instances)]

    def runs(self) -> list[GadgetRun]:
        """The local runs of the instances (self-metrics read their kernel losses)."""
        return [i.run for i in self._instances.values() if i.run is not None]

    # -- RPC bodies -------------------------------------------------------------------------

    async def create(self, req: pb.CreateGadgetInstanceRequest, wait: float = 0.0,
                     ) -> pb.CreateGadgetInstanceResponse:
        """Validates, persists and starts an instance; then waits up to ``wait`` seconds for
        it to trace. The answer's state says which: StatusRunning (tracing), StatusError
        (its start failed, with the reason) or StatusInvalid with "starting: not tracing yet
        ..." (still compiling when the wait ended; List shows when it runs).

        Raises:
            GRPCError: the request is invalid (nothing persisted) or the store failed.
        """
        stored = pb.CreateGadgetInstanceRequest()
        stored.CopyFrom(req)
        gi = stored.gadgetInstance
        if not gi.id:
            gi.id = secrets.token_hex(16)
        elif not ID_RE.match(gi.id):
            raise GRPCError(Status.INVALID_ARGUMENT, f"invalid gadget instance id: {gi.id}")
        if not gi.name:
            gi.name = random_name(self._names)
        elif not NAME_RE.match(gi.name):
            raise GRPCError(Status.INVALID_ARGUMENT, f"invalid gadget instance name: {gi.name}")
        if gi.id in self._instances:
            raise GRPCError(Status.ALREADY_EXISTS, f'gadget with id "{gi.id}" already exists')
        if gi.name in self._names:
            raise GRPCError(Status.ALREADY_EXISTS, f'gadget with name "{gi.name}" already exists')
        if stored.eventBufferLength < 0 or stored.eventBufferLength > MAX_EVENT_BUFFER:
            raise GRPCError(Status.INVALID_ARGUMENT, f"eventBufferLength: must be 0..."
                            f"{MAX_EVENT_BUFFER}, got {stored.eventBufferLength}")
        if not gi.timeCreated:
            gi.timeCreated = int(time.time())
        gi.ClearField("state")  # runtime state is never persisted
        inst = Instance(self._ctx, stored, self.peers)
        inst.prepare()  # raises with the reason: unknown gadget, bad params, unknown node
        # Reserve id and name before the first await so a concurrent create cannot take them.
        self._instances[gi.id] = inst
        self._names[gi.name] = gi.id
        try:
            await asyncio.to_thread(self.store.save, stored)
        except Exception as e:
            del self._instances[gi.id]
            del self._names[gi.name]
            raise GRPCError(Status.INTERNAL, f"persisting gadget instance: {e}") from None
        inst.launch()
        _logger.info("created gadget instance %s (%s) of %s", gi.name, gi.id,
                     gi.gadgetConfig.imageName)
        if wait > 0:
            await inst.wait_tracing(wait)
        return pb.CreateGadgetInstanceResponse(result=0, gadgetInstance=inst.to_proto())

    def list(self) -> list[pb.GadgetInstance]:
        return [self._instances[k].to_proto() for k in sorted(self._instances)]

    def get(self, instance_id: str) -> pb.GadgetInstance:
        if not ID_RE.match(instance_id):
            raise GRPCError(Status.INVALID_ARGUMENT, f"invalid gadget instance id: {instance_id}")
        inst = self._instances.get(instance_id)
        if inst is None:
            path = self.store.path(instance_id)
            raise GRPCError(Status.NOT_FOUND, "getting gadget instance from store: loading "
                            f'gadget: gadget instance not found at "{path}"')
        return inst.to_proto()

    async def remove(self, instance_id: str) -> pb.StatusResponse:
        """Stops and forgets an instance; an unknown id is ``result=1``
        (docs/gadget-service.md §6.2)."""
        if not ID_RE.match(instance_id):
            raise GRPCError(Status.INVALID_ARGUMENT, f"invalid gadget instance id: {instance_id}")
        inst = self._instances.get(instance_id)
        if inst is None:
            return pb.StatusResponse(result=1, message="gadget instance not found at "
                                     f'"{self.store.path(instance_id)}"')
        # The file goes first: when it cannot be removed (a read-only state dir) the instance
        # keeps running untouched, rather than stopped here yet restored at the next start.
        try:
            await asyncio.to_thread(self.store.delete, instance_id)
        except Exception as e:
            return pb.StatusResponse(result=1, message=f"removing gadget instance: {e}")
        await inst.stop(self._ctx.drain_deadline)
        failures = await inst.remove_on_peers()
        if self._instances.get(instance_id) is inst:
            del self._instances[instance_id]
            if self._names.get(inst.name) == instance_id:
                del self._names[inst.name]
        # One policy for every run (api/run_session.py): its rows keep their label for a
        # while, then fold.
        self._ctx.folds.later(inst.label, REMOVED_INSTANCES)
        _logger.info("removed gadget instance %s (%s)", inst.name, inst.id)
        return pb.StatusResponse(result=0, message="; ".join(failures))

    def resolve(self, ref: str) -> Instance | None:
        """By exact id, then exact name, then id prefix (first in id order), as upstream."""
        if not ref:
            return None
        inst = self._instances.get(ref)
        if inst is None and ref in self._names:
            inst = self._instances.get(self._names[ref])
        if inst is None:
            inst = next((self._instances[k] for k in sorted(self._instances)
                         if k.startswith(ref)), None)
        return inst

    async def gadget_info(self, ref: str) -> pb.GadgetInfo:
        """GetGadgetInfo with flag 1: the instance's GadgetInfo once it has started.

        Raises:
            GRPCError: NOT_FOUND (``instance <ref> not found``), FAILED_PRECONDITION with the
                instance's error, or UNAVAILABLE if it is still starting after the wait.
        """
        inst = self.resolve(ref)
        if inst is None:
            raise GRPCError(Status.NOT_FOUND, f"instance {ref} not found")
        await self._wait_ready(inst)
        if inst.status == pb.StatusError:
            raise GRPCError(Status.FAILED_PRECONDITION,
                            f"gadget instance {inst.id} failed: {inst.message}")
        if inst.info is None:
            raise GRPCError(Status.UNAVAILABLE, f"gadget instance {inst.id} is still starting")
        out = pb.GadgetInfo()
        out.CopyFrom(inst.info)
        return out

    async def _wait_ready(self, inst: Instance) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(inst.started.wait(), self._ready_wait)

    async def attach(self, stream: Any, req: pb.GadgetAttachRequest) -> None:
        """Serves an attach stream (docs/gadget-service.md §3.3); the caller checked the
        version."""
        inst = self._instances.get(req.id)
        if inst is None:
            raise GRPCError(Status.NOT_FOUND, f"gadget {req.id} not found")
        from_seq = _from_seq(stream)
        await self._wait_ready(inst)
        if inst.status == pb.StatusError:
            raise GRPCError(Status.FAILED_PRECONDITION,
                            f"gadget instance {inst.id} failed: {inst.message}")
        if inst.info is None:
            raise GRPCError(Status.UNAVAILABLE, f"gadget instance {inst.id} is still starting")
        await inst.serve_attach(stream, from_seq)


def _from_seq(stream: Any) -> int | None:
    md = getattr(stream, "metadata", None)
    raw = md.get(FROM_SEQ_METADATA) if md is not None else None
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    if not text.strip().isdigit() or int(text) < 1:
        raise GRPCError(Status.INVALID_ARGUMENT,
                        f"{FROM_SEQ_METADATA}: want an integer >= 1, got {text!r}")
    return int(text)


class GadgetInstanceManager(svc.GadgetInstanceManagerBase):
    """``api.GadgetInstanceManager`` over an :class:`InstanceManager`."""

    def __init__(self, manager: InstanceManager) -> None:
        self._m = manager

    async def CreateGadgetInstance(self, stream: Any) -> None:
        req: pb.CreateGadgetInstanceRequest = await stream.recv_message()
        await stream.send_message(await self._m.create(req, wait=self._m.ready_wait))

    async def ListGadgetInstances(self, stream: Any) -> None:
        await stream.recv_message()
        await stream.send_message(pb.ListGadgetInstanceResponse(gadgetInstances=self._m.list()))

    async def GetGadgetInstance(self, stream: Any) -> None:
        req: pb.GadgetInstanceId = await stream.recv_message()
        await stream.send_message(self._m.get(req.id))

    async def RemoveGadgetInstance(self, stream: Any) -> None:
        req: pb.GadgetInstanceId = await stream.recv_message()
        await stream.send_message(await self._m.remove(req.id))
