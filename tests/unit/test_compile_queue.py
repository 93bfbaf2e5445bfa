"""The compile queue (api/compile_queue.py): turns in arrival order, runs whose client left
dropped before their turn, bounds per client and in all; and the ledger's fold policy."""

from __future__ import annotations

import asyncio

import pytest

from api.compile_queue import CompileQueue, CompileQueueFull
from pipeline.ledger import DROPPED, PRODUCED, Ledger, LedgerFolds


async def test_turns_come_in_arrival_order_one_at_a_time() -> None:
    q = CompileQueue()
    order: list[str] = []
    release = asyncio.Event()

    async def run(name: str) -> None:
        async with q.reserve("c", name).turn():
            order.append(name)
            await release.wait()

    tasks = [asyncio.create_task(run(n)) for n in "abc"]
    await asyncio.sleep(0)
    assert order == ["a"] and q.waiting == 2 and q.busy
    release.set()
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c"]
    assert q.outcomes["compiled"] == 3 and not q.busy and q.waiting == 0


async def test_a_run_whose_client_left_never_gets_its_turn() -> None:
    q = CompileQueue(max_waiting=100, max_waiting_per_client=100)
    got: list[str] = []
    hold = asyncio.Event()

    async def run(name: str) -> None:
        async with q.reserve("c", name).turn():
            got.append(name)
            await hold.wait()

    first = asyncio.create_task(run("first"))
    gone = [asyncio.create_task(run(f"gone{i}")) for i in range(50)]
    await asyncio.sleep(0)
    for t in gone:
        t.cancel()
    last = asyncio.create_task(run("last"))
    await asyncio.sleep(0)
    hold.set()
    await asyncio.gather(first, last, *gone, return_exceptions=True)
    assert got == ["first", "last"]  # next after the one compiling: nothing in between
    assert q.outcomes == {"compiled": 2, "abandoned": 50, "refused": 0}


async def test_the_holder_leaving_hands_the_turn_on() -> None:
    q = CompileQueue()
    got: list[str] = []

    async def run(name: str, wait: asyncio.Event) -> None:
        async with q.reserve(None, name).turn():
            got.append(name)
            await wait.wait()

    never = asyncio.Event()
    done = asyncio.Event()
    done.set()
    holder = asyncio.create_task(run("holder", never))
    nxt = asyncio.create_task(run("next", done))
    await asyncio.sleep(0)
    holder.cancel()
    await asyncio.gather(holder, nxt, return_exceptions=True)
    assert got == ["holder", "next"]


def test_bounds_per_client_and_in_all_refuse_with_the_bound_named() -> None:
    q = CompileQueue(max_waiting=3, max_waiting_per_client=2)
    a = [q.reserve("pid:1", "a1"), q.reserve("pid:1", "a2")]
    with pytest.raises(CompileQueueFull, match=r"this client has 2 runs waiting .* 2 per client"):
        q.reserve("pid:1", "a3")
    q.reserve("pid:2", "b1")
    with pytest.raises(CompileQueueFull, match=r"3 runs are waiting .* 3 in all"):
        q.reserve("pid:3", "c1")
    # Instances are never refused, and do not count against the clients' bounds.
    for i in range(10):
        q.reserve(None, f"instance{i}")
    assert q.outcomes["refused"] == 2
    a[0].release()  # a client left: its place is free again
    q.reserve("pid:1", "a3")
    assert q.outcomes["abandoned"] == 1


async def test_ledger_rows_fold_after_the_delay_unless_the_label_lives_again() -> None:
    ledger = Ledger()
    folds = LedgerFolds(ledger, 0.01)
    ledger.declare_drops("run-1", "grpc:x", ["queue_full"])
    ledger.dropped("run-1", "grpc:x", 5, "queue_full")
    ledger.declare("instance:a", "kernel", DROPPED, "ringbuf_full")
    assert ledger.get("run-1", "grpc:x", PRODUCED) == 0  # declared, not counted
    assert ("instance:a", "kernel", DROPPED, "ringbuf_full") in dict(ledger.items())
    folds.later("run-1", "direct-runs")
    folds.later("instance:a", "removed-instances")
    folds.keep("instance:a")  # re-created under its name before the fold
    await asyncio.sleep(0.05)
    assert ledger.get("direct-runs", "grpc:x", DROPPED, "queue_full") == 5
    assert not [k for k, _ in ledger.items() if k.instance == "run-1"]
    assert [k for k, _ in ledger.items() if k.instance == "instance:a"]
    assert folds.pending() == []
