"""Protobuf wire bytes of gadget service messages, built per batch without message objects.

Only the handful of messages on the hot path are hand-encoded here (``GadgetEvent`` carrying a
``GadgetData`` or ``GadgetDataArray``, and gRPC's length-prefixed framing); everything else uses
the generated classes. Field numbers below are the proto's: GadgetEvent{type=1, seq=2, payload=3,
dataSourceID=4}, GadgetData{data=3}, GadgetDataArray{dataArray=3}, DataElement{payload=1}.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from pipeline.batch import Batch, CodedColumn

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


def _fixed_frames(rows: npt.NDArray[np.uint8], seqs: npt.NDArray[np.uint64], vlen: int,
                  suffix: bytes, tail: bytes) -> npt.NDArray[np.uint8]:
    """Framed ``GadgetEvent{seq, GadgetData}``s of equal width, one row each: records whose
    seqs all take ``vlen`` varint bytes and whose payloads after payload 0 encode to ``suffix``
    (the DataElement entries 1..P-1, framed)."""
    size = rows.shape[1]
    element = _element_prefix(size)
    de_len = len(element) + size + len(suffix)
    gd_head = bytes([_TAG_DATA]) + varint(de_len)
    gd_len = len(gd_head) + de_len
    payload_head = bytes([_TAG_EVENT_PAYLOAD]) + varint(gd_len) + gd_head + element
    ge_len = 1 + vlen + len(payload_head) + size + len(suffix) + len(tail)
    head = b"\x00" + ge_len.to_bytes(4, "big") + bytes([_TAG_EVENT_SEQ])
    out = np.empty((rows.shape[0], len(head) + ge_len - 1), dtype=np.uint8)
    out[:, : len(head)] = np.frombuffer(head, dtype=np.uint8)
    col = len(head)
    _put_varints(out, col, seqs, vlen)
    col += vlen
    out[:, col: col + len(payload_head)] = np.frombuffer(payload_head, dtype=np.uint8)
    col += len(payload_head)
    out[:, col: col + size] = rows
    col += size
    if suffix or tail:
        out[:, col:] = np.frombuffer(suffix + tail, dtype=np.uint8)
    return out


def _seq_runs(lengths: npt.NDArray[np.intp]) -> list[tuple[int, int, int]]:
    """(start, stop, varint length) of each run of equal seq varint lengths."""
    n = int(lengths.shape[0])
    cuts = [0, *(np.flatnonzero(lengths[1:] != lengths[:-1]) + 1).tolist(), n]
    return [(a, b, int(lengths[a])) for a, b in itertools.pairwise(cuts) if b > a]


def _coded_groups(batch: Batch) -> tuple[npt.NDArray[np.intp], list[bytes]] | None:
    """For a batch whose extra payloads are all :class:`CodedColumn`: each record's group (the
    records of a group have equal payloads 1..P-1) and each group's encoded payloads 1..P-1.
    None when some column is a plain sequence (the per-record path then frames it)."""
    cols = batch.extra
    if not all(isinstance(c, CodedColumn) for c in cols):
        return None
    coded = [c for c in cols if isinstance(c, CodedColumn)]
    # Columns built together share one codes array (or views equal to it): group by identity
    # of the memory first, so the common case is one np.unique over one array.
    distinct: dict[tuple[int, tuple[int, ...], tuple[int, ...]], npt.NDArray[np.intp]] = {}
    for c in coded:
        iface = c.codes.__array_interface__
        distinct.setdefault((iface["data"][0], c.codes.shape, c.codes.strides), c.codes)
    arrays = list(distinct.values())
    if len(arrays) == 1:
        key = arrays[0]
    else:
        key = np.zeros(len(batch), dtype=np.int64)
        for a in arrays:
            key = key * (int(a.max(initial=0)) + 1) + a
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    suffixes = []
    for r in first.tolist():
        suffixes.append(b"".join(length_delimited(_TAG_PAYLOAD, c.values[int(c.codes[r])])
                                 for c in coded))
    return inverse.reshape(-1).astype(np.intp), suffixes


def _runs(groups: npt.NDArray[np.intp]) -> list[tuple[int, int]]:
    n = int(groups.shape[0])
    cuts = [0, *(np.flatnonzero(groups[1:] != groups[:-1]) + 1).tolist(), n]
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


_FEW_RUNS = 16
"""Up to this many runs of records with equal extra payloads, frames are built per run (no
per-record Python); beyond, per group, then put back in record order by slicing."""


def _in_record_order(groups: npt.NDArray[np.intp], build: Callable[[npt.NDArray[np.intp], int],
                     npt.NDArray[np.uint8]]) -> bytes:
    """Per group, one matrix of equal-width rows (``build(indexes, group)``); the rows joined
    back in record order."""
    n = int(groups.shape[0])
    row_of = np.empty(n, dtype=np.int64)
    order = np.argsort(groups, kind="stable")
    bounds = np.searchsorted(groups[order], np.arange(int(groups.max(initial=-1)) + 2))
    mats: list[bytes] = []
    widths = np.zeros(len(bounds) - 1, dtype=np.int64)
    for g in range(len(bounds) - 1):
        idx = order[bounds[g]: bounds[g + 1]]
        if len(idx):
            m = build(idx, g)
            row_of[idx] = np.arange(len(idx))
            mats.append(m.tobytes())
            widths[g] = m.shape[1]
        else:
            mats.append(b"")
    offsets = np.cumsum([0, *map(len, mats)])[:-1]
    starts = offsets[groups] + row_of * widths[groups]
    pool = b"".join(mats)
    # One slice per record, made and joined by C-level iteration: no Python frame per record
    # (bytes slices: measured faster to make and join than memoryview slices).
    return b"".join(map(pool.__getitem__, map(slice, starts.tolist(),
                                              (starts + widths[groups]).tolist())))


def per_record_events(batch: Batch, first_seq: int, ds_id: int) -> bytes:
    """One framed ``GadgetEvent{seq, GadgetData}`` per record, concatenated.

    ``first_seq`` is the seq of the first record; record ``i`` gets ``first_seq + i`` (mod 2^32).
    Built as numpy rows of equal width per run of records with equal seq varint length and
    equal extra payloads (a batch with coded extras, or none); other batches take the general
    path, one record at a time.
    """
    n = len(batch)
    if n == 0:
        return b""
    groups: npt.NDArray[np.intp] | None
    if batch.extra:
        coded = _coded_groups(batch)
        if coded is None:
            return _per_record_events_general(batch, first_seq, ds_id)
        groups, suffixes = coded
    else:
        groups, suffixes = None, [b""]
    tail = bytes([_TAG_EVENT_DSID]) + varint(ds_id) if ds_id else b""
    # seq == 0 (after a wrap) is still written explicitly: decoders accept it and the length
    # stays uniform with its neighbours.
    seqs = (np.arange(first_seq, first_seq + n, dtype=np.uint64)) & np.uint64(0xFFFFFFFF)
    lengths = _varint_lengths(seqs)
    runs = [(0, n)] if groups is None else _runs(groups)
    if len(runs) <= _FEW_RUNS:
        parts = []
        for a, b in runs:
            suffix = suffixes[0 if groups is None else int(groups[a])]
            for s0, s1, vlen in _seq_runs(lengths[a:b]):
                parts.append(_fixed_frames(batch.rows[a + s0: a + s1], seqs[a + s0: a + s1],
                                           vlen, suffix, tail).tobytes())
        return b"".join(parts)
    assert groups is not None
    # Many runs: one more split, by seq varint length, keeps each matrix's rows equal width.
    split = groups * 8 + lengths
    uniq, keys = np.unique(split, return_inverse=True)
    keys = keys.reshape(-1).astype(np.intp)

    def build(idx: npt.NDArray[np.intp], k: int) -> npt.NDArray[np.uint8]:
        g, vlen = divmod(int(uniq[k]), 8)
        return _fixed_frames(batch.rows[idx], seqs[idx], vlen, suffixes[g], tail)

    return _in_record_order(keys, build)


def _per_record_events_general(batch: Batch, first_seq: int, ds_id: int) -> bytes:
    out = []
    for i in range(len(batch)):
        gd = length_delimited(_TAG_DATA, data_element(batch.payloads(i)))
        seq = (first_seq + i) & 0xFFFFFFFF
        out.append(grpc_frame(gadget_event(EVENT_TYPE_PAYLOAD, seq, gd, ds_id)))
    return b"".join(out)


def _fixed_elements(rows: npt.NDArray[np.uint8], suffix: bytes) -> npt.NDArray[np.uint8]:
    """``GadgetDataArray.dataArray`` entries (tag, length, DataElement) of equal width."""
    size = rows.shape[1]
    element = _element_prefix(size)
    head = bytes([_TAG_DATA]) + varint(len(element) + size + len(suffix)) + element
    out = np.empty((rows.shape[0], len(head) + size + len(suffix)), dtype=np.uint8)
    out[:, : len(head)] = np.frombuffer(head, dtype=np.uint8)
    out[:, len(head): len(head) + size] = rows
    if suffix:
        out[:, len(head) + size:] = np.frombuffer(suffix, dtype=np.uint8)
    return out


def data_elements(batch: Batch) -> list[bytes]:
    """Each record's ``DataElement`` bytes."""
    if batch.extra:
        return [data_element(batch.payloads(i)) for i in range(len(batch))]
    size = batch.schema.record_size
    head = _element_prefix(size)
    out = np.empty((len(batch), len(head) + size), dtype=np.uint8)
    out[:, : len(head)] = np.frombuffer(head, dtype=np.uint8)
    out[:, len(head):] = batch.rows
    flat = out.tobytes()
    w = out.shape[1]
    return [flat[i * w: (i + 1) * w] for i in range(len(batch))]


def gadget_data_array(batch: Batch) -> bytes:
    """A ``GadgetDataArray`` holding every record of the batch."""
    n = len(batch)
    if not n:
        return b""
    if not batch.extra:
        return _fixed_elements(batch.rows, b"").tobytes()
    coded = _coded_groups(batch)
    if coded is None:
        return b"".join(length_delimited(_TAG_DATA, de) for de in data_elements(batch))
    groups, suffixes = coded
    runs = _runs(groups)
    if len(runs) <= _FEW_RUNS:
        return b"".join(_fixed_elements(batch.rows[a:b], suffixes[int(groups[a])]).tobytes()
                        for a, b in runs)
    return _in_record_order(groups, lambda idx, g: _fixed_elements(batch.rows[idx],
                                                                  suffixes[g]))


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
        chunk = Batch(batch.schema, batch.rows[start: start + max_per_packet],
                      tuple(col[start: start + max_per_packet] for col in batch.extra))
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
