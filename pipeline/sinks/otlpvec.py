"""OTLP ``LogRecord``s for a whole batch as byte blocks: no Python work per record.

Every part of a record is a block with one row per record (pipeline/wire.py ``Block``): the
time as a fixed64 column, severity and constant body as a broadcast constant, each integer
attribute as its key's prefix and the value's varint (with the KeyValue's and the AnyValue's
lengths, which follow the varint's length, as varint blocks of their own), each string
attribute likewise around the string's bytes, cut from the record or from a derived payload.
:func:`pipeline.wire.assemble` lays the blocks of each record one after the other. A coded
payload column (an errno name, a user name) has each distinct value's whole attribute encoded
once and gathered per record. Kinds with no block form here (arrays, raw bytes) are encoded per
record by :func:`pipeline.sinks.encode.any_value`, and joined as a block the same way.

The bytes are canonical protobuf, field after field as protobuf serializers write them (the
order is :class:`pipeline.sinks.encode.OtlpLogEncoder`'s).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.batch import Batch, Coded, Fixed, FormColumn, LazyColumn
from pipeline.schema import KIND_WIDTH, NUMPY_DTYPE, Field, Kind
from pipeline.sinks.jsonvec import payload_source
from pipeline.wire import Block, assemble, const_block, varint, varint_block, varint_lengths

__all__ = ["Part", "bytes_block", "column", "int_attribute", "record_blocks",
           "string_attribute", "string_value", "text_block"]

_LR_ATTRIBUTE = 0x32
_KV_KEY = 0x0A
_KV_VALUE = 0x12
_AV_STRING = 0x0A
_AV_INT = 0x18
_SCOPE_LOGS_RECORD = 0x12

Part = list[Block]
"""Blocks that together make one part of every record (an attribute, the time...)."""


def _used(block: Block, n: int) -> npt.NDArray[np.int64]:
    m, used = block
    return np.full(n, m.shape[1], dtype=np.int64) if used is None else used.astype(np.int64)


def _length(part: Part, n: int) -> npt.NDArray[np.int64]:
    total = np.zeros(n, dtype=np.int64)
    for b in part:
        total += _used(b, n)
    return total


def _key_head(key: bytes) -> bytes:
    """A KeyValue's key field and the value's tag (what follows the KeyValue's length)."""
    return bytes([_KV_KEY]) + varint(len(key)) + key + bytes([_KV_VALUE])


def _wrap(key: bytes, value: Part, n: int) -> Part:
    """``LogRecord.attributes`` entries (KeyValue ``key`` = each row of ``value``, an AnyValue
    message)."""
    av_len = _length(value, n)
    head = _key_head(key)
    kv_len = len(head) + varint_lengths(av_len) + av_len
    return [const_block(n, bytes([_LR_ATTRIBUTE])), varint_block(kv_len),
            const_block(n, head), varint_block(av_len), *value]


def _form(col: Sequence[bytes]) -> Coded | Fixed | None:
    if isinstance(col, LazyColumn):
        return col.form()
    if isinstance(col, FormColumn):
        return col.form
    return None


def column(batch: Batch, f: Field, payloads: dict[int, npt.NDArray[np.uint8]]
           ) -> npt.NDArray[Any]:
    """A fixed-width member as a numpy column (payload 0 or a struct payload)."""
    width = KIND_WIDTH[f.base_kind]
    raw = payload_source(batch, f, payloads)[:, f.offs: f.offs + width]
    if raw.shape[1] < width:
        raw = np.pad(raw, ((0, 0), (0, width - raw.shape[1])))
    col = np.ascontiguousarray(raw).view(NUMPY_DTYPE[f.base_kind]).reshape(-1)
    return col == 1 if f.base_kind is Kind.BOOL else col


def int_attribute(key: bytes) -> Callable[[npt.NDArray[Any]], Part]:
    """An int attribute's blocks from its column: int_value is an int64, so negative numbers
    are sign-extended to 10 bytes and uint64 values keep their bits (above 2^63 they read back
    negative, as in any OTLP exporter)."""

    def build(col: npt.NDArray[Any]) -> Part:
        v = col.astype(np.int64).view(np.uint64) if col.dtype.kind == "i" else \
            col.astype(np.uint64)
        n = len(v)
        if n and int(v.min()) == int(v.max()):  # one value for the batch: encoded once
            value = bytes([_AV_INT]) + varint(int(v[0]))
            kv = _key_head(key) + varint(len(value)) + value
            return [const_block(n, bytes([_LR_ATTRIBUTE]) + varint(len(kv)) + kv)]
        return _wrap(key, [const_block(n, bytes([_AV_INT])), varint_block(v)], n)

    return build


def _valid(raw: bytes) -> bytes:
    """Bytes as valid UTF-8 (OTLP strings must be), invalid sequences replaced."""
    try:
        raw.decode()
        return raw
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace").encode()


def text_block(block: npt.NDArray[np.uint8], lens: npt.NDArray[np.int64]) -> Block:
    """Strings (the first ``lens`` bytes of each row) as valid UTF-8: rows with bytes outside
    ASCII are checked, and repaired, one by one."""
    width = block.shape[1]
    if width and int(block.max()) >= 0x80:
        inside = np.arange(width)[None, :] < lens[:, None]
        rows = np.flatnonzero(((block >= 0x80) & inside).any(axis=1))
        fixed = {r: _valid(block[r, : lens[r]].tobytes()) for r in rows.tolist()}
        changed = {r: v for r, v in fixed.items()
                   if len(v) != lens[r] or v != block[r, : lens[r]].tobytes()}
        if changed:
            wide = max(width, max(len(v) for v in changed.values()))
            out = np.zeros((block.shape[0], wide), dtype=np.uint8)
            out[:, :width] = block
            lens = lens.copy()
            for r, v in changed.items():
                out[r, :] = 0
                out[r, : len(v)] = np.frombuffer(v, dtype=np.uint8)
                lens[r] = len(v)
            return out, lens
    return block, lens


def _nul_cut(block: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
    n, size = block.shape
    if size == 0:
        return np.zeros(n, dtype=np.int64)
    first = block.argmin(axis=1)
    has = block[np.arange(n), first] == 0
    lens: npt.NDArray[np.int64] = np.where(has, first, size).astype(np.int64)
    return lens


def _string_value(strings: Block, n: int) -> Part:
    """AnyValue{string_value} of each row of a (valid UTF-8) string block."""
    return [const_block(n, bytes([_AV_STRING])), varint_block(_used(strings, n)), strings]


def bytes_block(values: Sequence[bytes]) -> tuple[npt.NDArray[np.uint8],
                                                   npt.NDArray[np.int64]]:
    """Per-record byte strings as one NUL-padded block and their lengths."""
    n = len(values)
    lens = np.fromiter(map(len, values), dtype=np.int64, count=n)
    width = max(1, int(lens.max(initial=0)))
    block = np.frombuffer(np.array(values, dtype=f"S{width}").tobytes(),
                          dtype=np.uint8).reshape(n, width)
    return block, lens


def _coded_value(form: Coded, cstring: bool, n: int) -> Part:
    """A coded string column's AnyValues: each distinct value encoded once, gathered."""
    entries = []
    for v in form.table:
        s = _valid(v.partition(b"\0")[0] if cstring else v)
        entries.append(bytes([_AV_STRING]) + varint(len(s)) + s)
    lens = np.fromiter(map(len, entries), dtype=np.int64, count=len(entries))
    table = np.zeros((len(entries), max(1, int(lens.max(initial=0)))), dtype=np.uint8)
    for i, e in enumerate(entries):
        table[i, : len(e)] = np.frombuffer(e, dtype=np.uint8)
    codes = form.codes
    if n and (len(entries) == 1 or bool((codes == codes[0]).all())):
        one = int(codes[0])
        return [(np.broadcast_to(table[one, : lens[one]], (n, int(lens[one]))), None)]
    return [(table[codes], lens[codes])]


def string_value(batch: Batch, f: Field, payloads: dict[int, npt.NDArray[np.uint8]]) -> Part:
    """A string field (a C string member, or a payload of its own) as AnyValue blocks."""
    n = len(batch)
    cstring = f.base_kind is Kind.CSTRING
    if f.payload_index == 0 or f.size:
        block = np.ascontiguousarray(payload_source(batch, f, payloads)[:, f.offs: f.offs + f.size])
        lens = _nul_cut(block) if cstring else np.full(n, block.shape[1], dtype=np.int64)
        return _string_value(text_block(block, lens), n)
    col = batch.extra[f.payload_index - 1]
    form = _form(col)
    if isinstance(form, Coded):
        return _coded_value(form, cstring, n)
    if isinstance(form, Fixed):
        block = form.matrix
        lens = _nul_cut(block) if cstring else np.full(n, block.shape[1], dtype=np.int64)
        return _string_value(text_block(block, lens), n)
    raw, raw_lens = bytes_block([v.partition(b"\0")[0] if cstring else v for v in col])
    return _string_value(text_block(raw, raw_lens), n)


def string_attribute(key: bytes, batch: Batch, f: Field,
                     payloads: dict[int, npt.NDArray[np.uint8]]) -> Part:
    """A string field as ``LogRecord.attributes`` entry blocks."""
    return _wrap(key, string_value(batch, f, payloads), len(batch))


def record_blocks(parts: list[Part], n: int) -> tuple[bytearray, npt.NDArray[np.int64]]:
    """Each record's parts as one ``ScopeLogs.log_records`` entry (tag, length, LogRecord),
    all records one after the other, and each entry's length."""
    blocks = [b for part in parts for b in part]
    rec_len = np.zeros(n, dtype=np.int64)
    for b in blocks:
        rec_len += _used(b, n)
    framed = [const_block(n, bytes([_SCOPE_LOGS_RECORD])), varint_block(rec_len), *blocks]
    return assemble(framed, n)
