"""JSON lines for a whole batch in a few numpy passes: no Python work per record.

A record's JSON is its template's constant pieces interleaved with its field values
(pipeline/sinks/encode.py builds the template). Here every record becomes one row of a byte
matrix with the same layout for all rows: the constant pieces at fixed places (the row is
pre-filled from one template row), and between them a slot per value, as wide as the widest
value of the batch. Integers are written as their decimal digits four at a time (a table of
``"0000"``..``"9999"`` as 32-bit words), C strings are copied out of the records as they are.
What a value does not use of its slot is NUL. Valid JSON never contains a raw NUL (inside a
string it must be escaped as ``\\u0000``), so deleting every NUL from the matrix's bytes leaves
exactly the records' JSON lines, one after the other: ``bytes.translate`` does that in one C
loop, and the newlines then say where each record ends.

Strings that JSON must escape (a quote, a backslash, a control character, or anything outside
ASCII, which is written as ``\\uXXXX`` like ``json.dumps`` does) are rare in practice; the records
that have one get that value from the standard library's encoder, written into the same slot
(widened when needed). Kinds with no vectorised form here (floats, arrays, raw bytes, payloads
added in user space) are encoded per value by the caller's function and laid into their slots
the same way, so every record's line is the same either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from json.encoder import encode_basestring_ascii
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.batch import Batch, Coded, Fixed, FormColumn, LazyColumn
from pipeline.schema import KIND_WIDTH, NUMPY_DTYPE, Field, Kind

__all__ = ["JsonLines", "payload_block", "payload_source"]

Block = npt.NDArray[np.uint8]
"""(n, width) bytes of one slot of every record; NUL bytes are filler."""
Fallback = Callable[[Batch, Field], list[str]]
"""Encodes one field of every record as JSON text (the general, per-value path)."""

_INT_KINDS = frozenset({Kind.INT8, Kind.INT16, Kind.INT32, Kind.INT64, Kind.UINT8, Kind.UINT16,
                        Kind.UINT32, Kind.UINT64})
_QUOTE = ord('"')
_BACKSLASH = ord("\\")
_NEWLINE = ord("\n")
_HEAD = 64
"""Bytes of a C string searched for its end at once; longer strings are searched further only
when a batch has any."""


def _words(texts: list[str]) -> npt.NDArray[np.uint32]:
    return np.frombuffer("".join(texts).encode("latin-1"), dtype="<u4").copy()


# Four digits as one little-endian 32-bit word ("0042" is b"0042" in memory), indexed by value:
# _FULL keeps leading zeros (a group inside a number), _LEAD turns them into NUL (the leading
# group), and _LEAD_LAST does too but keeps a lone "0" (the number 0 itself).
_FULL = _words([f"{i:04d}" for i in range(10000)])
_LEAD = _words([f"{i:4d}".replace(" ", "\0") if i else "\0\0\0\0" for i in range(10000)])
_LEAD_LAST = _words([f"{i:4d}".replace(" ", "\0") for i in range(10000)])
# Index i + 10000 picks _FULL: "is there a higher group" becomes a multiply-add, not a branch.
_TABLE_HIGH = np.concatenate([_LEAD, _FULL])
_TABLE_LOW = np.concatenate([_LEAD_LAST, _FULL])
_TRUE_FALSE = np.frombuffer(b"false" + b"true\0", dtype=np.uint8).reshape(2, 5)
# Bytes json.encoder.encode_basestring_ascii escapes: quote, backslash, and all but " "-"~".
_ESCAPE = np.zeros(256, dtype=np.bool_)
_ESCAPE[1:0x20] = True
_ESCAPE[[ord('"'), ord("\\")]] = True
_ESCAPE[0x7F:] = True


def _digit_words(v: npt.NDArray[np.unsignedinteger]) -> list[npt.NDArray[np.uint32]]:
    """Each value's decimal digits as 32-bit words of four, most significant group first;
    positions before the first digit are NUL."""
    top = int(v.max())
    groups = max(1, -(-len(str(top)) // 4))
    out: list[npt.NDArray[np.uint32]] = []
    rest = v
    dt = v.dtype.type
    for k in range(groups):
        if k < groups - 1:
            nxt = rest // dt(10000)
            low = rest - nxt * dt(10000)
        else:
            nxt, low = rest, rest
        table = _TABLE_LOW if k == 0 else _TABLE_HIGH
        if k < groups - 1:
            idx = low.astype(np.intp) + (nxt != 0).astype(np.intp) * 10000
        else:
            idx = low.astype(np.intp)
        out.append(table.take(idx))
        rest = nxt
    out.reverse()
    return out


def _ints(col: npt.NDArray[np.generic]) -> tuple[Block, bool]:
    """An integer column's decimal text as a block, and whether every row fills it (no NUL):
    when all values have as many digits (and the same sign), the block is exactly that wide."""
    mag: npt.NDArray[np.unsignedinteger[Any]]
    if col.dtype.kind == "u":
        mag = col.astype(np.uint32 if col.dtype.itemsize <= 4 else np.uint64)
        sign = None
    else:
        wide = col.astype(np.int64)
        neg = wide < 0
        # -(INT64_MIN) overflows int64 but not as its two's complement read as uint64.
        mag = np.where(neg, (~wide.view(np.uint64)) + np.uint64(1), wide.view(np.uint64))
        sign = neg if neg.any() else None
    lo, hi = int(mag.min()), int(mag.max())
    words = _digit_words(mag)
    block = np.stack(words, axis=1).view(np.uint8).reshape(len(mag), 4 * len(words))
    digits = len(str(hi))
    uniform = len(str(lo)) == digits
    block = block[:, block.shape[1] - digits:]
    if sign is None:
        return block, uniform
    out = np.zeros((block.shape[0], block.shape[1] + 1), dtype=np.uint8)
    out[:, 1:] = block
    rows = np.flatnonzero(sign)
    first = (out[rows, 1:] != 0).argmax(axis=1)  # the sign goes just before the first digit
    out[rows, first] = ord("-")
    return out, bool(uniform and sign.all())


def _column(batch: Batch, f: Field, payloads: dict[int, Block]) -> npt.NDArray[np.generic]:
    """A fixed-width field of every record as a numpy column: from payload 0, or from a
    further payload holding a struct (``payloads`` caches each payload as a block)."""
    width = KIND_WIDTH[f.base_kind]
    raw = payload_source(batch, f, payloads)[:, f.offs: f.offs + width]
    if raw.shape[1] < width:  # a short entry reads as zeros, as a decoder pads it
        raw = np.pad(raw, ((0, 0), (0, width - raw.shape[1])))
    return np.ascontiguousarray(raw).view(NUMPY_DTYPE[f.base_kind]).reshape(-1)


def payload_source(batch: Batch, f: Field, payloads: dict[int, Block]) -> Block:
    """The block a static member of ``f``'s payload is cut from (cached per payload)."""
    if f.payload_index == 0:
        return batch.rows
    block = payloads.get(f.payload_index)
    if block is None:
        block = payloads[f.payload_index] = payload_block(batch, f.payload_index)
    return block


def payload_block(batch: Batch, index: int) -> Block:
    """Payload ``index`` of every record as a NUL-padded block (a struct a source keeps beside
    payload 0: one row per record, without an object per record for coded and fixed forms)."""
    col = batch.extra[index - 1]
    form = col.form() if isinstance(col, LazyColumn) else \
        col.form if isinstance(col, FormColumn) else None
    n = len(batch)
    if isinstance(form, Fixed):
        return form.matrix
    values: Sequence[bytes] = form.table if isinstance(form, Coded) else list(col)
    width = max(1, max(map(len, values), default=0))
    table = np.frombuffer(np.array(values, dtype=f"S{width}").tobytes(),
                          dtype=np.uint8).reshape(len(values), width)
    if not isinstance(form, Coded):
        return table
    if n and (len(values) == 1 or bool((form.codes == form.codes[0]).all())):
        return np.broadcast_to(table[int(form.codes[0])], (n, width))
    return table[form.codes]


def _nul_cut(block: Block) -> npt.NDArray[np.intp]:
    """Each row's length up to its first NUL (the whole width without one)."""
    n, size = block.shape
    if size == 0:
        return np.zeros(n, dtype=np.intp)
    head = min(size, _HEAD)
    # argmin finds the first NUL in one pass (0 is the least byte); a row whose least byte is
    # not 0 has no NUL in its head.
    lens: npt.NDArray[np.intp] = block[:, :head].argmin(axis=1)
    rows = np.flatnonzero(block[np.arange(n), lens] != 0)
    if rows.size:
        lens[rows] = head
        if head < size:
            tail = block[rows, head:]
            at = tail.argmin(axis=1)
            lens[rows] = np.where(tail[np.arange(rows.size), at] == 0, head + at, size)
    return lens


def _string_block(block: Block, lens: npt.NDArray[np.intp]) -> tuple[Block, bool]:
    """The first ``lens`` bytes of each row as JSON string text (without the quotes), NUL
    after, with the rows JSON must escape replaced by their escaped text; and whether every
    row fills the block. Rows are valid text up to ``lens``: a NUL inside is escaped."""
    n = block.shape[0]
    width = int(lens.max(initial=0))
    out = np.array(block[:, :width])  # a copy: bytes after the end (stale ring memory) go
    inside = np.arange(width)[None, :] < lens[:, None]
    out *= inside
    nul_inside = bool(((out == 0) & inside).any()) if width else False
    if width and (nul_inside or int(out.max()) >= 0x7F
                  or bool(((out < 0x20) & (out != 0)).any())
                  or bool((out == _QUOTE).any()) or bool((out == _BACKSLASH).any())):
        bad = np.flatnonzero((_ESCAPE.take(out) | ((out == 0) & inside)).any(axis=1))
        texts = [encode_basestring_ascii(_utf8(out[r, : lens[r]].tobytes()))[1:-1]
                 for r in bad.tolist()]
        return _patch(out, bad, texts), False
    return out, n == 0 or int(lens.min()) == width


def _cstring(batch: Batch, f: Field, payloads: dict[int, Block]) -> tuple[Block, bool]:
    """A C string member (of payload 0 or of a struct payload), up to its first NUL."""
    block = payload_source(batch, f, payloads)[:, f.offs: f.offs + f.size]
    return _string_block(block, _nul_cut(block))


def _payload_string(batch: Batch, f: Field) -> tuple[Block, bool]:
    """A string field that is a further payload (a derived text, an enrichment): coded
    columns encode each distinct value once, fixed-width ones are one block, a plain list
    becomes one NUL-padded block."""
    col = batch.extra[f.payload_index - 1]
    form = col.form() if isinstance(col, LazyColumn) else \
        col.form if isinstance(col, FormColumn) else None
    cstring = f.base_kind is Kind.CSTRING
    n = len(batch)
    if isinstance(form, Coded):
        texts = [encode_basestring_ascii(_utf8(v.partition(b"\0")[0] if cstring else v))[1:-1]
                 for v in form.table]
        table, _ = _text_block(texts) if texts else (np.zeros((0, 1), np.uint8), True)
        tlens = np.fromiter(map(len, texts), dtype=np.intp, count=len(texts))
        codes = form.codes
        if n == 0:
            return np.zeros((0, 1), dtype=np.uint8), True
        if len(texts) == 1 or bool((codes == codes[0]).all()):
            one = int(codes[0])
            return np.broadcast_to(table[one, : tlens[one]], (n, int(tlens[one]))), True
        return table[codes], bool((tlens[codes] == table.shape[1]).all())
    if isinstance(form, Fixed):
        block = form.matrix
        lens = _nul_cut(block) if cstring else np.full(n, block.shape[1], dtype=np.intp)
        return _string_block(block, lens)
    values = [v.partition(b"\0")[0] for v in col] if cstring else list(col)
    lens = np.fromiter(map(len, values), dtype=np.intp, count=n)
    width = max(1, int(lens.max(initial=0)))
    block = np.frombuffer(np.array(values, dtype=f"S{width}").tobytes(),
                          dtype=np.uint8).reshape(n, width)
    return _string_block(block, lens)


def _text_block(texts: Sequence[str]) -> tuple[Block, bool]:
    """ASCII texts (JSON values) as a NUL-filled block, and whether every row fills it."""
    encoded = [t.encode() for t in texts]
    arr = np.array(encoded, dtype=bytes)  # S<max>: NUL-padded
    width = max(1, arr.dtype.itemsize)
    block = np.frombuffer(arr.tobytes(), dtype=np.uint8).reshape(len(texts), width)
    return block, min(map(len, encoded)) == width


def _patch(block: Block, rows: npt.NDArray[np.intp], texts: list[str]) -> Block:
    """``block`` with the given rows replaced by ``texts`` (widened to fit)."""
    encoded = [t.encode() for t in texts]
    width = max(block.shape[1], max(len(e) for e in encoded))
    if width > block.shape[1]:
        wide = np.zeros((block.shape[0], width), dtype=np.uint8)
        wide[:, : block.shape[1]] = block
        block = wide
    for r, e in zip(rows.tolist(), encoded, strict=True):
        block[r, :] = 0
        block[r, : len(e)] = np.frombuffer(e, dtype=np.uint8)
    return block


def _utf8(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


class JsonLines:
    """Encodes batches of one data source as JSON lines.

    Args:
        pieces: the template: constant text, or None where the next field's value goes.
        fields: the fields, in template order.
        fallback: the per-value encoder for fields with no vectorised form here.
    """

    def __init__(self, pieces: Sequence[str | None], fields: Sequence[Field],
                 fallback: Fallback) -> None:
        self._fallback = fallback
        self._plan: list[bytes | Field] = []
        it = iter(fields)
        for p in pieces:
            if p is None:
                f = next(it)
                if self._vector_kind(f) in ("cstring", "payload-string"):
                    self._const(b'"')
                    self._plan.append(f)
                    self._const(b'"')
                else:
                    self._plan.append(f)
            else:
                self._const(p.encode())
        self._const(b"\n")

    def _const(self, data: bytes) -> None:
        if self._plan and isinstance(self._plan[-1], bytes):
            self._plan[-1] += data
        else:
            self._plan.append(data)

    @staticmethod
    def _vector_kind(f: Field) -> str:
        if f.is_array:
            return "other"
        kind = f.base_kind
        if f.payload_index != 0:
            if kind in (Kind.STRING, Kind.CSTRING) and not f.size:
                return "payload-string"
            if not f.size:
                return "other"
        if kind in _INT_KINDS:
            return "int"
        if kind is Kind.BOOL:
            return "bool"
        if kind is Kind.CSTRING and f.size:
            return "cstring"
        return "other"

    def encode(self, batch: Batch) -> tuple[bytes | bytearray, npt.NDArray[np.intp]]:
        """Every record's JSON followed by a newline, concatenated, and where each line ends
        (exclusive offsets into the bytes, newline included)."""
        n = len(batch)
        if n == 0:
            return b"", np.zeros(0, dtype=np.intp)
        template = bytearray()
        blocks: list[tuple[int, Block]] = []
        payloads: dict[int, Block] = {}
        filler = False
        for item in self._plan:
            if isinstance(item, bytes):
                template += item
                continue
            kind = self._vector_kind(item)
            if kind == "int":
                block, full = _ints(_column(batch, item, payloads))
            elif kind == "bool":
                block = _TRUE_FALSE[(_column(batch, item, payloads) == 1).astype(np.intp)]
                full = bool(block[:, 4].all())
            elif kind == "cstring":
                block, full = _cstring(batch, item, payloads)
            elif kind == "payload-string":
                block, full = _payload_string(batch, item)
            else:
                block, full = _text_block(self._fallback(batch, item))
            if full and (block.strides[0] == 0 or bool((block == block[0]).all())):
                # One value for the whole batch (zeros, one process's ids): it joins the
                # template row instead of being written row by row.
                template += block[0].tobytes()
                continue
            filler = filler or not full
            blocks.append((len(template), block))
            template += bytes(block.shape[1])
        width = len(template)
        out = bytearray(n * width)
        matrix = np.frombuffer(out, dtype=np.uint8).reshape(n, width)
        matrix[:] = np.frombuffer(bytes(template), dtype=np.uint8)
        for off, block in blocks:
            matrix[:, off: off + block.shape[1]] = block
        if not filler:
            # Every value as wide as its slot (one process's records, say): the rows are the
            # lines already.
            return out, np.arange(width, (n + 1) * width, width, dtype=np.intp)
        data = out.translate(None, b"\0")
        ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == _NEWLINE) + 1
        return data, ends
