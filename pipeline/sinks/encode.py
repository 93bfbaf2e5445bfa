"""Per-batch encoders the sinks share: a JSON object per record, and OTLP ``LogRecord``s.

Both are compiled once per data source and work on whole batches: every field is read as one numpy
column (or one list of strings), turned into one list of encoded fragments, and the records are
assembled by joining the fragments column-wise. There is no dict per record and no protobuf object
per record (per-event objects cost 3-20x more, measured on the 2-core test machine).

JSON follows upstream's shape: fields nested under their parents (``{"proc":{"comm":…}}``),
named as the data source names them, without the fields annotated ``json.skip``. OTLP records
carry every value field as a typed attribute (int/double/bool/string, arrays as array values,
raw bytes as bytes), INFO severity, the event time from the data source's timestamp field, and a
body that is either a constant or a field.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from pipeline import wire
from pipeline.accessors import column, raw_slices, values
from pipeline.annotations import JSON_SKIP
from pipeline.batch import Batch
from pipeline.schema import NUMPY_DTYPE, DataSourceSchema, Field, Kind
from pipeline.sinks import otlpvec
from pipeline.sinks.jsonvec import JsonLines
from pipeline.wire import length_delimited as _ld
from pipeline.wire import varint as _varint

__all__ = [
    "JsonEncoder",
    "OtlpLogEncoder",
    "PerSchema",
    "leaf_fields",
    "logs_requests",
    "logs_requests_flat",
    "otlp_resource",
    "otlp_scope",
    "time_field",
]

ANNOTATION_LOGS_NAME = "logs.name"
"""Field annotation: the attribute key of this field in OTLP logs (upstream's name)."""
ANNOTATION_LOGS_BODY = "logs.body"
"""Data source annotation: the field whose value is the log body."""
TIMESTAMP_FIELD = "timestamp_raw"
TIMESTAMP_TAG = "type:gadget_timestamp"

SEVERITY_INFO = 9

_INT_KINDS = frozenset({Kind.INT8, Kind.INT16, Kind.INT32, Kind.INT64, Kind.UINT8, Kind.UINT16,
                        Kind.UINT32, Kind.UINT64})
_FLOAT_KINDS = frozenset({Kind.FLOAT32, Kind.FLOAT64})
_STRING_KINDS = frozenset({Kind.STRING, Kind.CSTRING})


_T = TypeVar("_T")


class PerSchema(Generic[_T]):
    """Something compiled once per data source (schemas hold dicts, so they do not hash: keyed
    by identity, holding the schema so its id cannot be reused while cached)."""

    def __init__(self, factory: Callable[[DataSourceSchema], _T]) -> None:
        self._factory = factory
        self._items: dict[int, tuple[DataSourceSchema, _T]] = {}

    def get(self, schema: DataSourceSchema) -> _T:
        hit = self._items.get(id(schema))
        if hit is not None and hit[0] is schema:
            return hit[1]
        value = self._factory(schema)
        self._items[id(schema)] = (schema, value)
        return value


def leaf_fields(schema: DataSourceSchema) -> list[Field]:
    """Value fields that are not parents of other fields, in schema order.

    A struct member such as ``proc`` has a value (its bytes) but is shown as an object of its
    children, like upstream does, so it is not a leaf.
    """
    parents = {f.parent for f in schema.fields if f.parent is not None}
    return [f for f in schema.fields if f.has_value and f.index not in parents]


def time_field(schema: DataSourceSchema) -> Field | None:
    """The field holding the event's wall-clock time in ns, if the data source has one."""
    for f in schema.fields:
        if f.full_name == TIMESTAMP_FIELD and f.has_value:
            return f
    for f in schema.fields:
        if TIMESTAMP_TAG in f.tags and f.has_value and not f.is_array:
            return f
    return None


_CSTRING_HEAD = 64
"""Bytes of a CString scanned at once for its NUL; longer strings take a slower path."""


def _cstrings_block(block: npt.NDArray[np.uint8]) -> list[bytes]:
    """Each row of a CString block cut at its first NUL, as valid UTF-8 bytes."""
    n, size = block.shape
    w = min(size, _CSTRING_HEAD)
    head = block[:, :w]
    nul = head == 0
    found = nul.any(axis=1)
    lens = np.where(found, nul.argmax(axis=1), w)
    inside = np.arange(w)[None, :] < lens[:, None]
    bad = (((head & 0x80) != 0) & inside).any(axis=1)
    flat = np.ascontiguousarray(head).tobytes()
    starts = (np.arange(n) * w).tolist()
    out = [flat[a: a + ln] for a, ln in zip(starts, lens.tolist(), strict=True)]
    # Rare: strings longer than the head, or not ASCII (must be valid UTF-8 for OTLP/JSON).
    for i in np.flatnonzero(~found | bad).tolist():
        b = block[i].tobytes().partition(b"\0")[0] if not found[i] else out[i]
        out[i] = _valid_utf8(b)
    return out


def _valid_utf8(b: bytes) -> bytes:
    if b.isascii():
        return b
    try:
        b.decode()
        return b
    except UnicodeDecodeError:
        return b.decode("utf-8", "replace").encode()


def cstring_bytes(batch: Batch, f: Field) -> list[bytes]:
    """A string field of every record as UTF-8 bytes, cut at the first NUL and made valid."""
    if f.base_kind is Kind.CSTRING and f.payload_index == 0 and f.size:
        return _cstrings_block(batch.rows[:, f.offs: f.offs + f.size])
    raw = [b.partition(b"\0")[0] if f.base_kind is Kind.CSTRING else b
           for b in raw_slices(batch, f)]
    return [_valid_utf8(b) for b in raw]


# --------------------------------------------------------------------------------------------
# JSON


def _json_ints(col: npt.NDArray[Any]) -> list[str]:
    return list(map(str, col.tolist()))


def _json_float(v: float) -> str:
    return repr(v) if math.isfinite(v) else "null"


def _json_column(batch: Batch, f: Field) -> list[str]:
    kind = f.base_kind
    if not f.is_array and kind in _INT_KINDS:
        return _json_ints(column(batch, f))
    if not f.is_array and kind is Kind.BOOL:
        return ["true" if v else "false" for v in column(batch, f).tolist()]
    if not f.is_array and kind in _FLOAT_KINDS:
        return [_json_float(v) for v in column(batch, f).tolist()]
    if not f.is_array and kind in _STRING_KINDS:
        return [encode_basestring_ascii(b.decode()) for b in cstring_bytes(batch, f)]
    if f.is_array and kind in NUMPY_DTYPE:
        out = []
        for vs in values(batch, f):
            items = (_json_float(v) if isinstance(v, float) else
                     ("true" if v is True else "false" if v is False else str(v)) for v in vs)
            out.append("[" + ",".join(items) + "]")
        return out
    return [encode_basestring_ascii(str(v)) for v in values(batch, f)]


@dataclass(frozen=True, slots=True)
class _Template:
    """A record's JSON as constant pieces interleaved with field values (None = a field)."""

    pieces: tuple[str | None, ...]
    fields: tuple[Field, ...]


def json_skipped(f: Field) -> bool:
    """Whether a field is left out of JSON (annotation ``json.skip``, as upstream)."""
    return str(f.annotations.get(JSON_SKIP, "")).lower() == "true"


def _json_template(schema: DataSourceSchema, constants: Mapping[str, str]) -> _Template:
    leaves = {f.index for f in leaf_fields(schema)}
    children: dict[int | None, list[Field]] = {}
    for f in schema.fields:
        children.setdefault(f.parent, []).append(f)

    def has_leaf(f: Field) -> bool:
        if json_skipped(f):
            return False  # upstream's JSON formatter leaves these out, children included
        return f.index in leaves or any(has_leaf(c) for c in children.get(f.index, ()))

    pieces: list[str | None] = []
    fields: list[Field] = []

    def emit(parent: int | None) -> bool:
        first = True
        for f in children.get(parent, ()):
            if not has_leaf(f):
                continue
            pieces.append(("" if first else ",") + encode_basestring_ascii(f.name) + ":")
            first = False
            if f.index in leaves:
                pieces.append(None)
                fields.append(f)
            else:
                pieces.append("{")
                emit(f.index)
                pieces.append("}")
        return not first

    pieces.append("{")
    some = emit(None)
    for key, value in constants.items():
        pieces.append(("," if some else "") + encode_basestring_ascii(key) + ":"
                      + encode_basestring_ascii(value))
        some = True
    pieces.append("}")
    merged: list[str | None] = []
    for p in pieces:
        if p is not None and merged and merged[-1] is not None:
            merged[-1] = str(merged[-1]) + p
        else:
            merged.append(p)
    return _Template(tuple(merged), tuple(fields))


class JsonEncoder:
    """One JSON object per record of a data source, as UTF-8 bytes; fields annotated
    ``json.skip`` are left out. Built for the whole batch at once by
    :class:`pipeline.sinks.jsonvec.JsonLines` (this module's per-value encoders are its
    fallback for kinds it has no vectorised form of).

    Example (trace_exec)::

        {"timestamp_raw":1732540000123456789,"proc":{"comm":"true","pid":4242,...},...}

    Args:
        schema: the data source.
        constants: members added to every object, after the fields (``{"node": "n1"}``).
    """

    def __init__(self, schema: DataSourceSchema, constants: Mapping[str, str] | None = None
                 ) -> None:
        self.schema = schema
        self._template = _json_template(schema, constants or {})
        self._lines = JsonLines(self._template.pieces, self._template.fields, _json_column)

    def encode_lines(self, batch: Batch) -> tuple[bytes | bytearray, npt.NDArray[np.intp]]:
        """Every record's JSON and a newline, concatenated, and where each line ends."""
        return self._lines.encode(batch)

    def encode(self, batch: Batch) -> list[bytes]:
        """Each record's JSON (no newline)."""
        data, ends = self._lines.encode(batch)
        if not len(ends):
            return []
        flat = bytes(data)
        starts = [0, *ends[:-1].tolist()]
        return [flat[a: b - 1] for a, b in zip(starts, ends.tolist(), strict=True)]

    def encode_array(self, batch: Batch) -> bytes:
        """The batch as one JSON array of its objects."""
        return b"[" + b",".join(self.encode(batch)) + b"]"


# --------------------------------------------------------------------------------------------
# Protobuf helpers (OTLP)



_AV_STRING = 0x0A
_AV_BOOL = 0x10
_AV_INT = 0x18
_AV_DOUBLE = 0x21
_AV_ARRAY = 0x2A
_AV_BYTES = 0x3A
# KeyValue: key = 1, value = 2
_KV_KEY = 0x0A
_KV_VALUE = 0x12
# LogRecord
_LR_TIME = 0x09
_LR_SEVERITY = 0x10
_LR_SEVERITY_TEXT = 0x1A
_LR_BODY = 0x2A
_LR_ATTRIBUTE = 0x32
_LR_OBSERVED = 0x59
# containers
_SCOPE_LOGS_RECORD = 0x12
_SCOPE_LOGS_SCOPE = 0x0A
_RESOURCE_LOGS_RESOURCE = 0x0A
_RESOURCE_LOGS_SCOPE_LOGS = 0x12
_REQUEST_RESOURCE_LOGS = 0x0A
_RESOURCE_ATTRIBUTE = 0x0A
_SCOPE_NAME = 0x0A
_SCOPE_VERSION = 0x12
_SCOPE_ATTRIBUTE = 0x1A


def any_value(v: Any) -> bytes:
    """An ``AnyValue`` for a Python value (the slow, general path)."""
    if isinstance(v, bool):
        return bytes([_AV_BOOL, int(v)])
    if isinstance(v, int):
        return bytes([_AV_INT]) + _varint(v)
    if isinstance(v, float):
        return bytes([_AV_DOUBLE]) + np.float64(v).tobytes()
    if isinstance(v, bytes):
        return _ld(_AV_BYTES, v)
    if isinstance(v, (list, tuple)):
        return _ld(_AV_ARRAY, b"".join(_ld(0x0A, any_value(x)) for x in v))
    return _ld(_AV_STRING, str(v).encode())


def key_value(key: str, v: Any) -> bytes:
    return _ld(_KV_KEY, key.encode()) + _ld(_KV_VALUE, any_value(v))


def otlp_resource(attributes: dict[str, Any]) -> bytes:
    """A ``Resource`` message with these attributes."""
    return b"".join(_ld(_RESOURCE_ATTRIBUTE, key_value(k, v)) for k, v in attributes.items())


def otlp_scope(name: str, version: str, attributes: dict[str, Any] | None = None) -> bytes:
    """An ``InstrumentationScope`` message."""
    out = _ld(_SCOPE_NAME, name.encode()) + _ld(_SCOPE_VERSION, version.encode())
    for k, v in (attributes or {}).items():
        out += _ld(_SCOPE_ATTRIBUTE, key_value(k, v))
    return out


def logs_requests(resource: bytes, scope: bytes, records: Sequence[bytes],
                  max_bytes: int = 0) -> list[tuple[bytes, int]]:
    """``ExportLogsServiceRequest``s holding ``records`` (each already a tagged ScopeLogs
    entry, as :meth:`OtlpLogEncoder.encode` returns them), split so that each request stays
    under ``max_bytes`` (0: one request). Returns (request, record count) pairs."""
    head = _ld(_SCOPE_LOGS_SCOPE, scope)
    res = _ld(_RESOURCE_LOGS_RESOURCE, resource)
    groups: list[list[bytes]] = []
    budget = max_bytes - len(head) - len(res) - 32 if max_bytes else 0
    cur: list[bytes] = []
    size = 0
    for r in records:
        if budget and cur and size + len(r) > budget:
            groups.append(cur)
            cur, size = [], 0
        cur.append(r)
        size += len(r)
    if cur:
        groups.append(cur)
    out = []
    for g in groups:
        scope_logs = head + b"".join(g)
        rl = res + _ld(_RESOURCE_LOGS_SCOPE_LOGS, scope_logs)
        out.append((_ld(_REQUEST_RESOURCE_LOGS, rl), len(g)))
    return out


def logs_requests_flat(resource: bytes, scope: bytes, records: bytes | bytearray,
                       lens: npt.NDArray[np.int64], max_bytes: int = 0
                       ) -> list[tuple[bytes, int]]:
    """:func:`logs_requests` for records given one after the other in ``records`` with their
    lengths (what :meth:`OtlpLogEncoder.encode_flat` returns): the split points are found on
    the running total, and each request copies its run of records once."""
    head = _ld(_SCOPE_LOGS_SCOPE, scope)
    res = _ld(_RESOURCE_LOGS_RESOURCE, resource)
    n = len(lens)
    if n == 0:
        return []
    ends = np.cumsum(lens)
    budget = max_bytes - len(head) - len(res) - 32 if max_bytes else 0
    cuts = [0]
    while cuts[-1] < n:
        start = cuts[-1]
        if not budget:
            cuts.append(n)
            continue
        base = int(ends[start - 1]) if start else 0
        # the last record that still fits, but at least one per request
        stop = int(np.searchsorted(ends, base + budget, side="right"))
        cuts.append(max(stop, start + 1))
    view = memoryview(records)
    out = []
    for a, b in itertools.pairwise(cuts):
        lo = int(ends[a - 1]) if a else 0
        scope_logs = head + view[lo: int(ends[b - 1])]
        rl = res + _ld(_RESOURCE_LOGS_SCOPE_LOGS, scope_logs)
        out.append((_ld(_REQUEST_RESOURCE_LOGS, rl), b - a))
    return out


# --------------------------------------------------------------------------------------------
# OTLP LogRecords


Block = tuple[npt.NDArray[np.uint8], npt.NDArray[np.intp] | None]
"""Bytes of one part of every record: a (n, width) matrix and each row's used length (None:
the whole width)."""


def _fixed_block(n: int, data: bytes) -> Block:
    return wire.repeated(data, n), None


def _fixed64_block(tag: int, v: npt.NDArray[Any]) -> Block:
    n = v.shape[0]
    m = np.empty((n, 9), dtype=np.uint8)
    m[:, 0] = tag
    m[:, 1:] = np.ascontiguousarray(v.astype("<u8")).view(np.uint8).reshape(n, 8)
    return m, None


def _kv_prefix(key: bytes, value_len: int) -> bytes:
    """What precedes a KeyValue's AnyValue payload inside a LogRecord attribute entry."""
    kv_len = 1 + len(_varint(len(key))) + len(key) + 1 + len(_varint(value_len)) + value_len
    return (bytes([_LR_ATTRIBUTE]) + _varint(kv_len) + bytes([_KV_KEY]) + _varint(len(key))
            + key + bytes([_KV_VALUE]) + _varint(value_len))


def _double_block(key: bytes, col: npt.NDArray[Any]) -> Block:
    n = col.shape[0]
    p = _kv_prefix(key, 9) + bytes([_AV_DOUBLE])
    m = np.empty((n, len(p) + 8), dtype=np.uint8)
    m[:, : len(p)] = np.frombuffer(p, dtype=np.uint8)
    m[:, len(p):] = np.ascontiguousarray(col.astype("<f8")).view(np.uint8).reshape(n, 8)
    return m, None


def _bool_block(key: bytes, col: npt.NDArray[Any]) -> Block:
    n = col.shape[0]
    p = _kv_prefix(key, 2) + bytes([_AV_BOOL])
    m = np.empty((n, len(p) + 1), dtype=np.uint8)
    m[:, : len(p)] = np.frombuffer(p, dtype=np.uint8)
    m[:, len(p)] = col.astype(np.uint8)
    return m, None


class OtlpLogEncoder:
    """``LogRecord``s for one data source, each already framed as a ``ScopeLogs.log_records``
    entry, so a request is a concatenation (:func:`logs_requests`).

    Args:
        schema: the data source.
        body: a constant body (the gadget's name, say) used when ``body_field`` is empty.
        body_field: a field whose value is the body; default: the data source's ``logs.body``
            annotation, if any.
    """

    def __init__(self, schema: DataSourceSchema, body: str = "",
                 body_field: str = "") -> None:
        self.schema = schema
        body_field = body_field or schema.annotations.get(ANNOTATION_LOGS_BODY, "")
        self._body_field = schema.field(body_field) if body_field else None
        self._time = time_field(schema)
        self._const_head = (bytes([_LR_SEVERITY, SEVERITY_INFO])
                            + _ld(_LR_SEVERITY_TEXT, b"INFO"))
        if self._body_field is None and body:
            self._const_head += _ld(_LR_BODY, _ld(_AV_STRING, body.encode()))
        self._attrs: list[tuple[Field, bytes]] = [
            (f, f.annotations.get(ANNOTATION_LOGS_NAME, f.full_name).encode())
            for f in leaf_fields(schema)]
        self._strings = {f.index for f, _ in self._attrs
                         if not f.is_array and f.base_kind in _STRING_KINDS}

    @staticmethod
    def _body_values(batch: Batch, f: Field) -> list[Any]:
        if not f.is_array and f.base_kind in _STRING_KINDS:
            return list(cstring_bytes(batch, f))
        return values(batch, f)

    def encode_flat(self, batch: Batch, observed_ns: int
                    ) -> tuple[bytearray, npt.NDArray[np.int64]]:
        """Every record as a framed ``LogRecord`` (see :meth:`encode`), one after the other,
        and each one's length: built as blocks of the whole batch (pipeline/sinks/otlpvec.py).
        """
        n = len(batch)
        payloads: dict[int, npt.NDArray[np.uint8]] = {}
        parts: list[otlpvec.Part] = []
        if self._time is not None:
            parts.append([_fixed64_block(_LR_TIME, otlpvec.column(batch, self._time, payloads))])
        parts.append([_fixed_block(n, self._const_head)])
        if self._body_field is not None:
            parts.append(self._body_part(batch, self._body_field, payloads))
        for f, key in self._attrs:
            if f.is_array:
                continue
            kind = f.base_kind
            if kind in _INT_KINDS:
                parts.append(otlpvec.int_attribute(key)(otlpvec.column(batch, f, payloads)))
            elif kind in _FLOAT_KINDS:
                parts.append([_double_block(key, otlpvec.column(batch, f, payloads))])
            elif kind is Kind.BOOL:
                parts.append([_bool_block(key, otlpvec.column(batch, f, payloads))])
        for f, key in self._attrs:
            if f.index in self._strings:
                parts.append(otlpvec.string_attribute(key, batch, f, payloads))
            elif f.is_array or f.base_kind not in NUMPY_DTYPE:
                vals = values(batch, f) if f.is_array else raw_slices(batch, f)
                entries = [_ld(_LR_ATTRIBUTE, _ld(_KV_KEY, key) + _ld(_KV_VALUE, any_value(v)))
                           for v in vals]
                parts.append([otlpvec.bytes_block(entries)])
        parts.append([_fixed_block(n, bytes([_LR_OBSERVED]) + observed_ns.to_bytes(8, "little"))])
        return otlpvec.record_blocks(parts, n)

    def _body_part(self, batch: Batch, f: Field,
                   payloads: dict[int, npt.NDArray[np.uint8]]) -> otlpvec.Part:
        """``LogRecord.body`` from a field: a string as blocks, anything else per record."""
        n = len(batch)
        if not f.is_array and f.base_kind in _STRING_KINDS:
            value = otlpvec.string_value(batch, f, payloads)
            av_len = np.zeros(n, dtype=np.int64)
            for m, used in value:
                av_len += m.shape[1] if used is None else used
            return [_fixed_block(n, bytes([_LR_BODY])), wire.varint_block(av_len), *value]
        entries = [_ld(_LR_BODY, any_value(v)) for v in self._body_values(batch, f)]
        return [otlpvec.bytes_block(entries)]

    def encode(self, batch: Batch, observed_ns: int) -> list[bytes]:
        """Each record as a framed ``LogRecord``; ``observed_ns`` is when the batch was read.

        A record's fields come in field-number order, as protobuf serializers write them (so the
        bytes are the SDK exporter's for the same record, tests/unit/test_otlp_sdk.py): time,
        severity number and text, body, the attributes (the fixed-size ones first, then the
        others, each group in schema order), observed time.
        """
        if not len(batch):
            return []
        data, lens = self.encode_flat(batch, observed_ns)
        flat = bytes(data)
        ends = np.cumsum(lens).tolist()
        return [flat[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
