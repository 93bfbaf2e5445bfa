"""Reconciling declared gadget instances with a daemon's, shared by ``apply`` and the daemon.

Instances are matched by **name**. For each declared instance:

* absent on the daemon -> **create**;
* present and the same -> **keep** (untouched: its BPF programs, buffer and seqs go on);
* present and different -> **replace** (remove, then create; names are unique), except that
  ``apply`` never replaces an instance the daemon's own config file declares (**conflict**:
  the daemon would take it back at its next reload).

With pruning, instances the same *owner* created earlier and no longer declared are
**removed**; instances of other owners (created by hand, by ``run --detach``, by the other
owner) are never pruned.

Bookkeeping lives in the instances' tags, so it survives daemon restarts and needs nothing but
the gadget service API: every request carries the owner tag (:data:`OWNER_APPLY` for
``gadgetpipe apply``, :data:`OWNER_CONFIG` for the daemon's own ``serve --config`` file) and a
digest tag (``gadgetpipe.digest=<16 hex>``) over the whole request as declared, so a change
the List response does not show (``eventBufferLength``) is still seen. "The same" means: same
owner, same digest and same visible fields (gadgetConfig, tags, nodes, id if declared).

Both ``apply`` (over gRPC) and the daemon (at start and on SIGHUP, through
:meth:`api.instance_manager.InstanceManager.create`, the very method behind the
``CreateGadgetInstance`` RPC) execute plans with :func:`execute`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from config.loader import ConfigError, ConfigLoader, LoadedConfig, Reachability
from config.schema import RESERVED_TAG_PREFIX
from pipeline._gen import gadget_service_pb2 as pb
from pipeline.params import REDACTED

if TYPE_CHECKING:
    from api.instance_manager import InstanceManager

__all__ = [
    "DIGEST_TAG",
    "OWNER_APPLY",
    "OWNER_CONFIG",
    "Action",
    "ActionKind",
    "ConfigReconciler",
    "InstanceOps",
    "Outcome",
    "describe_change",
    "digest",
    "execute",
    "plan",
    "stamp",
]

_logger = logging.getLogger(__name__)

OWNER_APPLY = "gadgetpipe.apply"
"""Tag of instances created by ``gadgetpipe apply``."""
OWNER_CONFIG = "gadgetpipe.config"
"""Tag of instances created from the daemon's own config file."""
OWNERS = (OWNER_APPLY, OWNER_CONFIG)
DIGEST_TAG = "gadgetpipe.digest="
"""Prefix of the tag holding the digest of the declared request."""


def _user_tags(tags: Sequence[str]) -> list[str]:
    return [t for t in tags if not t.startswith(RESERVED_TAG_PREFIX)]


def digest(req: pb.CreateGadgetInstanceRequest) -> str:
    """16 hex digits over the request as declared (bookkeeping tags, state and timeCreated
    left out), stable across processes (deterministic protobuf serialization)."""
    c = pb.CreateGadgetInstanceRequest()
    c.CopyFrom(req)
    gi = c.gadgetInstance
    tags = _user_tags(gi.tags)
    del gi.tags[:]
    gi.tags.extend(tags)
    gi.ClearField("state")
    gi.timeCreated = 0
    return hashlib.sha256(c.SerializeToString(deterministic=True)).hexdigest()[:16]


def stamp(req: pb.CreateGadgetInstanceRequest, owner: str) -> pb.CreateGadgetInstanceRequest:
    """A copy of ``req`` with the owner and digest tags appended (what is sent to Create)."""
    if owner not in OWNERS:
        raise ValueError(f"owner must be one of {OWNERS}, got {owner!r}")
    out = pb.CreateGadgetInstanceRequest()
    out.CopyFrom(req)
    tags = _user_tags(out.gadgetInstance.tags)
    del out.gadgetInstance.tags[:]
    out.gadgetInstance.tags.extend([*tags, owner, DIGEST_TAG + digest(req)])
    return out


def owner_of(gi: pb.GadgetInstance) -> str | None:
    """Which owner created the instance (None: created some other way)."""
    return next((t for t in gi.tags if t in OWNERS), None)


def _digest_of(gi: pb.GadgetInstance) -> str | None:
    return next((t[len(DIGEST_TAG):] for t in gi.tags if t.startswith(DIGEST_TAG)), None)


class ActionKind(StrEnum):
    CREATE = "create"
    REPLACE = "replace"
    KEEP = "keep"
    REMOVE = "remove"
    CONFLICT = "conflict"
    """Declared by ``apply`` but owned by the daemon's config file: left alone."""


@dataclass(frozen=True)
class Action:
    """One step of a plan.

    Args:
        kind: what to do.
        name: the instance name.
        desired: the stamped request to create (create, replace, keep).
        existing: the daemon's instance (replace, keep, remove).
        reason: why (replace: what changed; remove: pruned).
    """

    kind: ActionKind
    name: str
    desired: pb.CreateGadgetInstanceRequest | None = None
    existing: pb.GadgetInstance | None = None
    reason: str = ""

    @property
    def image(self) -> str:
        if self.desired is not None:
            return str(self.desired.gadgetInstance.gadgetConfig.imageName)
        return str(self.existing.gadgetConfig.imageName) if self.existing is not None else ""

    def __str__(self) -> str:
        text = f"{self.kind.value:<8} {self.name} ({self.image})"
        if self.existing is not None and self.kind is not ActionKind.CREATE:
            text += f" id {self.existing.id[:12]}"
        return f"{text}: {self.reason}" if self.reason else text


def _shown(want: pb.GadgetRunRequest, have: pb.GadgetRunRequest) -> pb.GadgetRunRequest:
    """``want`` as the daemon shows it: values it lists as ``<redacted>`` (secrets, which it
    never sends) redacted too, so they compare equal; the digest tag covers their values."""
    out = pb.GadgetRunRequest()
    out.CopyFrom(want)
    for k, v in have.paramValues.items():
        if v == REDACTED and out.paramValues.get(k, ""):
            out.paramValues[k] = REDACTED
    return out


def _same(gi: pb.GadgetInstance, req: pb.CreateGadgetInstanceRequest) -> bool:
    want = req.gadgetInstance
    return (_digest_of(gi) == _digest_of(want) and owner_of(gi) == owner_of(want)
            and gi.gadgetConfig == _shown(want.gadgetConfig, gi.gadgetConfig)
            and list(gi.tags) == list(want.tags)
            and list(gi.nodes) == list(want.nodes) and (not want.id or gi.id == want.id))


def describe_change(gi: pb.GadgetInstance, req: pb.CreateGadgetInstanceRequest) -> str:
    """What differs between a running instance and a declared (stamped) request."""
    want = req.gadgetInstance
    have_cfg, want_cfg = gi.gadgetConfig, want.gadgetConfig
    out = []
    owner = owner_of(gi)
    if owner != owner_of(want):
        out.append(f"owned by {owner or 'no one (created by hand)'}, now by {owner_of(want)}")
    if have_cfg.imageName != want_cfg.imageName:
        out.append(f"gadget {have_cfg.imageName} -> {want_cfg.imageName}")
    a, b = dict(have_cfg.paramValues), dict(_shown(want_cfg, have_cfg).paramValues)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if changed:
        out.append("params changed: " + ", ".join(changed))
    if have_cfg.timeout != want_cfg.timeout:
        out.append(f"timeout {have_cfg.timeout / 1e9:g}s -> {want_cfg.timeout / 1e9:g}s")
    if (have_cfg.logLevel, have_cfg.version) != (want_cfg.logLevel, want_cfg.version):
        out.append("gadgetConfig changed")
    if _user_tags(gi.tags) != _user_tags(want.tags):
        out.append("tags changed")
    if list(gi.nodes) != list(want.nodes):
        out.append("nodes changed")
    if want.id and gi.id != want.id:
        out.append(f"id {gi.id} -> {want.id}")
    if not out:
        out.append("other settings changed (eventBufferLength)")
    return "; ".join(out)


def plan(desired: Sequence[pb.CreateGadgetInstanceRequest],
         existing: Sequence[pb.GadgetInstance], owner: str, prune: bool) -> list[Action]:
    """What brings the daemon's instances (``existing``, from List) in line with ``desired``.

    Args:
        desired: declared requests, unstamped (names unique; the loader guarantees it).
        existing: the daemon's instances.
        owner: :data:`OWNER_APPLY` or :data:`OWNER_CONFIG`.
        prune: also remove this owner's instances that are no longer declared.

    Returns:
        Removals first, then the declared instances in order (creates, replaces, keeps).
    """
    by_name: dict[str, pb.GadgetInstance] = {}
    for gi in existing:
        by_name.setdefault(gi.name, gi)
    actions: list[Action] = []
    declared = set()
    for req in desired:
        want = stamp(req, owner)
        name = want.gadgetInstance.name
        declared.add(name)
        have = by_name.get(name)
        if have is None:
            actions.append(Action(ActionKind.CREATE, name, want))
        elif _same(have, want):
            actions.append(Action(ActionKind.KEEP, name, want, have))
        elif owner == OWNER_APPLY and owner_of(have) == OWNER_CONFIG:
            # The daemon's file would take it back at its next reload: refuse, do not flap.
            actions.append(Action(ActionKind.CONFLICT, name, want, have,
                                  "declared by the daemon's own config file; change it there"))
        else:
            actions.append(Action(ActionKind.REPLACE, name, want, have,
                                  describe_change(have, want)))
    removals = []
    if prune:
        removals = [Action(ActionKind.REMOVE, gi.name, None, gi, "no longer declared")
                    for gi in existing if owner_of(gi) == owner and gi.name not in declared]
    return removals + actions


# ------------------------------------------------------------------------------------------
# executing a plan


class InstanceOps(Protocol):
    """Create and remove, as the gadget service offers them (local manager or gRPC)."""

    async def create(self, req: pb.CreateGadgetInstanceRequest) -> pb.GadgetInstance:
        """Creates; raises with the reason on failure."""
        ...

    async def remove(self, instance_id: str) -> None:
        """Removes; raises with the reason on failure."""
        ...


@dataclass(frozen=True)
class Outcome:
    """What became of one action."""

    action: Action
    ok: bool
    message: str = ""
    instance: pb.GadgetInstance | None = None

    def __str__(self) -> str:
        status = "ok" if self.ok else f"FAILED: {self.message}"
        if self.ok and self.message:
            status = f"ok ({self.message})"
        return f"{self.action} ... {status}"


def _restore_request(gi: pb.GadgetInstance) -> pb.CreateGadgetInstanceRequest:
    req = pb.CreateGadgetInstanceRequest()
    req.gadgetInstance.CopyFrom(gi)
    req.gadgetInstance.ClearField("state")
    return req


async def execute(actions: Sequence[Action], ops: InstanceOps,
                  on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Runs a plan: removals, then replaces and creates in declaration order; keeps are
    reported as done. One failure does not stop the others. A replace whose create fails
    after its remove re-creates the old instance (same id, name, config; its buffer and
    eventBufferLength are lost) and reports the failure."""
    outcomes: list[Outcome] = []

    def done(o: Outcome) -> None:
        outcomes.append(o)
        if on_outcome is not None:
            on_outcome(o)

    for a in actions:
        try:
            if a.kind is ActionKind.KEEP:
                done(Outcome(a, True, "unchanged", a.existing))
            elif a.kind is ActionKind.CONFLICT:
                done(Outcome(a, False, a.reason, a.existing))
            elif a.kind is ActionKind.REMOVE:
                assert a.existing is not None
                await ops.remove(a.existing.id)
                done(Outcome(a, True))
            elif a.kind is ActionKind.CREATE:
                assert a.desired is not None
                done(Outcome(a, True, "", await ops.create(a.desired)))
            else:
                assert a.desired is not None and a.existing is not None
                await ops.remove(a.existing.id)
                try:
                    created = await ops.create(a.desired)
                except Exception as e:
                    note = ""
                    try:
                        await ops.create(_restore_request(a.existing))
                        note = "; the previous instance was restored"
                    except Exception as e2:
                        note = f"; restoring the previous instance failed too: {_reason(e2)}"
                    done(Outcome(a, False, _reason(e) + note))
                    continue
                done(Outcome(a, True, "", created))
        except Exception as e:
            done(Outcome(a, False, _reason(e)))
    return outcomes


def _reason(e: BaseException) -> str:
    details = getattr(e, "details", None)
    if callable(details):  # grpc.RpcError
        with contextlib.suppress(Exception):
            return f"{details()} ({e.code().name})"  # type: ignore[attr-defined]
    message = getattr(e, "message", None)  # grpclib.GRPCError
    if isinstance(message, str) and message:
        return message
    return str(e) or type(e).__name__


class LocalOps:
    """:class:`InstanceOps` on the daemon's own instance manager: the same ``create`` and
    ``remove`` the GadgetInstanceManager servicer calls for a remote client."""

    def __init__(self, manager: InstanceManager) -> None:
        self._m = manager

    async def list(self) -> list[pb.GadgetInstance]:
        return self._m.list()

    async def create(self, req: pb.CreateGadgetInstanceRequest) -> pb.GadgetInstance:
        resp = await self._m.create(req)
        return resp.gadgetInstance

    async def remove(self, instance_id: str) -> None:
        resp = await self._m.remove(instance_id)
        if resp.result != 0:
            raise RuntimeError(resp.message or f"removing {instance_id} failed")


# ------------------------------------------------------------------------------------------
# the daemon's own config


@dataclass
class ConfigReconciler:
    """Keeps a daemon's instances in line with its config file.

    :meth:`start` creates (or replaces) the declared instances once the instance manager has
    restored the persisted ones, and removes instances of :data:`OWNER_CONFIG` that the file no
    longer declares. :meth:`request_reload` (the SIGHUP handler) re-reads the file in a thread
    and does the same; an invalid file is logged with its issues and changes nothing.
    Instances that did not change are not touched, so their BPF programs, buffers and seqs go
    on. ``daemon:`` settings are not reloaded; a change is logged as needing a restart.

    Args:
        manager: the daemon's instance manager.
        config: the config the daemon started with.
        load: re-reads the config (raises ConfigError).
    """

    manager: InstanceManager
    config: LoadedConfig
    load: Callable[[], LoadedConfig]
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _pending: bool = field(default=False, init=False)
    reloads: int = field(default=0, init=False)
    """Completed reloads (successful or not); tests wait on it."""

    @classmethod
    def for_daemon(cls, daemon: Any) -> ConfigReconciler | None:
        """The reconciler of a started :class:`api.daemon.Daemon` whose settings carry a
        config (None without one)."""
        loaded: LoadedConfig | None = daemon.settings.config
        if loaded is None or daemon.instances is None:
            return None
        loader = ConfigLoader(daemon.catalog, daemon.sinks, reachability=Reachability.WARN,
                              known_nodes={daemon.ctx.node, *daemon.settings.nodes})
        sources = list(loaded.sources)
        return cls(daemon.instances, loaded, lambda: loader.load(sources))

    async def start(self) -> None:
        """Creates the declared instances (errors are logged per instance)."""
        await self._reconcile(self.config)

    def request_reload(self) -> None:
        """Schedules a reload. Requests made while one runs are served by one more reload
        after it (the file may have changed again meanwhile); requests made before a reload
        starts are served by it."""
        self._pending = True
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._reload_loop(), name="config-reload")

    async def _reload_loop(self) -> None:
        while self._pending:
            self._pending = False
            await self.reload()

    async def reload(self) -> list[Outcome] | None:
        """Re-reads the config and reconciles; None if the file is invalid (nothing done)."""
        try:
            try:
                new = await asyncio.to_thread(self.load)
            except ConfigError as e:
                _logger.error("config reload: %s is invalid, nothing changed:\n%s",
                              ", ".join(self.config.sources), e)
                return None
            except Exception as e:  # unreadable file etc.; keep running as is
                _logger.error("config reload failed, nothing changed: %s", e)
                return None
            _log_warnings(new)
            if new.daemon != self.config.daemon:
                _logger.warning("config reload: the daemon section changed; it takes effect "
                                "at the next start (instances are reloaded now)")
            outcomes = await self._reconcile(new)
            self.config = new
            return outcomes
        finally:
            self.reloads += 1

    async def _reconcile(self, config: LoadedConfig) -> list[Outcome]:
        ops = LocalOps(self.manager)
        actions = plan(config.requests(), await ops.list(), OWNER_CONFIG, prune=True)

        def log(o: Outcome) -> None:
            if o.action.kind is ActionKind.KEEP:
                _logger.debug("config: %s", o)
            elif o.ok:
                _logger.info("config: %s", o)
            else:
                _logger.error("config: %s", o)

        return await execute(actions, ops, log)

    async def stop(self) -> None:
        """Cancels a reload in progress."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def _log_warnings(config: LoadedConfig) -> None:
    for w in config.warnings:
        _logger.warning("config: %s", w)
