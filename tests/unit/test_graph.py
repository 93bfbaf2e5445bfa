"""Edges: bounds, overflow policies, positions for seq gaps, and the ledger adding up."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pipeline.batch import Batch
from pipeline.graph import Edge, EdgeClosed, Fanout, Overflow
from pipeline.ledger import Ledger
from pipeline.schema import DataSourceSchema, DataSourceType

DS = DataSourceSchema("t", DataSourceType.SINGLE, (), 4)


def batch(*values: int) -> Batch:
    rows = np.array(values, dtype="<u4").view(np.uint8).reshape(-1, 4)
    return Batch(DS, rows)


def ids(b: Batch) -> list[int]:
    return b.rows.view("<u4").reshape(-1).tolist()


def balance(ledger: Ledger, edge: Edge) -> None:
    produced = ledger.get("i", edge.name, "produced")
    delivered = ledger.get("i", edge.name, "delivered")
    dropped = ledger.get("i", edge.name, "dropped")
    assert produced == delivered + dropped + edge.depth


async def test_drop_newest_keeps_old_records_and_positions_show_the_gap() -> None:
    ledger = Ledger()
    e = Edge("e", 4, Overflow.DROP_NEWEST, ledger, "i")
    e.put_nowait(batch(1, 2, 3))
    e.put_nowait(batch(4, 5))  # does not fit: dropped
    e.put_nowait(batch(6))
    pos1, b1 = await e.get()
    pos2, b2 = await e.get()
    assert (pos1, ids(b1)) == (0, [1, 2, 3])
    assert (pos2, ids(b2)) == (5, [6])  # positions 3 and 4 were dropped
    e.delivered(4)
    assert ledger.get("i", "e", "dropped", "queue_full") == 2
    balance(ledger, e)


async def test_drop_oldest_evicts_queued_batches() -> None:
    ledger = Ledger()
    e = Edge("e", 3, Overflow.DROP_OLDEST, ledger, "i")
    e.put_nowait(batch(1, 2))
    e.put_nowait(batch(3))
    e.put_nowait(batch(4, 5))
    got = []
    while (item := e.get_nowait()) is not None:
        got.append((item[0], ids(item[1])))
    assert got == [(2, [3]), (3, [4, 5])]
    assert ledger.get("i", "e", "dropped") == 2
    e.delivered(3)
    balance(ledger, e)


async def test_block_waits_for_room_and_loses_nothing() -> None:
    ledger = Ledger()
    e = Edge("e", 2, Overflow.BLOCK, ledger, "i")
    received: list[int] = []

    async def consumer() -> None:
        while True:
            try:
                _, b = await e.get()
            except EdgeClosed:
                return
            await asyncio.sleep(0.001)
            received.extend(ids(b))
            e.delivered(len(b))

    task = asyncio.create_task(consumer())
    for i in range(50):
        await e.put(batch(i))
        assert e.depth <= 2
    e.close()
    await task
    assert received == list(range(50))
    assert ledger.get("i", "e", "dropped") == 0
    balance(ledger, e)


async def test_oversized_batch_enters_an_empty_queue() -> None:
    e = Edge("e", 2, Overflow.DROP_NEWEST, Ledger(), "i")
    e.put_nowait(batch(1, 2, 3, 4, 5))
    assert e.depth == 5


async def test_slow_subscriber_does_not_stall_a_fast_one() -> None:
    ledger = Ledger()
    fan = Fanout()
    slow = fan.subscribe(Edge("slow", 3, Overflow.DROP_NEWEST, ledger, "i"))
    fast = fan.subscribe(Edge("fast", 1000, Overflow.DROP_NEWEST, ledger, "i"))
    for i in range(100):
        await fan.publish(batch(i))
    assert fast.depth == 100
    assert slow.depth == 3
    assert ledger.get("i", "slow", "dropped") == 97


async def test_closed_edge_drains_then_raises() -> None:
    e = Edge("e", 10, Overflow.BLOCK, Ledger(), "i")
    e.put_nowait(batch(1))
    e.close()
    assert ids((await e.get())[1]) == [1]
    with pytest.raises(EdgeClosed):
        await e.get()


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        Edge("e", 0, Overflow.BLOCK, Ledger(), "i")


def test_retiring_an_instance_keeps_totals() -> None:
    ledger = Ledger()
    ledger.dropped("run-1", "grpc:x", 3, "queue_full")
    ledger.dropped("direct-runs", "grpc:x", 2, "queue_full")
    ledger.retire("run-1", "direct-runs")
    assert ledger.get("direct-runs", "grpc:x", "dropped", "queue_full") == 5
    assert ledger.get("run-1", "grpc:x", "dropped") == 0
