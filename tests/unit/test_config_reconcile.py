"""Reconciling declared instances: plans, their execution, and the daemon's config reloads
(against a fake instance manager: no eBPF here)."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import pytest

from api.reconcile import (
    DIGEST_TAG,
    OWNER_APPLY,
    OWNER_CONFIG,
    ActionKind,
    ConfigReconciler,
    describe_change,
    digest,
    execute,
    plan,
    stamp,
)
from config.loader import ConfigLoader
from pipeline._gen import gadget_service_pb2 as pb


def req(name: str, params: dict[str, str] | None = None, buffer: int = 0,
        tags: tuple[str, ...] = ()) -> pb.CreateGadgetInstanceRequest:
    return pb.CreateGadgetInstanceRequest(
        gadgetInstance=pb.GadgetInstance(
            name=name, tags=list(tags),
            gadgetConfig=pb.GadgetRunRequest(imageName="trace_exec", paramValues=params or {},
                                             version=1)),
        eventBufferLength=buffer)


def running(r: pb.CreateGadgetInstanceRequest) -> pb.GadgetInstance:
    """What List shows for an instance created from ``r``."""
    gi = pb.GadgetInstance()
    gi.CopyFrom(r.gadgetInstance)
    gi.id = gi.id or secrets.token_hex(16)
    gi.timeCreated = 1700000000
    gi.state.status = pb.StatusRunning
    return gi


def kinds(actions: list[Any]) -> list[tuple[str, str]]:
    return [(a.kind.value, a.name) for a in actions]


def test_stamp_and_digest() -> None:
    r = req("a", {"k": "v"}, tags=("x",))
    s = stamp(r, OWNER_APPLY)
    assert list(s.gadgetInstance.tags) == ["x", OWNER_APPLY, DIGEST_TAG + digest(r)]
    assert digest(s) == digest(r)  # bookkeeping tags are not part of the digest
    assert digest(req("a", {"k": "v"}, buffer=5, tags=("x",))) != digest(r)
    assert stamp(stamp(r, OWNER_CONFIG), OWNER_APPLY) == s
    with pytest.raises(ValueError):
        stamp(r, "someone")


def test_plan() -> None:
    declared = [req("same"), req("params", {"operator.oci.ebpf.comm": "b"}),
                req("buffer", buffer=64), req("new")]
    existing = [
        running(stamp(req("same"), OWNER_APPLY)),
        running(stamp(req("params", {"operator.oci.ebpf.comm": "a"}), OWNER_APPLY)),
        running(stamp(req("buffer"), OWNER_APPLY)),
        running(stamp(req("gone"), OWNER_APPLY)),
        running(stamp(req("theirs"), OWNER_CONFIG)),
        running(req("by-hand")),
    ]
    actions = plan(declared, existing, OWNER_APPLY, prune=True)
    assert kinds(actions) == [("remove", "gone"), ("keep", "same"), ("replace", "params"),
                              ("replace", "buffer"), ("create", "new")]
    assert actions[2].reason == "params changed: operator.oci.ebpf.comm"
    assert actions[3].reason == "other settings changed (eventBufferLength)"
    assert str(actions[1]) == f"keep     same (trace_exec) id {existing[0].id[:12]}"
    assert kinds(plan(declared, existing, OWNER_APPLY, prune=False))[0] == ("keep", "same")
    # The daemon's own config prunes only its own instances.
    assert kinds(plan([], existing, OWNER_CONFIG, prune=True)) == [("remove", "theirs")]


def test_plan_takes_over_by_hand_but_not_the_daemon_config() -> None:
    existing = [running(req("by-hand")), running(stamp(req("theirs"), OWNER_CONFIG))]
    actions = plan([req("by-hand"), req("theirs")], existing, OWNER_APPLY, prune=True)
    assert kinds(actions) == [("replace", "by-hand"), ("conflict", "theirs")]
    assert actions[0].reason == ("owned by no one (created by hand), now by gadgetpipe.apply")
    # The daemon's config does take over what apply created.
    existing = [running(stamp(req("x"), OWNER_APPLY))]
    assert kinds(plan([req("x")], existing, OWNER_CONFIG, prune=True)) == [("replace", "x")]


def test_describe_change() -> None:
    have = running(stamp(req("a", {"p": "1", "q": "1"}), OWNER_APPLY))
    want = stamp(req("a", {"p": "2", "r": "1"}, tags=("t",)), OWNER_APPLY)
    want.gadgetInstance.gadgetConfig.imageName = "trace_open"
    want.gadgetInstance.gadgetConfig.timeout = 5 * 10**9
    assert describe_change(have, want) == ("gadget trace_exec -> trace_open; params changed: "
                                           "p, q, r; timeout 0s -> 5s; tags changed")


class FakeOps:
    """An instance manager's create/remove/list with injectable failures."""

    def __init__(self) -> None:
        self.instances: dict[str, pb.GadgetInstance] = {}
        self.calls: list[str] = []
        self.fail_create: set[str] = set()

    async def list(self) -> list[pb.GadgetInstance]:
        return list(self.instances.values())

    async def create(self, r: pb.CreateGadgetInstanceRequest) -> pb.GadgetInstance:
        name = r.gadgetInstance.name
        self.calls.append(f"create {name}")
        if name in self.fail_create:
            self.fail_create.discard(name)
            raise RuntimeError(f"cannot create {name}")
        if any(gi.name == name for gi in self.instances.values()):
            raise RuntimeError(f'gadget with name "{name}" already exists')
        gi = running(r)
        self.instances[gi.id] = gi
        return gi

    async def remove(self, instance_id: str) -> None:
        gi = self.instances.pop(instance_id)
        self.calls.append(f"remove {gi.name}")


async def test_execute() -> None:
    ops = FakeOps()
    for name in ("keep", "change", "gone"):
        await ops.create(stamp(req(name), OWNER_APPLY))
    ops.calls.clear()
    actions = plan([req("keep"), req("change", {"a": "1"}), req("broken"), req("new")],
                   await ops.list(), OWNER_APPLY, prune=True)
    ops.fail_create.add("broken")
    seen: list[str] = []
    outcomes = await execute(actions, ops, lambda o: seen.append(o.action.name))
    assert ops.calls == ["remove gone", "remove change", "create change", "create broken",
                         "create new"]
    assert seen == ["gone", "keep", "change", "broken", "new"]
    assert [o.ok for o in outcomes] == [True, True, True, False, True]
    assert outcomes[3].message == "cannot create broken"
    assert sorted(gi.name for gi in ops.instances.values()) == ["change", "keep", "new"]


async def test_failed_replace_restores_the_old_instance() -> None:
    ops = FakeOps()
    old = await ops.create(stamp(req("x"), OWNER_APPLY))
    ops.fail_create.add("x")
    [outcome] = await execute(plan([req("x", {"a": "1"})], await ops.list(), OWNER_APPLY,
                                   prune=False), ops)
    assert not outcome.ok
    assert outcome.message == "cannot create x; the previous instance was restored"
    [back] = ops.instances.values()
    assert (back.id, back.gadgetConfig) == (old.id, old.gadgetConfig)


class FakeManager:
    """The three InstanceManager methods LocalOps uses."""

    def __init__(self) -> None:
        self.ops = FakeOps()

    def list(self) -> list[pb.GadgetInstance]:
        return list(self.ops.instances.values())

    async def create(self, r: pb.CreateGadgetInstanceRequest) -> pb.CreateGadgetInstanceResponse:
        return pb.CreateGadgetInstanceResponse(gadgetInstance=await self.ops.create(r))

    async def remove(self, instance_id: str) -> pb.StatusResponse:
        await self.ops.remove(instance_id)
        return pb.StatusResponse(result=0)


async def test_config_reconciler_reload(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("instances:\n  - {name: a, gadget: trace_exec}\n"
                 "  - {name: b, gadget: trace_exec}\n")
    loader = ConfigLoader()
    manager = FakeManager()
    by_hand = await manager.ops.create(req("by-hand"))
    r = ConfigReconciler(manager, loader.load([f]), lambda: loader.load([f]))  # type: ignore[arg-type]
    await r.start()
    ids = {gi.name: gi.id for gi in manager.list()}
    assert set(ids) == {"a", "b", "by-hand"}

    # b changes, a goes, c comes; by-hand is not the config's to prune.
    f.write_text("instances:\n  - {name: b, gadget: trace_exec, filter: proc.pid>1}\n"
                 "  - {name: c, gadget: trace_exec}\n")
    r.request_reload()
    r.request_reload()  # coalesced with the one running
    while r.reloads < 1:
        await asyncio.sleep(0.01)
    await r.stop()
    now = {gi.name: gi.id for gi in manager.list()}
    assert set(now) == {"b", "c", "by-hand"}
    assert now["b"] != ids["b"] and now["by-hand"] == by_hand.id

    # An invalid file changes nothing; the next good one applies.
    before = dict(now)
    f.write_text("instances:\n  - {name: b, gadget: trace_exek}\n")
    assert await r.reload() is None
    assert {gi.name: gi.id for gi in manager.list()} == before
    f.write_text("instances:\n  - {name: b, gadget: trace_exec, filter: proc.pid>1}\n"
                 "  - {name: c, gadget: trace_exec}\n")
    outcomes = await r.reload()
    assert outcomes is not None and [o.action.kind for o in outcomes] == [ActionKind.KEEP] * 2
    assert {gi.name: gi.id for gi in manager.list()} == before
