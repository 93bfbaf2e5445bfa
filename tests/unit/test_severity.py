"""Log severities are upstream's numbers (docs/gadget-service.md §2.2) under names."""

from __future__ import annotations

import logging

from pipeline import wire
from pipeline._gen import gadget_service_pb2 as pb
from pipeline.severity import Severity


def test_the_numbers_are_upstreams() -> None:
    assert [(s.name, int(s)) for s in Severity] == [
        ("PANIC", 0), ("FATAL", 1), ("ERROR", 2), ("WARN", 3), ("INFO", 4), ("DEBUG", 5),
        ("TRACE", 6)]


def test_numbers_off_the_wire_read_as_a_severity() -> None:
    assert Severity.of(3) is Severity.WARN
    assert Severity.of(9) is Severity.TRACE  # past the last: the least severe
    assert Severity.of(-1) is Severity.PANIC
    assert Severity.of(4).text == "info"


def test_python_levels() -> None:
    assert [Severity(n).python_level for n in range(7)] == [
        logging.CRITICAL, logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO,
        logging.DEBUG, logging.DEBUG]


def test_a_log_event_carries_the_severity_in_its_type() -> None:
    event = pb.GadgetEvent.FromString(wire.log_event(Severity.WARN, "careful")[5:])
    assert (event.type, event.payload) == (3 << 16, b"careful")
