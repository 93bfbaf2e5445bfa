"""OTLP log records built as whole-batch blocks (pipeline/sinks/otlpvec.py): further payloads
in every form (coded, fixed-width, plain list; strings and struct members), values constant
over a batch and not, and requests split on the running total, checked with the official
protobuf decoder."""

from __future__ import annotations

import numpy as np
import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from pipeline.batch import Batch, Coded, Fixed, FormColumn
from pipeline.schema import DataSourceSchema, DataSourceType, Field, FieldFlag, Kind
from pipeline.sinks.encode import (
    OtlpLogEncoder,
    logs_requests,
    logs_requests_flat,
    otlp_resource,
    otlp_scope,
)

NAMES = [b"root", b"daemon", b"caf\xc3\xa9", b"bad\xff", b""]


def schema() -> DataSourceSchema:
    s = FieldFlag.STATIC_MEMBER
    fields = (Field("pid", "pid", 0, int(Kind.UINT32), 0, 0, 4, s),
              Field("delta", "delta", 1, int(Kind.INT64), 0, 4, 8, s),
              Field("user", "user", 2, int(Kind.STRING), payload_index=1),
              Field("stamp", "stamp", 3, int(Kind.STRING), payload_index=2),
              Field("note", "note", 4, int(Kind.CSTRING), payload_index=3),
              Field("st", "st", 5, int(Kind.BYTES), payload_index=4, size=8),
              Field("a", "st.a", 6, int(Kind.UINT32), 4, 0, 4, s | FieldFlag.HAS_PARENT,
                    parent=5),
              Field("b", "st.b", 7, int(Kind.UINT32), 4, 4, 4, s | FieldFlag.HAS_PARENT,
                    parent=5))
    return DataSourceSchema("d", DataSourceType.SINGLE, fields, 12, payload_count=5)


def batch(n: int, constant: bool) -> tuple[Batch, list[dict[str, object]]]:
    rng = np.random.default_rng(3)
    rows = np.zeros((n, 12), dtype=np.uint8)
    pids = np.full(n, 77) if constant else rng.integers(0, 1 << 31, n)
    deltas = np.full(n, -5) if constant else rng.integers(-(1 << 62), 1 << 62, n)
    rows[:, :4] = pids.astype("<u4").view(np.uint8).reshape(n, 4)
    rows[:, 4:] = deltas.astype("<i8").view(np.uint8).reshape(n, 8)
    codes = np.zeros(n, dtype=np.intp) if constant else rng.integers(0, len(NAMES), n)
    stamps = np.frombuffer(b"".join(f"2024-11-25T13:06:{i % 60:02d}Z".encode()
                                    for i in range(n)), dtype=np.uint8).reshape(n, 20)
    notes = [b"same\0stale" if constant else bytes([65 + i % 26]) * (i % 7) + b"\0x"
             for i in range(n)]
    structs = [(7).to_bytes(4, "little") + (i if not constant else 9).to_bytes(4, "little")
               for i in range(n)]
    b = Batch(schema(), rows, (FormColumn(Coded(NAMES, codes)), FormColumn(Fixed(stamps)),
                               notes, structs))
    want = [{"pid": int(pids[i]), "delta": int(deltas[i]),
             "user": NAMES[codes[i]].decode("utf-8", "replace"),
             "stamp": stamps[i].tobytes().decode(), "note": notes[i].split(b"\0")[0].decode(),
             "st.a": 7, "st.b": 9 if constant else i} for i in range(n)]
    return b, want


def decode(requests: list[tuple[bytes, int]]) -> list[dict[str, object]]:
    out = []
    for r, count in requests:
        req = ExportLogsServiceRequest.FromString(r)
        recs = req.resource_logs[0].scope_logs[0].log_records
        assert len(recs) == count
        for lr in recs:
            attrs: dict[str, object] = {}
            for kv in lr.attributes:
                v = kv.value
                attrs[kv.key] = v.int_value if v.HasField("int_value") else v.string_value
            out.append(attrs)
    return out


@pytest.mark.parametrize("constant", [True, False])
@pytest.mark.parametrize("max_bytes", [0, 5000, 10])
def test_records_decode_to_their_values_and_split_where_the_list_form_does(
        constant: bool, max_bytes: int) -> None:
    b, want = batch(300, constant)
    enc = OtlpLogEncoder(b.schema, body="g")
    resource, scope = otlp_resource({"service.name": "x"}), otlp_scope("g", "1")
    data, lens = enc.encode_flat(b, 123)
    flat = logs_requests_flat(resource, scope, data, lens, max_bytes)
    assert flat == logs_requests(resource, scope, enc.encode(b, 123), max_bytes)
    assert decode(flat) == want
    if max_bytes == 10:  # a limit below one record still sends each, one per request
        assert [c for _, c in flat] == [1] * 300
