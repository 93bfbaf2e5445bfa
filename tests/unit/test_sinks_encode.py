"""The per-batch encoders (JSON, OTLP log records, Kafka messages) checked record by record
against per-record Python expectations and the official protobuf decoder."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from pipeline import wire
from pipeline._gen import gadget_service_pb2 as pb
from pipeline.batch import Batch
from pipeline.layout import StructRegistry
from pipeline.schema import DataSourceSchema, DataSourceType, Field, FieldFlag, Kind
from pipeline.sinks.encode import (
    JsonEncoder,
    OtlpLogEncoder,
    leaf_fields,
    logs_requests,
    otlp_resource,
    otlp_scope,
    time_field,
)
from pipeline.sinks.kafka import check_template, topic_name

REG = StructRegistry(
    typedefs={"gadget_timestamp": "u64"},
    structs={
        "creds": ["u32 uid", "u32 gid"],
        "proc": ["char comm[16]", "u32 pid", "struct creds creds"],
        "ev": ["gadget_timestamp timestamp_raw", "struct proc proc", "s64 delta", "s8 small",
               "u64 big", "f64 ratio", "f32 half", "bool ok", "char file[300]", "u16 port"],
    })


def schema() -> DataSourceSchema:
    fields, size = REG.fields("ev")
    return DataSourceSchema("ev", DataSourceType.SINGLE, tuple(fields), size)


Rec = dict[str, object]


def make(recs: list[Rec]) -> Batch:
    s = schema()
    rows = np.zeros((len(recs), s.record_size), dtype=np.uint8)
    fmts = {Kind.UINT64: "<Q", Kind.INT64: "<q", Kind.INT8: "<b", Kind.UINT32: "<I",
            Kind.FLOAT64: "<d", Kind.FLOAT32: "<f", Kind.BOOL: "<?", Kind.UINT16: "<H"}
    for i, r in enumerate(recs):
        buf = bytearray(s.record_size)
        for name, v in r.items():
            f = s.field(name)
            if f.base_kind is Kind.CSTRING:
                raw = v if isinstance(v, bytes) else str(v).encode()
                # stale ring memory after the NUL, as the kernel leaves it
                buf[f.offs: f.offs + f.size] = (raw + b"\0" + b"\xee" * f.size)[: f.size]
            else:
                struct.pack_into(fmts[f.base_kind], buf, f.offs, v)
        rows[i] = np.frombuffer(bytes(buf), dtype=np.uint8)
    return Batch(s, rows)


RECS: list[Rec] = [
    {"timestamp_raw": 1_700_000_000_123_456_789, "proc.comm": "bash", "proc.pid": 42,
     "proc.creds.uid": 1000, "proc.creds.gid": 100, "delta": -5, "small": -128,
     "big": (1 << 64) - 1, "ratio": 0.25, "half": 1.5, "ok": True, "file": "/bin/true",
     "port": 65535},
    {"timestamp_raw": 1, "proc.comm": "x" * 16, "proc.pid": 0, "delta": 1 << 62,
     "ratio": float("nan"), "file": "é\"quote\\back\nline\ttab", "ok": False},
    {"proc.comm": b"bad\xff\xfeutf", "file": "a" * 299, "ratio": float("inf")},
]


def test_leaf_fields_skip_struct_containers() -> None:
    names = [f.full_name for f in leaf_fields(schema())]
    assert "proc" not in names and "proc.creds" not in names
    assert names[:5] == ["timestamp_raw", "proc.comm", "proc.pid", "proc.creds.uid",
                         "proc.creds.gid"]
    assert time_field(schema()) is not None


def test_json_nests_fields_under_their_parents_and_escapes_strings() -> None:
    lines = JsonEncoder(schema()).encode(make(RECS))
    objs = [json.loads(line) for line in lines]
    assert all(b"\n" not in line for line in lines)
    a, b, c = objs
    assert a["proc"] == {"comm": "bash", "pid": 42, "creds": {"uid": 1000, "gid": 100}}
    assert (a["timestamp_raw"], a["delta"], a["small"], a["big"]) == (
        1_700_000_000_123_456_789, -5, -128, (1 << 64) - 1)
    assert (a["ratio"], a["half"], a["ok"], a["file"], a["port"]) == (0.25, 1.5, True,
                                                                      "/bin/true", 65535)
    assert b["proc"]["comm"] == "x" * 16  # no NUL inside the 16 bytes: the whole field
    assert b["ratio"] is None  # NaN is not JSON
    assert b["file"] == "é\"quote\\back\nline\ttab"
    assert c["proc"]["comm"] == "bad\ufffd\ufffdutf"
    assert c["file"] == "a" * 299 and c["ratio"] is None
    assert list(a) == ["timestamp_raw", "proc", "delta", "small", "big", "ratio", "half", "ok",
                       "file", "port"]


def test_json_of_an_empty_batch_is_empty() -> None:
    assert JsonEncoder(schema()).encode(make([])) == []


def _attrs(rec: object) -> dict[str, AnyValue]:
    return {kv.key: kv.value for kv in rec.attributes}  # type: ignore[attr-defined]


def _decode(requests: list[tuple[bytes, int]]) -> list[ExportLogsServiceRequest]:
    return [ExportLogsServiceRequest.FromString(r) for r, _ in requests]


def test_otlp_records_carry_typed_attributes_time_and_body() -> None:
    enc = OtlpLogEncoder(schema(), body="trace_ev")
    recs = enc.encode(make(RECS), observed_ns=777)
    reqs = _decode(logs_requests(otlp_resource({"service.name": "gadgetpipe", "n": 3}),
                                 otlp_scope("trace_ev", "0.1", {"gadget.datasource": "ev"}),
                                 recs))
    assert len(reqs) == 1
    rl = reqs[0].resource_logs[0]
    res = {kv.key: kv.value for kv in rl.resource.attributes}
    assert res["service.name"].string_value == "gadgetpipe" and res["n"].int_value == 3
    sl = rl.scope_logs[0]
    assert (sl.scope.name, sl.scope.version) == ("trace_ev", "0.1")
    assert sl.scope.attributes[0].value.string_value == "ev"
    a, b, c = sl.log_records
    assert a.time_unix_nano == 1_700_000_000_123_456_789 and a.observed_time_unix_nano == 777
    assert (a.severity_number, a.severity_text, a.body.string_value) == (9, "INFO", "trace_ev")
    at = _attrs(a)
    assert at["proc.comm"].string_value == "bash"
    assert at["proc.pid"].int_value == 42 and at["proc.creds.gid"].int_value == 100
    assert at["delta"].int_value == -5 and at["small"].int_value == -128
    assert at["big"].int_value == -1  # uint64 max keeps its bits in an int64
    assert at["ratio"].double_value == 0.25 and at["half"].double_value == 1.5
    assert at["ok"].bool_value is True and at["port"].int_value == 65535
    assert at["file"].string_value == "/bin/true"
    assert "proc" not in at and "proc.creds" not in at
    bt = _attrs(b)
    assert bt["delta"].int_value == 1 << 62 and bt["ok"].HasField("bool_value")
    assert bt["file"].string_value == "é\"quote\\back\nline\ttab"
    assert _attrs(c)["proc.comm"].string_value == "bad\ufffd\ufffdutf"
    assert _attrs(c)["file"].string_value == "a" * 299


def test_otlp_body_can_be_a_field() -> None:
    enc = OtlpLogEncoder(schema(), body="ignored", body_field="file")
    reqs = _decode(logs_requests(b"", b"", enc.encode(make(RECS[:1]), 1)))
    assert reqs[0].resource_logs[0].scope_logs[0].log_records[0].body.string_value == \
        "/bin/true"


def test_otlp_requests_split_under_the_size_limit_and_keep_every_record() -> None:
    many = [{**RECS[0], "proc.pid": i} for i in range(500)]
    recs = OtlpLogEncoder(schema(), body="x").encode(make(many), 1)
    parts = logs_requests(otlp_resource({"a": "b"}), otlp_scope("x", "1"), recs, 20_000)
    assert len(parts) > 1
    assert all(len(r) <= 20_000 for r, _ in parts)
    pids = [_attrs(lr)["proc.pid"].int_value for req in _decode(parts)
            for lr in req.resource_logs[0].scope_logs[0].log_records]
    assert pids == list(range(500))
    assert sum(n for _, n in parts) == 500


def test_otlp_fields_in_extra_payloads_use_the_general_path() -> None:
    fields = (Field("n", "n", 0, int(Kind.UINT32), 0, 0, 4, FieldFlag.STATIC_MEMBER),
              Field("s", "s", 1, int(Kind.STRING), payload_index=1),
              Field("raw", "raw", 2, int(Kind.BYTES), payload_index=2))
    s = DataSourceSchema("d", DataSourceType.SINGLE, fields, 4, payload_count=3)
    rows = np.array([[7, 0, 0, 0]], dtype=np.uint8)
    batch = Batch(s, rows, ([b"hello"], [b"\x01\x02"]))
    at = _attrs(_decode(logs_requests(b"", b"", OtlpLogEncoder(s).encode(batch, 1)))[0]
                .resource_logs[0].scope_logs[0].log_records[0])
    assert at["n"].int_value == 7 and at["s"].string_value == "hello"
    assert at["raw"].bytes_value == b"\x01\x02"
    assert json.loads(JsonEncoder(s).encode(batch)[0]) == {"n": 7, "s": "hello", "raw": "0102"}


def test_protobuf_messages_are_gadget_data_as_on_the_grpc_wire() -> None:
    batch = make(RECS)
    msgs = wire.gadget_data(batch)
    for i, m in enumerate(msgs):
        gd = pb.GadgetData.FromString(m)
        assert gd.data.payload[0] == batch.rows[i].tobytes()


def test_topic_templates() -> None:
    assert topic_name("gadget.{gadget}", gadget="trace_exec", instance="i", datasource="exec",
                      node="n") == "gadget.trace_exec"
    assert topic_name("{node}/{datasource}", gadget="g", instance="i", datasource="exec",
                      node="host a") == "host_a_exec"
    check_template("gp.{gadget}.{instance}.{datasource}.{node}")
    with pytest.raises(ValueError, match="unknown placeholders"):
        check_template("gp.{nope}")
