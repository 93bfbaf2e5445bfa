"""The ready signal: a run tells its client when its programs are attached and records flow.

Upstream's protocol has no such event (its GadgetInfo goes out before the eBPF programs load,
docs/gadget-service.md §3.1 steps 6-7), so gadgetpipe sends an info log event (severity 4, §2.2
there) whose text starts with :data:`READY_PREFIX` at that moment, before the run's first record.
Upstream clients log it (gadgetctl: one ``INFO`` line on stderr at its default level, nothing with
``-o json`` on stdout, which carries only records) and go on; clients that send a ``logLevel`` below
4 do not get it. Attach streams get it after the GadgetInfo once the instance traces (at once for a
tracing instance, later for one that is still starting).
"""

from __future__ import annotations

from pipeline.severity import Severity

__all__ = ["READY_PREFIX", "READY_SEVERITY", "is_ready", "ready_message"]

READY_SEVERITY = Severity.INFO
READY_PREFIX = "gadget tracing"
"""How a ready log event's text starts."""


def ready_message(attach_seconds: float | None = None) -> str:
    """The ready event's text, with how long the programs took to compile and attach."""
    if attach_seconds is None:
        return f"{READY_PREFIX}: programs attached, records flow from here"
    return (f"{READY_PREFIX}: programs attached in {attach_seconds:.2f} s, records flow "
            "from here")


def is_ready(severity: int, message: str) -> bool:
    """Whether a log event is the ready signal."""
    return severity == READY_SEVERITY and message.startswith(READY_PREFIX)
