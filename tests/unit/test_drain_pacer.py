"""The drain pacer: a small backlog waits, bounded; a large one, or none, decides at once."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.gadget import DRAIN_MIN_BYTES, RUNTIME_PREFIX
from pipeline.sources.drain_pacer import DrainPacer


@dataclass
class Ring:
    pending_bytes: int = 0


def test_an_empty_ring_never_drains_and_forgets_a_held_backlog() -> None:
    p = DrainPacer(0.01, 1000, 0.05)
    ring = Ring(10)
    assert not p.due([ring], 0.0)
    ring.pending_bytes = 0  # drained by a wake-up meanwhile
    assert not p.due([ring], 0.01)
    ring.pending_bytes = 10
    # The wait starts again from the tick that sees the new backlog, not the old one.
    assert not p.due([ring], 0.03)
    assert not p.due([ring], 0.06)
    assert p.due([ring], 0.07)


def test_a_small_backlog_waits_until_its_oldest_record_would_pass_max_wait() -> None:
    p = DrainPacer(0.01, 1000, 0.05)
    ring = Ring(100)
    ticks = iter(t / 100 for t in range(10))
    held = []
    while not p.due([ring], t := next(ticks)):
        held.append(t)
    # First seen at 0.00 (arrived after -0.01): due when 0.01 + elapsed >= 0.05.
    assert held == [0.0, 0.01, 0.02, 0.03]
    assert t == 0.04
    assert p.deferred == 4


def test_a_large_backlog_over_all_rings_drains_at_once() -> None:
    p = DrainPacer(0.01, 1000, 10.0)
    assert not p.due([Ring(400), Ring(500)], 0.0)
    assert p.due([Ring(400), Ring(600)], 0.01)
    assert p.deferred == 1


def test_max_wait_within_one_tick_drains_every_tick_with_data() -> None:
    p = DrainPacer(0.01, 1000, 0.01)
    assert all(p.due([Ring(8)], t / 100) for t in range(5))
    assert p.deferred == 0


def test_a_wake_up_drain_restarts_the_wait() -> None:
    p = DrainPacer(0.01, 1000, 0.05)
    ring = Ring(8)
    assert not p.due([ring], 0.0)
    p.woken()
    assert p.due([ring], 0.01)  # the kernel's wake-up drains whatever is pending
    assert not p.due([ring], 0.04)  # a new backlog: its wait starts at 0.04
    assert p.due([ring], 0.08)


def test_the_runs_params_set_it_and_defaults_apply_without_them() -> None:
    p = DrainPacer.from_values(0.01, {RUNTIME_PREFIX + "drain-min-bytes": 16,
                                      RUNTIME_PREFIX + "drain-max-wait": 2.0})
    assert not p.due([Ring(15)], 0.0)
    assert p.due([Ring(16)], 0.0)
    assert not p.due([Ring(8)], 1.0)
    assert p.due([Ring(8)], 2.99)
    d = DrainPacer.from_values(0.01, {})
    assert not d.due([Ring(DRAIN_MIN_BYTES - 1)], 0.0)
    assert d.due([Ring(DRAIN_MIN_BYTES)], 0.0)
