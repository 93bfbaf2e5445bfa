"""trace_open's source: the ring-buffer tracer, plus ``fpath`` with ``paths=true``.

Upstream's struct has ``ustack`` and ``fpath``; here they are further payloads (gadget.yaml
``payloads:``) and default to zeros and empty (upstream's values unless it collects user
stacks, which this build does not, or ``paths`` is set). With ``paths=true`` the BPF program
writes the resolved path after the record in the ring, and it becomes a fixed-width column (a
CString entry keeps its NUL padding, which clients cut, so no record is cut apart one by one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from pipeline.batch import Batch, Fixed, FormColumn, Rows
from pipeline.gadget import EBPF_PREFIX, GadgetSpec
from pipeline.schema import DataSourceSchema
from pipeline.sources.tracer import TracerSource

PATH_MAX = 512  # GADGET_PATH_MAX, bpf/gadget_path.h


class OpenSource(TracerSource):
    def __init__(self, spec: GadgetSpec, values: Mapping[str, Any]) -> None:
        self._paths = bool(values.get(EBPF_PREFIX + "paths"))
        self._ustack = bytes(spec.datasources[0].field("ustack").size)
        super().__init__(spec, values)

    def ring_record_size(self, ds: DataSourceSchema) -> int:
        return ds.record_size + (PATH_MAX if self._paths else 0)

    def make_batch(self, ds: DataSourceSchema, rows: Rows) -> Batch:
        if not self._paths:
            return Batch(ds, rows)  # ustack and fpath get their defaults
        n = len(rows)
        ustack = FormColumn.constant(self._ustack, n)
        size = ds.record_size
        paths = rows[:, size:]
        # Only as wide as the longest path of the batch (and its NUL).
        nul = paths == 0
        longest = int(np.where(nul.any(axis=1), nul.argmax(axis=1), PATH_MAX).max(initial=0))
        fpath = FormColumn(Fixed(np.ascontiguousarray(paths[:, : min(longest + 1, PATH_MAX)])))
        return Batch(ds, np.ascontiguousarray(rows[:, :size]), (ustack, fpath))


def make_source(spec: GadgetSpec, values: Mapping[str, Any]) -> OpenSource:
    return OpenSource(spec, values)
