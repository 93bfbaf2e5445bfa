"""Batches: one data source's records as one contiguous block, never one object per record."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload

import numpy as np
import numpy.typing as npt

from pipeline.schema import DataSourceSchema

Rows = npt.NDArray[np.uint8]
"""Payload 0 of every record in a batch: shape (n, record_size), C-contiguous."""


class CodedColumn(Sequence[bytes]):
    """A payload column whose records take few distinct values: the values once, and one code
    (an index into them) per record, as Arrow's dictionary arrays.

    Operators that add the same value to many records (the container a record's process runs
    in, the node name) build these, so nothing downstream touches one Python object per record
    unless it iterates; the wire encoder (``pipeline.wire``) frames each distinct value once.

    Args:
        values: the distinct values.
        codes: for each record, the index of its value (any integer dtype).
    """

    __slots__ = ("codes", "values")

    def __init__(self, values: Sequence[bytes], codes: npt.NDArray[np.integer]) -> None:
        self.values = list(values)
        self.codes: npt.NDArray[np.intp] = np.asarray(codes, dtype=np.intp)

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    @overload
    def __getitem__(self, i: int) -> bytes: ...
    @overload
    def __getitem__(self, i: slice) -> CodedColumn: ...

    def __getitem__(self, i: int | slice) -> bytes | CodedColumn:
        if isinstance(i, slice):
            return CodedColumn(self.values, self.codes[i])
        return self.values[int(self.codes[i])]

    def __iter__(self) -> Iterator[bytes]:
        values = self.values
        return (values[c] for c in self.codes.tolist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other,
                                                                          strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def take(self, idx: npt.NDArray[np.intp]) -> CodedColumn:
        return CodedColumn(self.values, self.codes[idx])

    def tolist(self) -> list[bytes]:
        table = np.empty(len(self.values), dtype=object)
        table[:] = self.values
        return table[self.codes].tolist()  # type: ignore[no-any-return]

    @classmethod
    def constant(cls, value: bytes, n: int) -> CodedColumn:
        return cls([value], np.zeros(n, dtype=np.intp))


def take(col: Sequence[bytes], idx: npt.NDArray[np.intp]) -> Sequence[bytes]:
    """The entries of ``col`` at ``idx``, keeping a coded column coded."""
    if isinstance(col, CodedColumn):
        return col.take(idx)
    return [col[i] for i in idx.tolist()]


@dataclass(slots=True)
class Batch:
    """Records of one data source.

    Args:
        schema: the data source the records belong to.
        rows: payload 0 (the BPF struct) of each record, one row per record.
        extra: payloads 1..P-1, each a sequence with one ``bytes`` per record.
    """

    schema: DataSourceSchema
    rows: Rows
    extra: tuple[Sequence[bytes], ...] = field(default=())

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def select(self, mask: npt.NDArray[np.bool_]) -> Batch:
        """The records where ``mask`` is true (copies)."""
        if not self.extra:
            return Batch(self.schema, self.rows[mask])
        idx = np.flatnonzero(mask)
        return Batch(self.schema, self.rows[mask], tuple(take(col, idx) for col in self.extra))

    def slice(self, start: int, stop: int) -> Batch:
        """Records ``start`` to ``stop`` (views; coded columns stay coded)."""
        return Batch(self.schema, self.rows[start:stop],
                     tuple(col[start:stop] for col in self.extra))

    def with_schema(self, schema: DataSourceSchema) -> Batch:
        return Batch(schema, self.rows, self.extra)

    def payloads(self, i: int) -> list[bytes]:
        """Every payload entry of record ``i`` (the slow, general path)."""
        return [self.rows[i].tobytes(), *(col[i] for col in self.extra)]

    @classmethod
    def from_records(cls, schema: DataSourceSchema, records: Sequence[bytes],
                     extra: tuple[Sequence[bytes], ...] = ()) -> Batch:
        """Builds a batch from payload-0 byte strings (tests, replay); short ones are padded."""
        size = schema.record_size
        rows = np.zeros((len(records), size), dtype=np.uint8)
        for i, r in enumerate(records):
            b = np.frombuffer(r[:size], dtype=np.uint8)
            rows[i, : b.size] = b
        return cls(schema, rows, extra)

    @classmethod
    def empty(cls, schema: DataSourceSchema) -> Batch:
        return cls(schema, np.zeros((0, schema.record_size), dtype=np.uint8),
                   tuple([] for _ in range(schema.payload_count - 1)))
