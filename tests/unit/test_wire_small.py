"""Small batches are framed record by record; the bytes are those of the block path."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import wire
from pipeline.batch import Batch, CodedColumn
from pipeline.schema import DataSourceSchema, DataSourceType, Field, Kind


def _schema(extra: int) -> DataSourceSchema:
    fields = [Field("a", "a", 0, Kind.UINT32, 0, 0, 4), Field("b", "b", 1, Kind.UINT64, 0, 4, 8)]
    fields += [Field(f"x{k}", f"x{k}", 2 + k, Kind.STRING, payload_index=k + 1)
               for k in range(extra)]
    return DataSourceSchema("ds", DataSourceType.SINGLE, tuple(fields), 12, 1 + extra)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, wire.SMALL_BATCH), st.integers(0, 4), st.integers(0, 2**32 - 1),
       st.integers(0, 300), st.booleans(), st.data())
def test_small_batches_frame_as_the_block_path_does(
        n: int, extra: int, first_seq: int, ds_id: int, placeholder: bool,
        data: st.DataObject) -> None:
    rows = np.frombuffer(data.draw(st.binary(min_size=12 * n, max_size=12 * n)),
                         dtype=np.uint8).reshape(n, 12)
    cols: list[list[bytes] | CodedColumn] = []
    for k in range(extra):
        values = [data.draw(st.binary(max_size=200)) for _ in range(n)]
        cols.append(values if k % 2 else CodedColumn(values, np.arange(n, dtype=np.intp)))
    batch = Batch(_schema(extra), rows.copy(), tuple(cols))
    seqs = None if placeholder else (
        np.arange(first_seq, first_seq + n, dtype=np.uint64) & np.uint64(0xFFFFFFFF))
    small = wire._framed_small(batch, seqs, ds_id)
    # The block path, asked directly: a batch past the small size, cut back to these records.
    reps = wire.SMALL_BATCH // n + 1
    big_rows = np.concatenate([rows] * reps)
    big_cols = tuple([c[i % n] for i in range(n * reps)] for c in cols)
    big = Batch(_schema(extra), big_rows, big_cols)
    big_seqs = None if seqs is None else np.concatenate([seqs] * reps)
    data_b, lens_b, heads_b = wire.framed_records(big, big_seqs, ds_id)
    total = int(lens_b[:n].sum())
    assert bytes(small[0]) == bytes(data_b[:total])
    assert small[1].tolist() == lens_b[:n].tolist()
    assert small[2].tolist() == heads_b[:n].tolist()
