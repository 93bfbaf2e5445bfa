"""OTLP resources per container: records of a batch are grouped by the container they came
from, and each group's ``ResourceLogs`` carries that container as resource attributes named by
OpenTelemetry's semantic conventions (``k8s.*`` and ``container.*``), beside the sink's own.

The enrich operator (pipeline/operators/enrich.py) puts every record's container in coded
columns (one value per container), so grouping reads their codes; nothing is done per record
in Python. Records of no container keep the sink's resource alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.batch import Batch, CodedColumn
from pipeline.sinks.encode import logs_requests, otlp_resource

SEMCONV: tuple[tuple[str, str], ...] = (
    ("k8s.namespace", "k8s.namespace.name"),
    ("k8s.podName", "k8s.pod.name"),
    ("k8s.containerName", "k8s.container.name"),
    ("k8s.node", "k8s.node.name"),
    ("runtime.containerId", "container.id"),
    ("runtime.containerName", "container.name"),
    ("runtime.containerImageName", "container.image.name"),
    ("runtime.containerImageDigest", "container.image.id"),
    ("runtime.runtimeName", "container.runtime"),
)
"""Record field -> resource attribute (OpenTelemetry semantic conventions)."""
POD_LABELS = "k8s.podLabels"
POD_LABEL_PREFIX = "k8s.pod.label."


def _column(batch: Batch, name: str) -> Sequence[bytes] | None:
    for f in batch.schema.fields:
        if f.full_name == name and f.has_value and f.payload_index > 0 and not f.size:
            return batch.extra[f.payload_index - 1]
    return None


def container_groups(batch: Batch) -> tuple[list[dict[str, Any]], npt.NDArray[np.intp]]:
    """The distinct containers' resource attributes, and each record's index into them."""
    n = len(batch)
    cols = {name: _column(batch, name) for name, _ in SEMCONV}
    cols[POD_LABELS] = _column(batch, POD_LABELS)
    present = {k: c for k, c in cols.items() if c is not None}
    if not present:
        return [{}], np.zeros(n, dtype=np.intp)
    if all(isinstance(c, CodedColumn) for c in present.values()):
        coded = [c for c in present.values() if isinstance(c, CodedColumn)]
        key = np.zeros(n, dtype=np.int64)
        for c in coded:
            key = key * (len(c.values) + 1) + c.codes
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        reps = first.tolist()
        inv = inverse.reshape(-1).astype(np.intp)
    else:  # plain columns: group per record (another producer's extras)
        index: dict[tuple[bytes, ...], int] = {}
        reps = []
        ids = []
        lists = [list(c) for c in present.values()]
        for i, t in enumerate(zip(*lists, strict=True)):
            g = index.get(t)
            if g is None:
                g = index[t] = len(reps)
                reps.append(i)
            ids.append(g)
        inv = np.array(ids, dtype=np.intp)
    groups = []
    for r in reps:
        attrs: dict[str, Any] = {}
        for field, attr in SEMCONV:
            col = present.get(field)
            v = col[r].decode("utf-8", "replace") if col is not None else ""
            if v:
                attrs[attr] = v
        labels = present.get(POD_LABELS)
        if labels is not None:
            for pair in labels[r].decode("utf-8", "replace").split(","):
                k, sep, v = pair.partition("=")
                if sep and k:
                    attrs[POD_LABEL_PREFIX + k] = v
        groups.append(attrs)
    return groups, inv


def container_requests(base: Mapping[str, Any], scope: bytes, batch: Batch,
                       records: Sequence[bytes], max_bytes: int = 0,
                       ) -> list[tuple[bytes, int]]:
    """``ExportLogsServiceRequest``s for ``records`` (the batch's, encoded) with one
    ``ResourceLogs`` per container, each holding that container's records in their order;
    requests are split so that each stays under ``max_bytes`` (0: one request)."""
    groups, inv = container_groups(batch)
    if len(groups) == 1:
        return logs_requests(otlp_resource({**base, **groups[0]}), scope, records, max_bytes)
    # A request's ResourceLogs is a repeated field: requests with one each concatenate into
    # one request with all of them.
    pieces: list[tuple[bytes, int]] = []
    order = np.argsort(inv, kind="stable")
    bounds = np.searchsorted(inv[order], np.arange(len(groups) + 1))
    for g, attrs in enumerate(groups):
        idx = order[bounds[g]: bounds[g + 1]].tolist()
        if idx:
            pieces += logs_requests(otlp_resource({**base, **attrs}), scope,
                                    [records[i] for i in idx], max_bytes)
    out: list[tuple[bytes, int]] = []
    cur: list[bytes] = []
    size = count = 0
    for req, c in pieces:
        if cur and max_bytes and size + len(req) > max_bytes:
            out.append((b"".join(cur), count))
            cur, size, count = [], 0, 0
        cur.append(req)
        size += len(req)
        count += c
    if cur:
        out.append((b"".join(cur), count))
    return out


__all__ = ["SEMCONV", "container_groups", "container_requests"]
