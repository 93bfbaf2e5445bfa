"""trace_signal runs on the generic ring-buffer tracer; this turns the ``signal`` param (a name
or a number, as upstream accepts it) into the number the BPF program compares with."""

from __future__ import annotations

import signal
from collections.abc import Mapping
from typing import Any

from pipeline.gadget import EBPF_PREFIX, GadgetSpec
from pipeline.sources.base import SourceError
from pipeline.sources.tracer import TracerSource

SIGNAL_PARAM = EBPF_PREFIX + "signal"


def parse_signal(text: str) -> int:
    """``"9"``, ``"SIGKILL"``, ``"kill"`` -> 9; raises SourceError for anything else."""
    name = text.strip().upper()
    if name.isdigit():
        number = int(name)
        if 1 <= number <= signal.SIGRTMAX:
            return number
    else:
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            return int(signal.Signals[name])
        except KeyError:
            pass
    raise SourceError(f"{SIGNAL_PARAM}: {text!r} is not a signal (use a number 1-"
                      f"{int(signal.SIGRTMAX)} or a name such as SIGKILL)")


def make_source(spec: GadgetSpec, values: Mapping[str, Any]) -> TracerSource:
    raw = values.get(SIGNAL_PARAM)
    if raw not in (None, ""):
        # An int value is passed to the compiler as a plain number, not as a string literal.
        values = {**values, SIGNAL_PARAM: parse_signal(str(raw))}
    return TracerSource(spec, values)
