"""trace_open runs on the generic ring-buffer tracer; this only refuses ``paths=true``.

Upstream resolves full paths (``fpath``) with helpers this tracepoint-only build does not have,
so the param is accepted for compatibility with upstream clients but ``true`` fails the run
with a clear message rather than silently returning no paths.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.gadget import EBPF_PREFIX, GadgetSpec
from pipeline.sources.base import SourceError
from pipeline.sources.tracer import TracerSource


def make_source(spec: GadgetSpec, values: Mapping[str, Any]) -> TracerSource:
    if values.get(EBPF_PREFIX + "paths"):
        raise SourceError(f"gadget {spec.name}: {EBPF_PREFIX}paths=true is not supported "
                          "(full paths need kernel helpers this build does not use); "
                          "fname carries the path as passed to the syscall")
    return TracerSource(spec, values)
