"""Protobuf wire bytes of gadget service messages, built per batch without message objects.

Only the handful of messages on the hot path are hand-encoded here (``GadgetEvent`` carrying a
``GadgetData`` or ``GadgetDataArray``, and gRPC's length-prefixed framing); everything else uses
the generated classes. Field numbers below are the proto's: GadgetEvent{type=1, seq=2, payload=3,
dataSourceID=4}, GadgetData{data=3}, GadgetDataArray{dataArray=3}, DataElement{payload=1}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.batch import Batch, LazyColumn, object_column

EVENT_TYPE_PAYLOAD = 0
EVENT_TYPE_INFO = 4
EVENT_LOG_SHIFT = 16

_TAG_EVENT_TYPE = 0x08
_TAG_EVENT_SEQ = 0x10
_TAG_EVENT_PAYLOAD = 0x1A
_TAG_EVENT_DSID = 0x20
_TAG_DATA = 0x1A  # GadgetData.data and GadgetDataArray.dataArray are both field 3, bytes
_TAG_PAYLOAD = 0x0A  # DataElement.payload

# The largest value of each varint length; seq is a uint32 so five bytes is the most.
_VARINT_LIMITS = np.array([1 << 7, 1 << 14, 1 << 21, 1 << 28], dtype=np.uint64)
_VARINT_LIMITS_64 = np.array([1 << (7 * k) for k in range(1, 10)], dtype=np.uint64)


def varint(value: int) -> bytes:
    """Protobuf base-128 varint; negative int64 values take their two's-complement 64 bits."""
    value &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(tag: int, data: bytes) -> bytes:
    return bytes([tag]) + varint(len(data)) + data


def grpc_frame(message: bytes) -> bytes:
    """gRPC's message framing: uncompressed flag, big-endian length, message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def gadget_event(type_: int, seq: int, payload: bytes, ds_id: int = 0) -> bytes:
    out = bytearray()
    if type_:
        out += bytes([_TAG_EVENT_TYPE]) + varint(type_)
    if seq:
        out += bytes([_TAG_EVENT_SEQ]) + varint(seq)
    if payload:
        out += length_delimited(_TAG_EVENT_PAYLOAD, payload)
    if ds_id:
        out += bytes([_TAG_EVENT_DSID]) + varint(ds_id)
    return bytes(out)


def data_element(payloads: list[bytes]) -> bytes:
    return b"".join(length_delimited(_TAG_PAYLOAD, p) for p in payloads)


def _varint_lengths(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.intp]:
    return np.searchsorted(_VARINT_LIMITS, values, side="right") + 1


def _put_varints(out: npt.NDArray[np.uint8], col: int, values: npt.NDArray[np.uint64],
                 length: int) -> None:
    for k in range(length):
        byte = (values >> np.uint64(7 * k)) & np.uint64(0x7F)
        if k < length - 1:
            byte |= np.uint64(0x80)
        out[:, col + k] = byte


def _element_prefix(record_size: int) -> bytes:
    """What precedes payload 0 inside a one-payload DataElement: its tag and length."""
    return bytes([_TAG_PAYLOAD]) + varint(record_size)


def per_record_events(batch: Batch, first_seq: int, ds_id: int) -> bytes:
    """One framed ``GadgetEvent{seq, GadgetData}`` per record, concatenated.

    ``first_seq`` is the seq of the first record; record ``i`` gets ``first_seq + i`` (mod 2^32).
    """
    n = len(batch)
    if n == 0:
        return b""
    if batch.extra:
        return _per_record_events_general(batch, first_seq, ds_id)
    size = batch.schema.record_size
    element = _element_prefix(size)
    de_len = len(element) + size
    gd_head = bytes([_TAG_DATA]) + varint(de_len)
    gd_len = len(gd_head) + de_len
    payload_head = bytes([_TAG_EVENT_PAYLOAD]) + varint(gd_len) + gd_head + element
    tail = bytes([_TAG_EVENT_DSID]) + varint(ds_id) if ds_id else b""
    seqs = (np.arange(first_seq, first_seq + n, dtype=np.uint64)) & np.uint64(0xFFFFFFFF)
    lengths = _varint_lengths(seqs)
    # seq == 0 (after a wrap) is still written explicitly: decoders accept it and the length
    # stays uniform with its neighbours.
    parts: list[bytes] = []
    start = 0
    while start < n:
        vlen = int(lengths[start])
        stop = start + int(np.argmax(lengths[start:] != vlen)) if (lengths[start:] != vlen).any() \
            else n
        ge_len = 1 + vlen + len(payload_head) + size + len(tail)
        head = b"\x00" + ge_len.to_bytes(4, "big") + bytes([_TAG_EVENT_SEQ])
        frame = len(head) + vlen + len(payload_head) + size + len(tail)
        out = np.empty((stop - start, frame), dtype=np.uint8)
        out[:, : len(head)] = np.frombuffer(head, dtype=np.uint8)
        col = len(head)
        _put_varints(out, col, seqs[start:stop], vlen)
        col += vlen
        out[:, col: col + len(payload_head)] = np.frombuffer(payload_head, dtype=np.uint8)
        col += len(payload_head)
        out[:, col: col + size] = batch.rows[start:stop]
        col += size
        if tail:
            out[:, col:] = np.frombuffer(tail, dtype=np.uint8)
        parts.append(out.tobytes())
        start = stop
    return b"".join(parts)


def _per_record_events_general(batch: Batch, first_seq: int, ds_id: int) -> bytes:
    """Framed events of records with further payloads (derived fields, enrichment), built per
    batch: each record's variable header from numpy columns, then one join of the pieces."""
    n = len(batch)
    pieces, de_len = _element_pieces(batch)
    seqs = np.arange(first_seq, first_seq + n, dtype=np.uint64) & np.uint64(0xFFFFFFFF)
    gd_len = 1 + _varint_len(de_len) + de_len
    tail = bytes([_TAG_EVENT_DSID]) + varint(ds_id) if ds_id else b""
    ev_len = 1 + _varint_len(seqs) + 1 + _varint_len(gd_len) + gd_len + len(tail)
    head = _concat_blocks(n, [
        _const_block(n, b"\x00"),
        (ev_len.astype(">u4").view(np.uint8).reshape(n, 4), None),
        _const_block(n, bytes([_TAG_EVENT_SEQ])), _varint_block(seqs),
        _const_block(n, bytes([_TAG_EVENT_PAYLOAD])), _varint_block(gd_len),
        _const_block(n, bytes([_TAG_DATA])), _varint_block(de_len),
        _const_block(n, _element_prefix(batch.schema.record_size)),
    ])
    out = np.empty((n, pieces.shape[1] + 1 + (1 if tail else 0)), dtype=object)
    out[:, 0] = _ragged_rows(*head)
    out[:, 1: 1 + pieces.shape[1]] = pieces
    if tail:
        out[:, -1] = tail
    return b"".join(out.ravel().tolist())


Block = tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64] | None]
"""Bytes of one part of every record: a (n, width) matrix and each row's used length (None:
the whole width)."""


def _const_block(n: int, data: bytes) -> Block:
    return np.broadcast_to(np.frombuffer(data, dtype=np.uint8), (n, len(data))), None


def _varint_len(values: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    """Bytes of each value's varint (values below 2^63)."""
    lens: npt.NDArray[np.int64] = np.searchsorted(
        _VARINT_LIMITS_64, values.astype(np.uint64), side="right").astype(np.int64) + 1
    return lens


def _varint_block(values: npt.NDArray[Any]) -> Block:
    v = values.astype(np.uint64)
    lens = _varint_len(v)
    width = int(lens.max(initial=1))
    mat = np.empty((len(v), width), dtype=np.uint8)
    for k in range(width):
        byte = (v >> np.uint64(7 * k)) & np.uint64(0x7F)
        mat[:, k] = byte | ((lens > k + 1).astype(np.uint64) << np.uint64(7))
    return mat, lens


def _concat_blocks(n: int, blocks: list[Block]) -> tuple[npt.NDArray[np.uint8],
                                                         npt.NDArray[np.int64]]:
    """Each record's blocks one after the other, left-aligned in one matrix, and its length."""
    width = sum(m.shape[1] for m, _ in blocks)
    out = np.zeros((n, width), dtype=np.uint8)
    pos = np.zeros(n, dtype=np.int64)
    rows = np.arange(n)
    for m, used in blocks:
        if used is None and not pos.any():
            out[:, : m.shape[1]] = m  # still aligned: every row has the same length so far
        elif used is None and (pos == pos[0]).all():
            p = int(pos[0])
            out[:, p: p + m.shape[1]] = m
        else:
            for k in range(m.shape[1]):
                sel = rows if used is None else np.flatnonzero(used > k)
                out[sel, pos[sel] + k] = m[sel, k]
        pos += m.shape[1] if used is None else used
    return out, pos


def _ragged_rows(mat: npt.NDArray[np.uint8], used: npt.NDArray[np.int64],
                 ) -> npt.NDArray[np.object_]:
    """Row ``i``'s first ``used[i]`` bytes as a bytes object, for every row (one numpy pass
    per distinct length)."""
    out = np.empty(len(used), dtype=object)
    for length in np.unique(used).tolist():
        sel = np.flatnonzero(used == length)
        if length == 0:
            out[sel] = b""
            continue
        part = np.ascontiguousarray(mat[sel, :length])
        out[sel] = part.view(f"V{length}").reshape(-1).tolist()
    return out


def _row_bytes(rows: npt.NDArray[np.uint8]) -> list[bytes]:
    """Each row as a bytes object (a void view converts in C, trailing zeros kept)."""
    n, width = rows.shape
    if width == 0:
        return [b""] * n
    out: list[bytes] = np.ascontiguousarray(rows).view(f"V{width}").reshape(-1).tolist()
    return out


def _payload_entries(col: Sequence[bytes], n: int) -> tuple[list[npt.NDArray[np.object_]],
                                                            npt.NDArray[np.int64]]:
    """One further payload of every record as ``DataElement.payload`` entries (tag, length,
    bytes): the object columns to join and each record's encoded length. A coded column
    (pipeline/derive) encodes each distinct value once."""
    coded = col.coded() if isinstance(col, LazyColumn) else None
    if coded is not None:
        table = [length_delimited(_TAG_PAYLOAD, v) for v in coded.table]
        lens = np.fromiter(map(len, table), dtype=np.int64, count=len(table))
        return [object_column(table)[coded.codes]], lens[coded.codes]
    values = list(col)
    vlen = np.fromiter(map(len, values), dtype=np.int64, count=n)
    prefix = _concat_blocks(n, [_const_block(n, bytes([_TAG_PAYLOAD])), _varint_block(vlen)])
    return [_ragged_rows(*prefix), object_column(values)], prefix[1] + vlen


def _element_pieces(batch: Batch) -> tuple[npt.NDArray[np.object_], npt.NDArray[np.int64]]:
    """Each record's ``DataElement`` after payload 0's tag and length, as pieces to join (the
    row, then each further payload's entry), and the DataElement's total length."""
    n = len(batch)
    size = batch.schema.record_size
    cols: list[npt.NDArray[np.object_]] = [object_column(_row_bytes(batch.rows))]
    de_len = np.full(n, len(_element_prefix(size)) + size, dtype=np.int64)
    for col in batch.extra:
        parts, lens = _payload_entries(col, n)
        cols.extend(parts)
        de_len += lens
    pieces = np.empty((n, len(cols)), dtype=object)
    for j, c in enumerate(cols):
        pieces[:, j] = c
    return pieces, de_len


def data_elements(batch: Batch) -> list[bytes]:
    """Each record's ``DataElement`` bytes."""
    n = len(batch)
    size = batch.schema.record_size
    head = _element_prefix(size)
    if batch.extra and n:
        pieces, _ = _element_pieces(batch)
        with_head = np.empty((n, pieces.shape[1] + 1), dtype=object)
        with_head[:, 0] = head
        with_head[:, 1:] = pieces
        return list(map(b"".join, with_head.tolist()))
    out = np.empty((n, len(head) + size), dtype=np.uint8)
    out[:, : len(head)] = np.frombuffer(head, dtype=np.uint8)
    out[:, len(head):] = batch.rows
    return _row_bytes(out) if n else []


def gadget_data_array(batch: Batch) -> bytes:
    """A ``GadgetDataArray`` holding every record of the batch."""
    n = len(batch)
    size = batch.schema.record_size
    element = _element_prefix(size)
    if not batch.extra and n:
        head = bytes([_TAG_DATA]) + varint(len(element) + size) + element
        out = np.empty((n, len(head) + size), dtype=np.uint8)
        out[:, : len(head)] = np.frombuffer(head, dtype=np.uint8)
        out[:, len(head):] = batch.rows
        return out.tobytes()
    if n == 0:
        return b""
    pieces, de_len = _element_pieces(batch)
    heads = _concat_blocks(n, [_const_block(n, bytes([_TAG_DATA])), _varint_block(de_len),
                               _const_block(n, element)])
    out_o = np.empty((n, pieces.shape[1] + 1), dtype=object)
    out_o[:, 0] = _ragged_rows(*heads)
    out_o[:, 1:] = pieces
    return b"".join(out_o.ravel().tolist())


def gadget_data(batch: Batch) -> list[bytes]:
    """Each record as a serialized ``GadgetData`` (for sinks that want one message per record)."""
    return [length_delimited(_TAG_DATA, de) for de in data_elements(batch)]


def array_events(batch: Batch, first_seq: int, ds_id: int,
                 max_per_packet: int) -> tuple[bytes, int]:
    """Framed ``GadgetEvent``s each carrying up to ``max_per_packet`` records as a
    ``GadgetDataArray``; returns the bytes and how many packets (seq values) were used."""
    n = len(batch)
    parts = []
    packets = 0
    for start in range(0, max(n, 1), max_per_packet):
        chunk = batch.slice(start, start + max_per_packet)
        seq = (first_seq + packets) & 0xFFFFFFFF
        parts.append(grpc_frame(gadget_event(EVENT_TYPE_PAYLOAD, seq, gadget_data_array(chunk),
                                             ds_id)))
        packets += 1
    return b"".join(parts), packets


def log_event(severity: int, message: str) -> bytes:
    """A framed log ``GadgetEvent``: ``type = severity << 16``, seq 0."""
    return grpc_frame(gadget_event(severity << EVENT_LOG_SHIFT, 0, message.encode()))


def info_event(gadget_info: bytes) -> bytes:
    return grpc_frame(gadget_event(EVENT_TYPE_INFO, 0, gadget_info))
