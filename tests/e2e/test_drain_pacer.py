"""trace_open's real ring under the drain pacer: a trickle of records waits in the ring until it
makes a batch worth draining (or until drain-max-wait), instead of one batch per timed tick."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import pytest

from pipeline.batch import Batch
from pipeline.gadget import EBPF_PREFIX, RUNTIME_PREFIX
from pipeline.params import resolve
from pipeline.sources.catalog import Catalog
from pipeline.sources.ringbuf import record_stride
from pipeline.sources.tracer import TracerSource

pytestmark = pytest.mark.bpf

OPENER = ("import sys\n"
          "print('ready', flush=True)\n"
          "for line in sys.stdin:\n"
          "    open('/etc/hostname').close()\n"
          "    print('ok', flush=True)\n")
"""A child that opens one file per line it reads, and says when it has."""


class Opener:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-S", "-c", OPENER], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        # Its start-up opens are over before the tracer attaches.
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"

    def open_once(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "ok\n"

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


async def until(pred: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Polls ``pred`` on the event loop (the drain task runs meanwhile)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


@asynccontextmanager
async def traced(opener: Opener, **runtime: str) -> AsyncIterator[tuple[TracerSource,
                                                                        list[Batch]]]:
    spec = Catalog().resolve("trace_open")
    values = resolve(spec.params,
                     {EBPF_PREFIX + "pid": str(opener.proc.pid),
                      **{RUNTIME_PREFIX + k: v for k, v in runtime.items()}},
                     (EBPF_PREFIX, RUNTIME_PREFIX))
    source = spec.source_factory()(spec, values)
    assert isinstance(source, TracerSource)
    batches: list[Batch] = []

    async def emit(batch: Batch) -> None:
        batches.append(batch)

    await source.start(emit, lambda severity, message: None)
    try:
        yield source, batches
    finally:
        await source.stop()


@pytest.fixture
def opener() -> Iterator[Opener]:
    o = Opener()
    yield o
    o.close()


async def test_records_below_min_bytes_wait_and_drain_as_one_batch(opener: Opener) -> None:
    stride = record_stride(Catalog().resolve("trace_open").datasources[0].record_size)
    async with traced(opener, **{"drain-interval": "5ms", "drain-min-bytes": str(3 * stride),
                                 "drain-max-wait": "1h"}) as (source, batches):
        pacer = source._pacer
        for n in (1, 2):
            held = pacer.deferred
            await asyncio.to_thread(opener.open_once)
            # Two ticks that saw the backlog and let it wait: both after the open.
            await until(lambda held=held: pacer.deferred >= held + 2,  # type: ignore[misc]
                        f"ticks holding {n} record(s)")
            assert batches == [], f"{n} record(s) drained below drain-min-bytes"
        await asyncio.to_thread(opener.open_once)
        await until(lambda: bool(batches), "the batch of three records")
        assert [len(b) for b in batches] == [3]


@pytest.mark.parametrize("max_wait", ["100ms", "0s"])
async def test_a_lone_record_drains_by_max_wait(opener: Opener, max_wait: str) -> None:
    async with traced(opener, **{"drain-interval": "5ms",
                                 "drain-max-wait": max_wait}) as (source, batches):
        await asyncio.to_thread(opener.open_once)
        await until(lambda: bool(batches), "the record")
        assert [len(b) for b in batches] == [1]
        # With a wait, ticks held it first; without, none did.
        if max_wait == "0s":
            assert source._pacer.deferred == 0
        else:
            assert source._pacer.deferred >= 1
