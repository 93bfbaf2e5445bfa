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

from pipeline.batch import Batch, Coded, CodedColumn, Fixed, FormColumn, LazyColumn, object_column
from pipeline.params import ParamSpec

GRPC_PREFIX = "operator.grpc."
BATCH_MAX = GRPC_PREFIX + "batch-max"
BATCH_LINGER = GRPC_PREFIX + "batch-linger"
ATTACH_QUEUE = GRPC_PREFIX + "attach-queue"
ATTACH_QUEUE_DEFAULT = 262144
"""Packets an instance's attached client may have waiting (api/instance_packets.py says why
this many)."""
GRPC_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("batch-max", GRPC_PREFIX, "Records per packet. 0: one GadgetEvent per record "
              "(what upstream clients expect); N: GadgetDataArray packets of up to N records",
              "0", "uint32", tags=("group:Data Collection",)),
    ParamSpec("batch-linger", GRPC_PREFIX, "How long a batched packet may wait to fill up",
              "20ms", "duration", tags=("group:Data Collection",)),
    ParamSpec("attach-queue", GRPC_PREFIX, "Instances: packets one attached client may have "
              "waiting before new ones are dropped for it (counted, and shown to it as seq "
              "gaps)", str(ATTACH_QUEUE_DEFAULT), "uint32", tags=("group:Data Collection",)),
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


def per_record_events(batch: Batch, first_seq: int, ds_id: int) -> bytes | bytearray:
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


def _per_record_events_general(batch: Batch, first_seq: int, ds_id: int) -> bytearray:
    """Framed events of records with further payloads (derived fields, enrichment)."""
    n = len(batch)
    seqs = np.arange(first_seq, first_seq + n, dtype=np.uint64) & np.uint64(0xFFFFFFFF)
    return framed_records(batch, seqs, ds_id)[0]


SEQ_PLACEHOLDER = b"\x80\x80\x80\x80\x00"
"""A seq of 0 as a five-byte varint (redundant continuation bytes are valid protobuf): what
:func:`framed_records` writes when the caller numbers the packets later, in place."""


Cut = tuple[int, int, npt.NDArray[np.int64]]
"""A field of payload 0 kept only in part: (offset, size, bytes kept of each record)."""


def framed_records(batch: Batch, seqs: npt.NDArray[np.uint64] | None, ds_id: int,
                   cuts: Sequence[Cut] = (),
                   ) -> tuple[bytearray, npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """One framed ``GadgetEvent{seq, GadgetData}`` per record, all payloads included, built
    as blocks of the whole batch (no object per record).

    Args:
        seqs: each record's seq; None writes :data:`SEQ_PLACEHOLDER` (five bytes, right
            after the gRPC prefix and the seq tag) for the caller to fill.
        cuts: fields of payload 0 (in offset order, not overlapping) of which each record
            keeps only its first bytes; the rest of each (zeros on the wire: the declared
            lengths are those of the whole record) is left out, for a caller that puts it back
            when it sends.

    Returns:
        The records one after the other, each one's length (as returned), and where in each
        its payload 0 starts.
    """
    n = len(batch)
    if n <= SMALL_BATCH and not cuts:
        return _framed_small(batch, seqs, ds_id)
    size = batch.schema.record_size
    element = _element_prefix(size)
    entries = [blk for col in batch.extra for blk in _payload_entry_blocks(col, n)]
    de_len = np.full(n, len(element) + size, dtype=np.int64)
    for m, used in entries:
        de_len += m.shape[1] if used is None else used
    gd_len = 1 + _varint_len(de_len) + de_len
    tail = bytes([_TAG_EVENT_DSID]) + varint(ds_id) if ds_id else b""
    seq_block: Block = (_const_block(n, SEQ_PLACEHOLDER) if seqs is None
                        else _varint_block(seqs))
    seq_len = len(SEQ_PLACEHOLDER) if seq_block[1] is None else seq_block[1]
    ev_len = 1 + seq_len + 1 + _varint_len(gd_len) + gd_len + len(tail)
    head: list[Block] = [
        _const_block(n, b"\x00"), (ev_len.astype(">u4").view(np.uint8).reshape(n, 4), None),
        _const_block(n, bytes([_TAG_EVENT_SEQ])), seq_block,
        _const_block(n, bytes([_TAG_EVENT_PAYLOAD])), _varint_block(gd_len),
        _const_block(n, bytes([_TAG_DATA])), _varint_block(de_len),
        _const_block(n, element)]
    head_len = np.zeros(n, dtype=np.int64)
    for m, used in head:
        head_len += m.shape[1] if used is None else used
    blocks = [*head, *_payload0_blocks(batch.rows, cuts), *entries]
    if tail:
        blocks.append(_const_block(n, tail))
    data, lens = assemble(blocks, n)
    return data, lens, head_len


SMALL_BATCH = 8
"""Batches of at most this many records are framed record by record: the block path costs a
few numpy calls per payload column whatever the batch's size (~235 µs for one trace_open
record, 26 payloads), this one ~10 µs per record (what a trickle of events costs on every
drain)."""


def _framed_small(batch: Batch, seqs: npt.NDArray[np.uint64] | None, ds_id: int,
                  ) -> tuple[bytearray, npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """:func:`framed_records` for a few records, without cuts: the same bytes, built with
    plain bytes operations per record."""
    n = len(batch)
    size = batch.schema.record_size
    element = _element_prefix(size)
    tail = bytes([_TAG_EVENT_DSID]) + varint(ds_id) if ds_id else b""
    rows = batch.rows
    cols = batch.extra
    out = bytearray()
    lens = np.empty(n, dtype=np.int64)
    head_len = np.empty(n, dtype=np.int64)
    for i in range(n):
        extra = b"".join(length_delimited(_TAG_PAYLOAD, col[i]) for col in cols)
        de_len = len(element) + size + len(extra)
        gd_head = bytes([_TAG_DATA]) + varint(de_len)
        seq = SEQ_PLACEHOLDER if seqs is None else varint(int(seqs[i]))
        pre = (bytes([_TAG_EVENT_SEQ]) + seq + bytes([_TAG_EVENT_PAYLOAD])
               + varint(len(gd_head) + de_len) + gd_head + element)
        ev_len = len(pre) + size + len(extra) + len(tail)
        head = b"\x00" + ev_len.to_bytes(4, "big") + pre
        start = len(out)
        out += head
        out += rows[i].tobytes()
        out += extra
        out += tail
        head_len[i] = len(head)
        lens[i] = len(out) - start
    return out, lens, head_len


def _payload0_blocks(rows: npt.NDArray[np.uint8], cuts: Sequence[Cut]) -> list[Block]:
    """Payload 0 as blocks: whole between the cut fields, each cut field kept in part."""
    if not cuts:
        return [(rows, None)]
    blocks: list[Block] = []
    end = 0
    for offs, size, used in cuts:
        if offs > end:
            blocks.append((rows[:, end:offs], None))
        blocks.append((rows[:, offs: offs + size], used))
        end = offs + size
    if end < rows.shape[1]:
        blocks.append((rows[:, end:], None))
    return blocks


def _payload_entry_blocks(col: Sequence[bytes], n: int) -> list[Block]:
    """A payload column as ``DataElement.payload`` entries (tag, length, bytes), as blocks:
    coded and fixed-width columns through :func:`_entry_block`, a plain list as a tag, a
    varint block and a NUL-padded block of the values."""
    block = _entry_block(col, n)
    if block is not None:
        return [block]
    values = list(col)
    vlen = np.fromiter(map(len, values), dtype=np.int64, count=n)
    width = max(1, int(vlen.max(initial=0)))
    padded = np.frombuffer(np.array(values, dtype=f"S{width}").tobytes(), dtype=np.uint8)
    return [_const_block(n, bytes([_TAG_PAYLOAD])), _varint_block(vlen),
            (padded.reshape(n, width), vlen)]


def const_block(n: int, data: bytes) -> Block:
    """The same bytes in each of ``n`` records (a view)."""
    return _const_block(n, data)


def varint_block(values: npt.NDArray[Any]) -> Block:
    """Each value's protobuf varint (values below 2^64), left-aligned, with its length."""
    return _varint_block(values)


def varint_lengths(values: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    """Bytes of each value's varint."""
    return _varint_len(values)


_MAX_RUNS = 64
"""Most runs of same-shaped records (one varint length, one entry length...) written as
matrices of their own; beyond that one boolean-mask pass leaves the unused bytes out."""


def assemble(blocks: list[Block], n: int) -> tuple[bytearray, npt.NDArray[np.int64]]:
    """Each record's blocks one after the other, every record after the other, and each
    record's length.

    Records of one shape (every block as wide for each) are rows of one matrix, written block
    by block straight into the result. Consecutive records usually share their shape (a seq's
    varint grows by one byte at 128, 16384, ...; a process's texts stay), so each run of them
    is written so; when the shape changes too often, the unused bytes of one matrix are left out
    in one boolean-mask pass."""
    blocks = _fold_constants(blocks, n)
    lens = np.zeros(n, dtype=np.int64)
    ragged: list[npt.NDArray[np.int64]] = []
    for m, used in blocks:
        if used is None:
            lens += m.shape[1]
        else:
            lens += used
            if bool((used != m.shape[1]).any()):
                ragged.append(used)
    out = bytearray(int(lens.sum()))
    flat = np.frombuffer(out, dtype=np.uint8)
    starts = [0]
    if ragged:
        change = np.zeros(n, dtype=np.bool_)
        for used in ragged:
            change[1:] |= used[1:] != used[:-1]
        starts += np.flatnonzero(change).tolist()
    if len(starts) > _MAX_RUNS:
        by_shape = _assemble_by_shape(blocks, ragged, lens)
        if by_shape is not None:
            flat[:] = np.frombuffer(by_shape, dtype=np.uint8)
            return out, lens
        matrix = np.concatenate([m for m, _ in blocks], axis=1)
        mask = np.concatenate([np.ones(m.shape, dtype=np.bool_) if used is None
                               else np.arange(m.shape[1])[None, :] < used[:, None]
                               for m, used in blocks], axis=1)
        flat[:] = matrix[mask]
        return out, lens
    pos = 0
    for a, b in zip(starts, [*starts[1:], n], strict=True):
        if a == b:
            continue
        width = int(lens[a])
        rows = flat[pos: pos + (b - a) * width].reshape(b - a, width)
        col = 0
        for m, used in blocks:
            w = m.shape[1] if used is None else int(used[a])
            rows[:, col: col + w] = m[a:b, :w]
            col += w
        pos += (b - a) * width
    return out, lens


_FOLD_WIDTH = 32
"""Blocks up to this wide are checked for holding one value for the whole batch."""


def _fold_constants(blocks: list[Block], n: int) -> list[Block]:
    """``blocks`` with every block that holds the same bytes in each record (a constant, a
    varint of one length and value, one process's id) merged with its constant neighbours:
    fewer, wider blocks to write per record."""
    if n == 0:
        return blocks
    out: list[Block] = []
    pending = bytearray()
    for m, used in blocks:
        if used is not None and bool((used == used[0]).all()):
            m, used = m[:, : int(used[0])], None
        if used is None and (m.strides[0] == 0 or (
                m.shape[1] <= _FOLD_WIDTH and bool((m == m[0]).all()))):
            pending += m[0].tobytes()
            continue
        if pending:
            out.append(_const_block(n, bytes(pending)))
            pending = bytearray()
        out.append((m, used))
    if pending:
        out.append(_const_block(n, bytes(pending)))
    return out


def _shape_keys(lengths: list[npt.NDArray[np.int64]], n: int
                ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.intp]] | None:
    """The distinct shapes of ``n`` records (their variable parts' lengths) and each record's
    index into them; None when the mixed-radix key would overflow int64. One int64 key per
    record (mixed radix over the lengths): a 1-D unique sorts far faster than a row-wise one."""
    key = np.zeros(n, dtype=np.int64)
    radix = 1
    for used in lengths:
        top = int(used.max(initial=0)) + 1
        if radix * top >= 1 << 62:
            return None
        key += used * radix
        radix *= top
    ukeys, inv = np.unique(key, return_inverse=True)
    return ukeys, inv.reshape(-1)


def _assemble_by_shape(blocks: list[Block], ragged: list[npt.NDArray[np.int64]],
                       lens: npt.NDArray[np.int64]) -> bytes | None:
    """The records of :func:`_assemble` when their shapes alternate: the records of each shape
    as rows of a matrix, each row one bytes object, joined in order; None when there are more
    than :data:`_MAX_RUNS` shapes."""
    n = len(lens)
    keyed = _shape_keys(ragged, n)
    if keyed is None:
        return None
    ukeys, inv = keyed
    if len(ukeys) > _MAX_RUNS:
        return None
    order = np.argsort(inv, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(inv, minlength=len(ukeys)))])
    objs = np.empty(n, dtype=object)
    for g in range(len(ukeys)):
        sel = order[bounds[g]: bounds[g + 1]]
        i = int(sel[0])
        mat = np.empty((len(sel), int(lens[i])), dtype=np.uint8)
        col = 0
        for m, u in blocks:
            w = m.shape[1] if u is None else int(u[i])
            mat[:, col: col + w] = m[sel, :w]
            col += w
        objs[sel] = _rows_as_bytes(mat)
    return b"".join(objs.tolist())


class _Head:
    """What precedes each record's payload 0 bytes: here the tag and length of payload 0
    (``data_elements``). Subclasses add the message framing around the element."""

    def __init__(self, record_size: int) -> None:
        self.element = _element_prefix(record_size)

    def varying(self) -> npt.NDArray[np.int64] | None:
        """Per record, the length of a head part that varies other than with the element's
        length (None: none does)."""
        return None

    def prefix(self, de_len: int) -> bytes:
        """The head of an element of ``de_len`` bytes, up to a varying part."""
        return self.element

    def block(self, sel: npt.NDArray[np.intp] | slice, count: int, first: int,
              de_len: int) -> npt.NDArray[np.uint8]:
        """The heads of the ``count`` records ``sel`` (``first`` is one of them), all of the
        same shape, their elements ``de_len`` bytes long."""
        return repeated(self.prefix(de_len), count)

    def ragged(self, de_len: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.uint8],
                                                             npt.NDArray[np.int64]]:
        """Every record's head left-aligned in a matrix, and its length."""
        n = len(de_len)
        return _concat_blocks(n, [_const_block(n, self.element)])


class _ArrayHead(_Head):
    """``GadgetDataArray.dataArray`` entry: tag and length of the element."""

    def prefix(self, de_len: int) -> bytes:
        return bytes([_TAG_DATA]) + varint(de_len) + self.element

    def ragged(self, de_len: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.uint8],
                                                             npt.NDArray[np.int64]]:
        n = len(de_len)
        return _concat_blocks(n, [_const_block(n, bytes([_TAG_DATA])), _varint_block(de_len),
                                  _const_block(n, self.element)])


class _EventHead(_Head):
    """A framed ``GadgetEvent{seq, GadgetData{data}}`` up to payload 0's bytes."""

    def __init__(self, seqs: npt.NDArray[np.uint64], tail_len: int, record_size: int) -> None:
        super().__init__(record_size)
        self.seqs = seqs
        self.seq_len = _varint_len(seqs)
        self.tail_len = tail_len

    def varying(self) -> npt.NDArray[np.int64] | None:
        return self.seq_len

    def _lengths(self, de_len: Any, seq_len: Any) -> tuple[Any, Any]:
        gd_len = 1 + _varint_len(np.asarray(de_len)) + de_len
        return gd_len, 1 + seq_len + 1 + _varint_len(np.asarray(gd_len)) + gd_len + self.tail_len

    def block(self, sel: npt.NDArray[np.intp] | slice, count: int, first: int,
              de_len: int) -> npt.NDArray[np.uint8]:
        seq_len = int(self.seq_len[first])
        gd_len, ev_len = (int(x) for x in self._lengths(de_len, seq_len))
        pre = b"\x00" + ev_len.to_bytes(4, "big") + bytes([_TAG_EVENT_SEQ])
        post = bytes([_TAG_EVENT_PAYLOAD]) + varint(gd_len) + bytes([_TAG_DATA]) + \
            varint(de_len) + self.element
        out = np.empty((count, len(pre) + seq_len + len(post)), dtype=np.uint8)
        out[:, : len(pre)] = np.frombuffer(pre, dtype=np.uint8)
        out[:, len(pre): len(pre) + seq_len] = _varint_block(self.seqs[sel])[0][:, :seq_len]
        out[:, len(pre) + seq_len:] = np.frombuffer(post, dtype=np.uint8)
        return out

    def ragged(self, de_len: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.uint8],
                                                             npt.NDArray[np.int64]]:
        n = len(de_len)
        gd_len, ev_len = self._lengths(de_len, self.seq_len)
        return _concat_blocks(n, [
            _const_block(n, b"\x00"),
            (ev_len.astype(">u4").view(np.uint8).reshape(n, 4), None),
            _const_block(n, bytes([_TAG_EVENT_SEQ])), _varint_block(self.seqs),
            _const_block(n, bytes([_TAG_EVENT_PAYLOAD])), _varint_block(gd_len),
            _const_block(n, bytes([_TAG_DATA])), _varint_block(de_len),
            _const_block(n, self.element),
        ])


Block = tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64] | None]
"""Bytes of one part of every record: a (n, width) matrix and each row's used length (None:
the whole width)."""


def repeated(data: bytes | npt.NDArray[np.uint8], n: int) -> npt.NDArray[np.uint8]:
    """``data`` as every row of an (n, len) matrix: a read-only view with a zero row stride
    (what ``np.broadcast_to`` makes, at a seventh of its cost: framing makes dozens a batch)."""
    out = np.ndarray((n, len(data)), np.uint8, data, 0, (0, 1))
    out.flags.writeable = False
    return out


def _const_block(n: int, data: bytes) -> Block:
    return repeated(data, n), None


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
    """Each record's blocks one after the other, left-aligned in one matrix, and its length
    (for a few narrow blocks: it moves one byte column at a time)."""
    width = sum(m.shape[1] for m, _ in blocks)
    out = np.zeros((n, width), dtype=np.uint8)
    pos = np.zeros(n, dtype=np.int64)
    rows = np.arange(n)
    aligned = True  # every row has the same length so far
    for m, used in blocks:
        if used is None and aligned:
            p = int(pos[0]) if n else 0
            out[:, p: p + m.shape[1]] = m
        else:
            for k in range(m.shape[1]):
                sel = rows if used is None else np.flatnonzero(used > k)
                out[sel, pos[sel] + k] = m[sel, k]
            aligned = aligned and used is None
        pos += m.shape[1] if used is None else used
    return out, pos


def _rows_as_bytes(mat: npt.NDArray[np.uint8]) -> list[bytes]:
    """Each row of a byte matrix as a bytes object (a void view converts in C, trailing
    zeros kept)."""
    n, width = mat.shape
    if width == 0:
        return [b""] * n
    out: list[bytes] = np.ascontiguousarray(mat).view(f"V{width}").reshape(-1).tolist()
    return out


def _ragged_rows(mat: npt.NDArray[np.uint8], used: npt.NDArray[np.int64],
                 ) -> npt.NDArray[np.object_]:
    """Row ``i``'s first ``used[i]`` bytes as a bytes object, for every row (one numpy pass
    per distinct length)."""
    out = np.empty(len(used), dtype=object)
    for length in np.unique(used).tolist():
        sel = np.flatnonzero(used == length)
        out[sel] = _rows_as_bytes(mat[sel, :length])
    return out


def _coded_block(table: list[bytes], codes: npt.NDArray[np.intp]) -> Block:
    """Entries that take one of a few values: each distinct value's bytes once, then gathered
    per record."""
    lens = np.fromiter(map(len, table), dtype=np.int64, count=len(table))
    mat = np.zeros((len(table), int(lens.max(initial=0))), dtype=np.uint8)
    for i, e in enumerate(table):  # per distinct value
        mat[i, : len(e)] = np.frombuffer(e, dtype=np.uint8)
    return mat[codes], lens[codes]


def _entry_blocks(cols: Sequence[Sequence[bytes]], n: int) -> list[Block | None]:
    """Each payload column as entries in a block (see :func:`_entry_block`); consecutive
    coded columns sharing one codes array (what an operator adds together, such as
    a container's k8s.* and runtime.* fields) become one block of their entries together, so
    a record's shape does not vary with each of them."""
    out: list[Block | None] = []
    i = 0
    while i < len(cols):
        c = cols[i]
        j = i + 1
        if isinstance(c, CodedColumn):
            while j < len(cols):
                nxt = cols[j]
                if not (isinstance(nxt, CodedColumn) and nxt.codes is c.codes and
                        len(nxt.values) == len(c.values)):
                    break
                j += 1
        if j - i > 1:
            run = [x for x in cols[i:j] if isinstance(x, CodedColumn)]
            table = [b"".join(length_delimited(_TAG_PAYLOAD, x.values[k]) for x in run)
                     for k in range(len(c.values) if isinstance(c, CodedColumn) else 0)]
            out.append(_coded_block(table, run[0].codes))
        else:
            out.append(_entry_block(c, n))
        i = j
    return out


def _entry_block(col: Sequence[bytes], n: int) -> Block | None:
    """A payload column as ``DataElement.payload`` entries (tag, length, bytes) in one block,
    when it is coded or fixed-width (each distinct value encoded once); None for a plain
    list."""
    if isinstance(col, FormColumn):
        form: Coded | Fixed | list[bytes] | None = col.form
    elif isinstance(col, (LazyColumn, CodedColumn)):
        form = col.form()
    else:
        form = None
    if isinstance(form, Coded):
        table = [length_delimited(_TAG_PAYLOAD, v) for v in form.table]
        codes = form.codes
        if len(table) == 1 or (len(codes) and bool((codes == codes[0]).all())):
            # One value for every record (a constant such as ustack's zeros or an empty path,
            # one process's name): a view, no copy per record.
            return repeated(table[int(codes[0]) if len(codes) else 0], n), None
        return _coded_block(table, codes)
    if isinstance(form, Fixed):
        prefix = bytes([_TAG_PAYLOAD]) + varint(form.matrix.shape[1])
        out = np.empty((n, len(prefix) + form.matrix.shape[1]), dtype=np.uint8)
        out[:, : len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
        out[:, len(prefix):] = form.matrix
        return out, None
    return None


_MAX_SHAPES = 64
"""Most distinct record shapes (lengths of the variable parts) assembled as blocks; beyond
that a batch is joined piece by piece."""


class _Parts:
    """The ``DataElement`` of every record after payload 0's tag and length: the row, then
    each further payload's entry, and the element's total length (``de_len``).

    :meth:`records` puts a head before and a constant tail after each, as one bytes object
    per record. When every further payload is coded or fixed-width (derived fields), records
    of the same shape (the same length of each variable part) are assembled together as one
    byte matrix, so there is one object per record; otherwise each part of each record is its
    own object, joined.
    """

    def __init__(self, batch: Batch) -> None:
        n = len(batch)
        self.n = n
        self.rows = batch.rows
        size = batch.schema.record_size
        self.de_len = np.full(n, len(_element_prefix(size)) + size, dtype=np.int64)
        blocks = _entry_blocks(batch.extra, n)
        self.blocks: list[Block] | None = None
        self.pieces: list[npt.NDArray[np.object_]] = []
        if all(b is not None for b in blocks):
            self.blocks = [b for b in blocks if b is not None]
            for m, used in self.blocks:
                self.de_len += m.shape[1] if used is None else used
            return
        for col in batch.extra:
            parts, lens = _payload_entries(col, n)
            self.pieces.extend(parts)
            self.de_len += lens

    def records(self, head: _Head, tail: bytes) -> npt.NDArray[np.object_]:
        """Each record's bytes: its head, its element's parts, ``tail``."""
        n = self.n
        if self.blocks is not None:
            out = self._by_shape(head, tail)
            if out is not None:
                return out
            self.pieces = []
            for m, used in self.blocks:
                self.pieces.append(_ragged_rows(m, used) if used is not None
                                   else object_column(_rows_as_bytes(m)))
        if n == 0:
            return np.empty(0, dtype=object)
        cols: list[Any] = [_ragged_rows(*head.ragged(self.de_len)),
                           object_column(_rows_as_bytes(self.rows)), *self.pieces]
        if tail:
            cols.append(tail)
        table = np.empty((n, len(cols)), dtype=object)
        for j, c in enumerate(cols):
            table[:, j] = c
        return np.array(list(map(b"".join, table.tolist())), dtype=object)

    def _by_shape(self, head: _Head, tail: bytes) -> npt.NDArray[np.object_] | None:
        """Records grouped by shape (the lengths of their variable parts), each group
        assembled as one matrix; None when there are too many shapes for that to pay."""
        assert self.blocks is not None
        n = self.n
        variable: list[npt.NDArray[np.int64]] = []
        for _, used in self.blocks:
            if used is not None:
                variable.append(used)
        varying = head.varying()
        if varying is not None:
            variable.insert(0, varying)
        if variable and n:
            keyed = _shape_keys(variable, n)
            if keyed is None:
                return None
            ukeys, inv = keyed
        else:
            ukeys, inv = np.zeros(1, dtype=np.int64), np.zeros(n, dtype=np.intp)
        if len(ukeys) > _MAX_SHAPES:
            return None
        order = np.argsort(inv, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(inv, minlength=len(ukeys)))])
        tail_row = np.frombuffer(tail, dtype=np.uint8)
        out = np.empty(n, dtype=object)
        for g in range(len(ukeys)):
            idx = order[bounds[g]: bounds[g + 1]]
            if len(idx) == 0:
                continue
            i, count = int(idx[0]), len(idx)
            # One shape (the usual case): views of the columns, not copies.
            sel: npt.NDArray[np.intp] | slice = slice(None) if len(ukeys) == 1 else idx
            parts = [head.block(sel, count, i, int(self.de_len[i])), self.rows[sel]]
            for m, used in self.blocks:
                parts.append(m[sel] if used is None else m[sel, : int(used[i])])
            if tail:
                parts.append(repeated(tail_row, count))
            out[sel] = _rows_as_bytes(np.concatenate(parts, axis=1))
        return out


def _payload_entries(col: Sequence[bytes], n: int) -> tuple[list[npt.NDArray[np.object_]],
                                                            npt.NDArray[np.int64]]:
    """A plain payload column as ``DataElement.payload`` entries: the prefix (tag, length) and
    the bytes of each record as object columns to join, and each record's encoded length."""
    values = list(col)
    vlen = np.fromiter(map(len, values), dtype=np.int64, count=n)
    prefix = _concat_blocks(n, [_const_block(n, bytes([_TAG_PAYLOAD])), _varint_block(vlen)])
    return [_ragged_rows(*prefix), object_column(values)], prefix[1] + vlen


def data_elements(batch: Batch) -> list[bytes]:
    """Each record's ``DataElement`` bytes."""
    n = len(batch)
    size = batch.schema.record_size
    head = _element_prefix(size)
    if batch.extra and n:
        elements: list[bytes] = _Parts(batch).records(_Head(size), b"").tolist()
        return elements
    out = np.empty((n, len(head) + size), dtype=np.uint8)
    out[:, : len(head)] = np.frombuffer(head, dtype=np.uint8)
    out[:, len(head):] = batch.rows
    return _rows_as_bytes(out) if n else []


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
    return b"".join(_Parts(batch).records(_ArrayHead(size), b"").tolist())


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
