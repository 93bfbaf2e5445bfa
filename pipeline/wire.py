"""Protobuf wire bytes of gadget service messages, built per batch without message objects.

Only the handful of messages on the hot path are hand-encoded here (``GadgetEvent`` carrying a
``GadgetData`` or ``GadgetDataArray``, and gRPC's length-prefixed framing); everything else uses
the generated classes. Field numbers below are the proto's: GadgetEvent{type=1, seq=2, payload=3,
dataSourceID=4}, GadgetData{data=3}, GadgetDataArray{dataArray=3}, DataElement{payload=1}.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from pipeline.batch import Batch
from pipeline.params import ParamSpec

GRPC_PREFIX = "operator.grpc."
BATCH_MAX = GRPC_PREFIX + "batch-max"
BATCH_LINGER = GRPC_PREFIX + "batch-linger"
GRPC_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("batch-max", GRPC_PREFIX, "Records per packet. 0: one GadgetEvent per record "
              "(what upstream clients expect); N: GadgetDataArray packets of up to N records",
              "0", "uint32", tags=("group:Data Collection",)),
    ParamSpec("batch-linger", GRPC_PREFIX, "How long a batched packet may wait to fill up",
              "20ms", "duration", tags=("group:Data Collection",)),
)
"""How a run's records are packed into gadget service messages: the params of every run a
gRPC client receives (the config loader validates them with the rest)."""

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
    out = []
    for i in range(len(batch)):
        gd = length_delimited(_TAG_DATA, data_element(batch.payloads(i)))
        seq = (first_seq + i) & 0xFFFFFFFF
        out.append(grpc_frame(gadget_event(EVENT_TYPE_PAYLOAD, seq, gd, ds_id)))
    return b"".join(out)


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
    if not batch.extra and len(batch):
        size = batch.schema.record_size
        element = _element_prefix(size)
        head = bytes([_TAG_DATA]) + varint(len(element) + size) + element
        out = np.empty((len(batch), len(head) + size), dtype=np.uint8)
        out[:, : len(head)] = np.frombuffer(head, dtype=np.uint8)
        out[:, len(head):] = batch.rows
        return out.tobytes()
    return b"".join(length_delimited(_TAG_DATA, de) for de in data_elements(batch))


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
