"""Per-record GadgetEvents of records with further payloads, built as whole-batch blocks
(pipeline/wire.py ``framed_records``), checked against the protobuf decoder record by record:
every way the assembler takes (one shape, runs of shapes, alternating shapes, too many shapes
for either), coded, fixed-width and plain payload columns, seqs across varint lengths, the
five-byte placeholder, and payload 0 cut short."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import wire
from pipeline._gen import gadget_service_pb2 as pb
from pipeline.batch import Batch, Coded, Fixed, FormColumn
from pipeline.schema import DataSourceSchema, DataSourceType, Field, FieldFlag, Kind
from tests.specdecode import split_frames


def schema() -> DataSourceSchema:
    fields = (Field("n", "n", 0, int(Kind.UINT32), 0, 0, 4, FieldFlag.STATIC_MEMBER),
              Field("name", "name", 1, int(Kind.STRING), payload_index=1),
              Field("stamp", "stamp", 2, int(Kind.STRING), payload_index=2),
              Field("note", "note", 3, int(Kind.STRING), payload_index=3))
    return DataSourceSchema("d", DataSourceType.SINGLE, fields, 4, payload_count=4)


def batch(n: int, names: list[bytes], pattern: str, seed: int = 0) -> Batch:
    """Records whose coded column follows ``pattern``: "same" (one value), "runs" (a few long
    runs), "alternating" (a few values, changing every record), "many" (hundreds of lengths)."""
    rng = np.random.default_rng(seed)
    rows = np.arange(n, dtype="<u4").view(np.uint8).reshape(n, 4).copy()
    if pattern == "same":
        codes = np.zeros(n, dtype=np.intp)
    elif pattern == "runs":
        codes = (np.arange(n) * 3 // max(n, 1)).astype(np.intp) % len(names)
    elif pattern == "alternating":
        codes = (np.arange(n) % len(names)).astype(np.intp)
    else:
        codes = rng.integers(0, len(names), n).astype(np.intp)
    stamps = Fixed(rng.integers(48, 58, size=(n, 30), dtype=np.uint8))
    notes = [bytes(rng.integers(0, 256, int(rng.integers(0, 3)), dtype=np.uint8))
             for _ in range(n)] if pattern != "same" else [b"x"] * n
    return Batch(schema(), rows, (FormColumn(Coded(names, codes)), FormColumn(stamps), notes))


def decode(data: bytes | bytearray) -> list[pb.GadgetEvent]:
    return [pb.GadgetEvent.FromString(f) for f in split_frames(bytes(data))]


NAMES = {"same": [b"root"], "runs": [b"root", b"daemon", b"x"],
         "alternating": [b"", b"root", b"a-much-longer-user-name"],
         "many": [b"u" * k for k in range(300)]}


@pytest.mark.parametrize("pattern", list(NAMES))
@pytest.mark.parametrize("first", [1, 120, (1 << 32) - 3])
def test_every_record_decodes_to_its_payloads_and_seq(pattern: str, first: int) -> None:
    b = batch(500, NAMES[pattern], pattern)
    seqs = np.arange(first, first + len(b), dtype=np.uint64) & np.uint64(0xFFFFFFFF)
    data, lens, _ = wire.framed_records(b, seqs, 3)
    events = decode(data)
    assert len(events) == len(b) and int(lens.sum()) == len(data)
    for i, e in enumerate(events):
        assert (e.seq, e.dataSourceID) == (int(seqs[i]), 3)
        assert list(pb.GadgetData.FromString(e.payload).data.payload) == b.payloads(i)
    assert bytes(data) == wire.per_record_events(b, first, 3)


def test_placeholder_seqs_are_five_bytes_at_a_fixed_place() -> None:
    b = batch(300, NAMES["alternating"], "alternating")
    data, lens, _ = wire.framed_records(b, None, 0)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    buf = np.frombuffer(bytes(data), dtype=np.uint8)
    for k, byte in enumerate(wire.SEQ_PLACEHOLDER):
        assert (buf[starts + 6 + k] == byte).all()
    assert [e.seq for e in decode(data)] == [0] * 300


def test_payload_zero_cut_short_leaves_exactly_the_cut_out() -> None:
    b = batch(200, NAMES["runs"], "runs")
    keep = np.where(np.arange(200) % 2 == 0, 4, 1).astype(np.int64)
    data, lens, head = wire.framed_records(b, None, 1, [(0, 4, keep)])
    full, full_lens, full_head = wire.framed_records(b, None, 1)
    assert (full_lens - lens).tolist() == (4 - keep).tolist()
    assert head.tolist() == full_head.tolist()
    pos = full_pos = 0
    for i in range(200):
        a = bytes(data[pos: pos + int(lens[i])])
        f = bytes(full[full_pos: full_pos + int(full_lens[i])])
        h, k = int(head[i]), int(keep[i])
        assert a == f[: h + k] + f[h + 4:]
        pos += int(lens[i])
        full_pos += int(full_lens[i])
