"""Batches whose added payloads are coded columns (one value per container, say) are framed
per record shape with numpy; the bytes must equal a one-record-at-a-time framing."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import wire
from pipeline.batch import Batch, CodedColumn
from pipeline.layout import StructRegistry
from pipeline.schema import DataSourceSchema, DataSourceType
from tests.specdecode import split_frames


def _schema() -> DataSourceSchema:
    fields, size = StructRegistry({}, {"ev": ["u32 pid", "u64 x", "char s[20]"]}).fields("ev")
    return DataSourceSchema("ev", DataSourceType.SINGLE, tuple(fields), size)


@st.composite
def coded_batches(draw: st.DrawFn) -> Batch:
    s = _schema()
    n = draw(st.integers(0, 300))
    groups = draw(st.integers(1, 12))
    ncols = draw(st.integers(1, 16))
    shared = draw(st.booleans())  # one codes array for all columns, as the enrich operator
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 256, (n, s.record_size), dtype=np.uint8)
    mode = draw(st.sampled_from(["sorted", "interleaved", "one"]))

    def codes() -> np.ndarray:
        c = rng.integers(0, groups, n)
        return np.sort(c) if mode == "sorted" else (np.zeros(n, np.intp) if mode == "one" else c)

    base = codes()
    cols = []
    for _ in range(ncols):
        values = [bytes(rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8))
                  for _ in range(groups)]
        cols.append(CodedColumn(values, base if shared else codes()))
    return Batch(s, rows, tuple(cols))


@settings(max_examples=200, deadline=None)
@given(coded_batches(), st.sampled_from([1, 100, 127, 16380, 2**28 - 3]),
       st.sampled_from([0, 3, 300]))
def test_coded_batches_frame_as_the_general_path(batch: Batch, first_seq: int,
                                                 ds_id: int) -> None:
    fast = wire.per_record_events(batch, first_seq, ds_id)
    assert fast == b"".join(
        wire.grpc_frame(wire.gadget_event(
            wire.EVENT_TYPE_PAYLOAD, first_seq + i,
            wire.length_delimited(0x1A, wire.data_element(batch.payloads(i))), ds_id))
        for i in range(len(batch)))
    assert len(split_frames(fast)) == len(batch)
    general = b"".join(wire.length_delimited(0x1A, wire.data_element(batch.payloads(i)))
                       for i in range(len(batch)))
    assert wire.gadget_data_array(batch) == general


def test_a_coded_column_is_a_sequence_that_stays_coded_when_selected() -> None:
    c = CodedColumn([b"a", b"bb"], np.array([0, 1, 1, 0]))
    assert list(c) == [b"a", b"bb", b"bb", b"a"] == c.tolist()
    assert c[1] == b"bb" and list(c[1:3]) == [b"bb", b"bb"]
    s = _schema()
    b = Batch(s, np.zeros((4, s.record_size), np.uint8), (c,))
    picked = b.select(np.array([True, False, True, True]))
    assert isinstance(picked.extra[0], CodedColumn) and list(picked.extra[0]) == [b"a", b"bb", b"a"]
