"""Field accessors over batches, compiled once per field: numpy views for fixed-width fields,
decoding only when someone asks for a field's values."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.batch import Batch
from pipeline.schema import KIND_WIDTH, NUMPY_DTYPE, Field, Kind

Values = Callable[[Batch], list[Any]]


def column(batch: Batch, f: Field) -> npt.NDArray[Any]:
    """A numeric field of every record as a 1-D numpy array (a view where possible)."""
    kind = f.base_kind
    if f.is_array or kind not in NUMPY_DTYPE:
        raise TypeError(f"field {f.full_name!r} of kind {kind.name} is not numeric")
    width = KIND_WIDTH[kind]
    if f.payload_index == 0:
        raw = batch.rows[:, f.offs: f.offs + width]
        if raw.shape[0] == 0:
            return np.zeros(0, dtype=NUMPY_DTYPE[kind])
        col = np.ascontiguousarray(raw).view(NUMPY_DTYPE[kind]).reshape(-1)
    else:
        entries = batch.extra[f.payload_index - 1]
        # size > 0: a static member of a struct in a further payload (a map iterator's value).
        data = b"".join(b[f.offs: f.offs + width] for b in entries) if f.size else \
            b"".join(entries)
        col = np.frombuffer(data, dtype=NUMPY_DTYPE[kind])
    if kind is Kind.BOOL:
        return np.asarray(col == 1)
    return col


def raw_slices(batch: Batch, f: Field) -> list[bytes]:
    """The bytes of field ``f`` in every record."""
    if f.payload_index == 0:
        if f.size == 0:
            return [r.tobytes() for r in batch.rows]
        block = batch.rows[:, f.offs: f.offs + f.size]
        return [r.tobytes() for r in block]
    col = batch.extra[f.payload_index - 1]
    return [b[f.offs: f.offs + f.size] if f.size else b for b in col]


def cstrings(batch: Batch, f: Field) -> list[str]:
    """A CString field of every record, cut at the first NUL (ring memory is not zeroed)."""
    if f.payload_index == 0:
        block = batch.rows[:, f.offs: f.offs + f.size]
        # The S dtype drops trailing NULs only, so split at the first one explicitly.
        raw = block.copy().view(f"S{f.size}").reshape(-1).tolist()
        return [b.split(b"\0", 1)[0].decode("utf-8", "replace") for b in raw]
    return [b.split(b"\0", 1)[0].decode("utf-8", "replace") for b in raw_slices(batch, f)]


def values(batch: Batch, f: Field) -> list[Any]:
    """Python values of field ``f`` for every record, by kind."""
    kind = f.base_kind
    if not f.is_array and kind in NUMPY_DTYPE:
        return column(batch, f).tolist()  # type: ignore[no-any-return]
    if kind is Kind.CSTRING:
        return cstrings(batch, f)
    if kind is Kind.STRING:
        return [b.decode("utf-8", "replace") for b in raw_slices(batch, f)]
    if f.is_array and kind in NUMPY_DTYPE:
        dt = np.dtype(NUMPY_DTYPE[kind])
        return [np.frombuffer(b, dtype=dt).tolist() for b in raw_slices(batch, f)]
    return [b.hex() for b in raw_slices(batch, f)]
