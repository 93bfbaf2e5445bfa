"""The hand-built OTLP encoding of the otel-logs sink is byte for byte the OpenTelemetry SDK's.

The sink encodes a batch per request without the SDK (pipeline/sinks/encode.py): the SDK's
per-record ``Logger.emit`` path is too slow for event streams. Here the same records go through
the SDK as an application would send them (a ``LoggerProvider`` with the resource, a logger
named for the scope, ``emit`` per record, exported with the SDK's own OTLP encoder) and the
serialized ``ExportLogsServiceRequest`` must equal the sink's request to the byte.

Nothing is normalised. The records are built as the encoder documents them: its attributes
come fixed-size fields first (ints, doubles, bools), then the others, each group in schema
order, so the SDK records get their attributes in that order (attribute order is part of a
record: OTLP carries them as a list). Two inputs are left out because the SDK cannot express
them: string fields that are not UTF-8 (the sink passes the kernel's bytes on as they are) and
uint64 values above 2^63-1 (the sink sends their bits as an int64; the SDK refuses them).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource

from pipeline.batch import Batch
from pipeline.layout import StructRegistry
from pipeline.schema import DataSourceSchema, DataSourceType, Field, FieldFlag, Kind
from pipeline.sinks.encode import (
    ANNOTATION_LOGS_NAME,
    OtlpLogEncoder,
    leaf_fields,
    logs_requests,
    otlp_resource,
    otlp_scope,
)
from pipeline.sources.catalog import Catalog
from pipeline.version import VERSION

OBSERVED_NS = 1_700_000_000_987_654_321
RESOURCE: dict[str, Any] = {
    "service.name": "gadgetpipe", "service.version": VERSION, "host.name": "node-a",
    "gadget.name": "trace_ev", "gadget.instance.id": "0123456789abcdef0123456789abcdef",
    "gadget.instance.name": "ev-audit", "gadget.cpus": 2,
}

REG = StructRegistry(
    typedefs={"gadget_timestamp": "u64"},
    structs={
        "creds": ["u32 uid", "u32 gid"],
        "proc": ["char comm[16]", "u32 pid", "struct creds creds"],
        "ev": ["gadget_timestamp timestamp_raw", "struct proc proc", "s64 delta", "s8 small",
               "u64 big", "f64 ratio", "f32 half", "bool ok", "char file[300]", "u16 port",
               "u32 args[3]"],
    })
_PACK = {Kind.UINT64: "<Q", Kind.INT64: "<q", Kind.INT8: "<b", Kind.UINT32: "<I",
         Kind.FLOAT64: "<d", Kind.FLOAT32: "<f", Kind.BOOL: "<?", Kind.UINT16: "<H",
         Kind.INT32: "<i", Kind.UINT8: "<B", Kind.INT16: "<h"}

Rec = dict[str, Any]

RECS: list[Rec] = [
    {"timestamp_raw": 1_700_000_000_123_456_789, "proc.comm": "bash", "proc.pid": 42,
     "proc.creds.uid": 1000, "proc.creds.gid": 100, "delta": -5, "small": -128,
     "big": (1 << 63) - 1, "ratio": 0.25, "half": 1.5, "ok": True, "file": "/bin/true",
     "port": 65535, "args": [1, 2, 300]},
    {"timestamp_raw": 1, "proc.comm": "x" * 16, "proc.pid": 0, "delta": 1 << 62,
     "ratio": float("inf"), "file": "é\"quote\\back\nline\ttab", "ok": False},
    {"timestamp_raw": 2, "file": "a" * 299, "ratio": -0.0, "delta": -(1 << 63)},
]


def ev_schema() -> DataSourceSchema:
    fields, size = REG.fields("ev")
    return DataSourceSchema("ev", DataSourceType.SINGLE, tuple(fields), size)


def pack(schema: DataSourceSchema, recs: list[Rec]) -> Batch:
    """A batch whose records hold these values (zero elsewhere), as the ring hands them over."""
    rows = np.zeros((len(recs), schema.record_size), dtype=np.uint8)
    for i, r in enumerate(recs):
        buf = bytearray(schema.record_size)
        for name, v in r.items():
            f = schema.field(name)
            if f.base_kind is Kind.CSTRING:
                raw = str(v).encode()
                # stale ring memory after the NUL, as the kernel leaves it
                buf[f.offs: f.offs + f.size] = (raw + b"\0" + b"\xee" * f.size)[: f.size]
            elif f.is_array:
                width = struct.calcsize(_PACK[f.base_kind])
                for j, x in enumerate(v):
                    struct.pack_into(_PACK[f.base_kind], buf, f.offs + j * width, x)
            else:
                struct.pack_into(_PACK[f.base_kind], buf, f.offs, v)
        rows[i] = np.frombuffer(bytes(buf), dtype=np.uint8)
    return Batch(schema, rows)


def _value(f: Field, rec: Rec) -> Any:
    """What the record holds in ``f``, as the SDK takes it (a field not set is zero)."""
    v = rec.get(f.full_name)
    if f.is_array:
        return tuple(v or [0] * (f.size // struct.calcsize(_PACK[f.base_kind])))
    if f.base_kind in (Kind.CSTRING, Kind.STRING):
        return "" if v is None else v
    if f.base_kind is Kind.BOOL:
        return bool(v)
    if f.base_kind in (Kind.FLOAT32, Kind.FLOAT64):
        return 0.0 if v is None else float(v)
    return 0 if v is None else int(v)


def _fixed_size(f: Field) -> bool:
    return not f.is_array and f.base_kind not in (Kind.CSTRING, Kind.STRING, Kind.BYTES)


def sdk_request(schema: DataSourceSchema, recs: list[Rec], gadget: str,
                body_field: str = "") -> bytes:
    """The SDK's serialized ExportLogsServiceRequest for these records."""
    provider = LoggerProvider(resource=Resource(RESOURCE), shutdown_on_exit=False)
    exporter = InMemoryLogRecordExporter()
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    logger = provider.get_logger(gadget, VERSION, attributes={"gadget.datasource": schema.name})
    leaves = leaf_fields(schema)
    ordered = [f for f in leaves if _fixed_size(f)] + [f for f in leaves if not _fixed_size(f)]
    for rec in recs:
        body = _value(schema.field(body_field), rec) if body_field else gadget
        logger.emit(timestamp=rec.get("timestamp_raw"), observed_timestamp=OBSERVED_NS,
                    severity_number=SeverityNumber.INFO, severity_text="INFO", body=body,
                    attributes={f.annotations.get(ANNOTATION_LOGS_NAME, f.full_name):
                                _value(f, rec) for f in ordered})
    provider.shutdown()
    return bytes(encode_logs(exporter.get_finished_logs()).SerializeToString())


def sink_request(schema: DataSourceSchema, batch: Batch, gadget: str,
                 body_field: str = "") -> bytes:
    """The request the otel-logs sink sends for this batch (pipeline/sinks/otlp_logs.py)."""
    records = OtlpLogEncoder(schema, body=gadget, body_field=body_field).encode(batch,
                                                                               OBSERVED_NS)
    requests = logs_requests(otlp_resource(RESOURCE),
                             otlp_scope(gadget, VERSION, {"gadget.datasource": schema.name}),
                             records)
    assert len(requests) == 1
    return requests[0][0]


@pytest.mark.parametrize("body_field", ["", "file", "proc.pid"])
def test_the_sink_encodes_records_as_the_sdk_does(body_field: str) -> None:
    schema = ev_schema()
    sdk = sdk_request(schema, RECS, "trace_ev", body_field)
    assert sink_request(schema, pack(schema, RECS), "trace_ev", body_field) == sdk
    assert len(sdk) > 1000  # every record, with every attribute


def test_a_gadgets_real_records_encode_as_the_sdk_does() -> None:
    spec = Catalog().resolve("trace_open")
    # The BPF record (payload 0): pack() builds rows only, not the further payloads.
    schema = spec.datasources[0].with_fields(f for f in spec.datasources[0].fields
                                             if f.payload_index == 0)
    recs: list[Rec] = [
        {"timestamp_raw": 1_700_000_000_000_000_000 + i, "proc.comm": "cat",
         "proc.pid": 4000 + i, "fname": f"/etc/file{i}", "error_raw": i % 3, "fd": i}
        for i in range(50)]
    recs = [{k: v for k, v in r.items() if k in {f.full_name for f in leaf_fields(schema)}}
            for r in recs]
    assert any("fname" in r for r in recs) and len(recs[0]) >= 4
    sdk = sdk_request(schema, recs, spec.name)
    assert sink_request(schema, pack(schema, recs), spec.name) == sdk


def test_fields_in_extra_payloads_encode_as_the_sdk_does() -> None:
    fields = (Field("n", "n", 0, int(Kind.UINT32), 0, 0, 4, FieldFlag.STATIC_MEMBER),
              Field("s", "s", 1, int(Kind.STRING), payload_index=1),
              Field("raw", "raw", 2, int(Kind.BYTES), payload_index=2))
    schema = DataSourceSchema("d", DataSourceType.SINGLE, fields, 4, payload_count=3)
    batch = Batch(schema, np.array([[7, 0, 0, 0], [8, 0, 0, 0]], dtype=np.uint8),
                  ([b"hello", b""], [b"\x01\x02", b"\xff"]))
    provider = LoggerProvider(resource=Resource(RESOURCE), shutdown_on_exit=False)
    exporter = InMemoryLogRecordExporter()
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    logger = provider.get_logger("g", VERSION, attributes={"gadget.datasource": "d"})
    for n, s, raw in ((7, "hello", b"\x01\x02"), (8, "", b"\xff")):
        logger.emit(observed_timestamp=OBSERVED_NS, severity_number=SeverityNumber.INFO,
                    severity_text="INFO", body="g", attributes={"n": n, "s": s, "raw": raw})
    provider.shutdown()
    sdk = bytes(encode_logs(exporter.get_finished_logs()).SerializeToString())
    assert sink_request(schema, batch, "g") == sdk
