"""Batches: one data source's records as one contiguous block, never one object per record."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from pipeline.schema import DataSourceSchema

Rows = npt.NDArray[np.uint8]
"""Payload 0 of every record in a batch: shape (n, record_size), C-contiguous."""


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
        idx = np.flatnonzero(mask).tolist()
        return Batch(self.schema, self.rows[mask],
                     tuple([col[i] for i in idx] for col in self.extra))

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
