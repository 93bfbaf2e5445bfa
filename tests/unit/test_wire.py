"""Payload encoding round-trips for every kind, decoded by the spec decoder (tests/specdecode)."""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import accessors, wire
from pipeline.batch import Batch
from pipeline.schema import (
    KIND_FLAG_ARRAY,
    DataSourceSchema,
    DataSourceType,
    Field,
    FieldFlag,
    Kind,
)
from tests.specdecode import field_value, payload_packets, split_frames

FMT = {Kind.BOOL: "?", Kind.INT8: "b", Kind.INT16: "h", Kind.INT32: "i", Kind.INT64: "q",
       Kind.UINT8: "B", Kind.UINT16: "H", Kind.UINT32: "I", Kind.UINT64: "Q",
       Kind.FLOAT32: "f", Kind.FLOAT64: "d"}


def value_strategy(kind: Kind, size: int) -> st.SearchStrategy[Any]:
    if kind is Kind.BOOL:
        return st.booleans()
    if kind in (Kind.FLOAT32, Kind.FLOAT64):
        if kind is Kind.FLOAT32:
            return st.floats(allow_nan=False, width=32)
        return st.floats(allow_nan=False, width=64)
    if kind in FMT:
        bits = struct.calcsize(FMT[kind]) * 8
        signed = FMT[kind].islower()
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        return st.integers(lo, hi)
    if kind is Kind.CSTRING:
        return st.binary(max_size=size - 1).map(lambda b: b.replace(b"\0", b"x"))
    return st.binary(max_size=size)


@st.composite
def schema_and_records(draw: st.DrawFn) -> tuple[DataSourceSchema, list[list[Any]], bool]:
    kinds = draw(st.lists(st.sampled_from(list(Kind)[1:]), min_size=1, max_size=8))
    fields: list[Field] = []
    offs = 0
    dyn = 0
    use_dynamic = draw(st.booleans())
    for i, k in enumerate(kinds):
        if k in FMT and draw(st.booleans()) and k is not Kind.BOOL:
            arr = draw(st.integers(1, 4))
            size = struct.calcsize(FMT[k]) * arr
            kind = int(k) | KIND_FLAG_ARRAY
        else:
            size = struct.calcsize(FMT[k]) if k in FMT else draw(st.integers(1, 24))
            kind = int(k)
        if use_dynamic and k in (Kind.STRING, Kind.BYTES) and not kind & KIND_FLAG_ARRAY:
            dyn += 1
            fields.append(Field(f"f{i}", f"f{i}", i, kind, payload_index=dyn, size=0))
        else:
            fields.append(Field(f"f{i}", f"f{i}", i, kind, 0, offs, size,
                                FieldFlag.STATIC_MEMBER))
            offs += size
    schema = DataSourceSchema("demo", DataSourceType.SINGLE, tuple(fields), max(offs, 1),
                              payload_count=1 + dyn)
    n = draw(st.integers(0, 30))
    records = []
    for _ in range(n):
        row: list[Any] = []
        for f in fields:
            base = f.base_kind
            if f.is_array:
                cnt = f.size // struct.calcsize(FMT[base])
                row.append(draw(st.lists(value_strategy(base, 0), min_size=cnt, max_size=cnt)))
            elif f.payload_index == 0 and base in (Kind.STRING, Kind.BYTES):
                row.append(draw(st.binary(min_size=f.size, max_size=f.size)))
            else:
                row.append(draw(value_strategy(base, f.size or 24)))
        records.append(row)
    return schema, records, draw(st.booleans())


def encode(schema: DataSourceSchema, records: list[list[Any]]) -> Batch:
    rows = np.zeros((len(records), schema.record_size), dtype=np.uint8)
    extra: list[list[bytes]] = [[] for _ in range(schema.payload_count - 1)]
    for r, values in enumerate(records):
        for f, v in zip(schema.fields, values, strict=True):
            base = f.base_kind
            if f.is_array:
                raw = struct.pack(f"<{len(v)}{FMT[base]}", *v)
            elif base in FMT:
                raw = struct.pack("<" + FMT[base], v)
            else:
                raw = bytes(v)
            if f.payload_index:
                extra[f.payload_index - 1].append(raw)
            else:
                rows[r, f.offs: f.offs + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return Batch(schema, rows, tuple(extra))


def same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isinf(a) and a == b) or abs(a - b) <= abs(a) * 1e-6
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@settings(max_examples=150, deadline=None)
@given(schema_and_records(), st.integers(1, (1 << 32) - 40), st.integers(0, 3))
def test_every_kind_round_trips_through_per_record_events(
        case: tuple[DataSourceSchema, list[list[Any]], bool], first_seq: int,
        ds_id: int) -> None:
    schema, records, _ = case
    batch = encode(schema, records)
    frames = split_frames(wire.per_record_events(batch, first_seq, ds_id))
    packets = payload_packets(frames, {ds_id: 1})
    assert [p.seq for p in packets] == [(first_seq + i) & 0xFFFFFFFF
                                        for i in range(len(records))]
    pbfields = [f.to_proto() for f in schema.fields]
    for packet, values in zip(packets, records, strict=True):
        assert packet.ds_id == ds_id and len(packet.elements) == 1
        el = packet.elements[0]
        assert len(el.payload) == schema.payload_count
        for f, v in zip(pbfields, values, strict=True):
            assert same(field_value(f, el), v), (f.fullName, field_value(f, el), v)


@settings(max_examples=80, deadline=None)
@given(schema_and_records(), st.integers(1, 7))
def test_every_kind_round_trips_through_array_packets(
        case: tuple[DataSourceSchema, list[list[Any]], bool], per_packet: int) -> None:
    schema, records, _ = case
    batch = encode(schema, records)
    data, packets_used = wire.array_events(batch, 10, 1, per_packet)
    packets = payload_packets(split_frames(data), {1: 2})
    assert len(packets) == packets_used == max(1, math.ceil(len(records) / per_packet))
    assert [p.seq for p in packets] == list(range(10, 10 + packets_used))
    elements = [el for p in packets for el in p.elements]
    assert len(elements) == len(records)
    pbfields = [f.to_proto() for f in schema.fields]
    for el, values in zip(elements, records, strict=True):
        for f, v in zip(pbfields, values, strict=True):
            assert same(field_value(f, el), v)


@settings(max_examples=80, deadline=None)
@given(schema_and_records())
def test_accessors_agree_with_the_spec_decoder(
        case: tuple[DataSourceSchema, list[list[Any]], bool]) -> None:
    schema, records, _ = case
    batch = encode(schema, records)
    for i, f in enumerate(schema.fields):
        got = accessors.values(batch, f)
        want = [r[i] for r in records]
        if f.base_kind is Kind.CSTRING or f.base_kind is Kind.STRING:
            want = [bytes(w).decode("utf-8", "replace") for w in want]
        elif f.base_kind is Kind.BYTES and not f.is_array:
            want = [bytes(w).hex() for w in want]
        assert same(got, want), f.full_name


def test_spec_worked_example_bytes() -> None:
    """Spec 4.4: the eBPF-style record encodes to the documented bytes."""
    schema = DataSourceSchema("demo", DataSourceType.SINGLE, (), 32)
    rec = (4242).to_bytes(4, "little") + b"bash".ljust(16, b"\0") + bytes(4) + \
        (1234567890123).to_bytes(8, "little")
    data = wire.per_record_events(Batch.from_records(schema, [rec]), 1, 0)
    gadget_data = bytes.fromhex("1a220a20") + rec
    assert data == b"\x00" + (len(gadget_data) + 4).to_bytes(4, "big") + \
        bytes.fromhex("10011a24") + gadget_data


def test_log_event_matches_the_spec_bytes() -> None:
    assert split_frames(wire.log_event(3, "hi")) == [bytes.fromhex("08808" "00c1a026869")]
