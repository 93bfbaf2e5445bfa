"""Running a tracer gadget against a trigger until the wanted records arrive, for the per-gadget
end-to-end tests (tests/e2e/test_gadget_*.py).

The trigger starts once the gadget says it traces (its ready event, api/ready.py) and repeats
in a thread until the wanted records arrive (a gadget may need several); every record is
decoded from the announced field table with the spec decoder (tests/specdecode.py), as
tests/e2e/test_trace_exec.py does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pipeline._gen import gadget_service_pb2 as pb
from tests.daemon import DaemonProcess
from tests.specdecode import field_value

READY_TIMEOUT = 120.0
"""Seconds a run may take to compile and attach (a busy machine compiles slowly)."""

Record = dict[str, Any]
"""One record: full field name -> decoded value (docs/gadget-service.md §4.3)."""


@contextmanager
def repeating(trigger: Callable[[], None], interval: float = 0.2) -> Iterator[None]:
    """Calls ``trigger`` every ``interval`` in a thread until the block ends; an exception in
    the trigger fails the block (a trigger that cannot run is a failure, never a skip)."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        while not stop.is_set():
            try:
                trigger()
            except BaseException as e:  # handed to the test thread below
                errors.append(e)
                return
            stop.wait(interval)

    t = threading.Thread(target=loop, name="trigger", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(10)
    if errors:
        raise AssertionError(f"trigger failed: {errors[0]!r}") from errors[0]


def decode(info: pb.GadgetInfo, ds_id: int, element: pb.DataElement) -> Record:
    ds = next(d for d in info.dataSources if d.id == ds_id)
    return {f.fullName: field_value(f, element) for f in ds.fields if not f.flags & 1}


def collect(daemon: DaemonProcess, gadget: str, params: dict[str, str],
            trigger: Callable[[], None], done: Callable[[list[Record]], bool],
            timeout: float = 15.0) -> tuple[pb.GadgetInfo, list[Record]]:
    """Runs ``gadget`` while ``trigger`` repeats, until ``done(records)`` or ``timeout``;
    returns the GadgetInfo and every record received (``done`` decides what suffices)."""
    records: list[Record] = []
    info: pb.GadgetInfo | None = None
    with daemon.client() as c:
        # The server-side timeout (counted from the ready moment) ends the stream even if
        # nothing ever arrives.
        stream = c.run(gadget, params, timeout_s=timeout)
        stream.wait_ready(timeout=READY_TIMEOUT)  # the trigger starts once the gadget traces
        info = stream.info
        deadline = time.monotonic() + timeout
        with repeating(trigger):
            for ev in stream.raw():
                if ev.type == 4:
                    info = pb.GadgetInfo.FromString(ev.payload)
                elif ev.type == 0:
                    assert info is not None, "payload before GadgetInfo"
                    types = {d.id: d.type for d in info.dataSources}
                    if types[ev.dataSourceID] == 2:
                        els = list(pb.GadgetDataArray.FromString(ev.payload).dataArray)
                    else:
                        els = [pb.GadgetData.FromString(ev.payload).data]
                    records.extend(decode(info, ev.dataSourceID, el) for el in els)
                    if done(records):
                        break
                elif ev.type == 2:
                    raise AssertionError("a type-2 'done' event must never be sent")
                if time.monotonic() > deadline:
                    break
        stream.stop()
        for _ in stream.raw():  # the server ends the stream with OK after a stop
            pass
    assert info is not None, "no GadgetInfo event"
    return info, records


def ipv4(record: Record, endpoint: str) -> str:
    """The dotted IPv4 address of an L4/L3 endpoint field (``src``, ``dst``, ...)."""
    return ".".join(str(b) for b in record[f"{endpoint}.addr_raw.v6"][:4])


def ipv6(record: Record, endpoint: str) -> bytes:
    return bytes(record[f"{endpoint}.addr_raw.v6"])
