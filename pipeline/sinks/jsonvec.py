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
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.batch import Batch, Coded, CodedColumn, Fixed, FormColumn, LazyColumn
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


def column_form(col: Sequence[bytes]) -> Coded | Fixed | None:
    """A payload column's coded or fixed-width form (computing a derived column), or None for
    a plain list: encoders that have the form work per distinct value or per block."""
    if isinstance(col, LazyColumn):
        return col.form()
    if isinstance(col, FormColumn):
        return col.form
    if isinstance(col, CodedColumn):
        return col.form()
    return None


def used_only(form: Coded, limit: int = 32) -> Coded:
    """``form`` with its table cut to the values its codes use, when the table is longer than
    ``limit`` (a container table holds every known container; a batch uses a few)."""
    if len(form.table) <= limit or not len(form.codes):
        return form
    used = np.flatnonzero(np.bincount(form.codes, minlength=len(form.table)))
    if len(used) == len(form.table):
        return form
    remap = np.zeros(len(form.table), dtype=np.intp)
    remap[used] = np.arange(len(used), dtype=np.intp)
    return Coded([form.table[u] for u in used.tolist()], remap[form.codes])


def payload_block(batch: Batch, index: int) -> Block:
    """Payload ``index`` of every record as a NUL-padded block (a struct a source keeps beside
    payload 0: one row per record, without an object per record for coded and fixed forms)."""
    col = batch.extra[index - 1]
    form = column_form(col)
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
    form = column_form(col)
    cstring = f.base_kind is Kind.CSTRING
    n = len(batch)
    if isinstance(form, Coded):
        form = used_only(form)
        texts = [encode_basestring_ascii(_utf8(v.partition(b"\0")[0] if cstring else v))[1:-1]
                 for v in form.table]
        return _coded_texts(texts, form.codes)
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


def _coded_texts(texts: Sequence[str], codes: npt.NDArray[np.intp]) -> tuple[Block, bool]:
    """The block of a coded column given each distinct value's JSON text: one value for the
    whole batch is a broadcast row (it joins the template)."""
    n = len(codes)
    if n == 0 or not texts:
        return np.zeros((n, 1), dtype=np.uint8), True
    distinct: dict[str, int] = {}
    remap = [distinct.setdefault(t, len(distinct)) for t in texts]
    if len(distinct) < len(texts):  # tables appended when batches were merged
        codes = np.array(remap, dtype=np.intp)[codes]
        texts = list(distinct)
    table, _ = _text_block(texts)
    tlens = np.fromiter(map(len, texts), dtype=np.intp, count=len(texts))
    if len(texts) == 1 or bool((codes == codes[0]).all()):
        one = int(codes[0])
        return np.broadcast_to(table[one, : tlens[one]], (n, int(tlens[one]))), True
    return table[codes], bool((tlens[codes] == table.shape[1]).all())


def _number_texts(values: npt.NDArray[np.generic], kind: Kind) -> list[str]:
    """JSON texts of a few numbers (a coded column's distinct values), as the per-value
    encoder writes them."""
    if kind is Kind.BOOL:
        return ["true" if v == 1 else "false" for v in values.tolist()]
    return [str(v) for v in values.tolist()]


def _payload_number(batch: Batch, f: Field) -> tuple[Block, bool] | None:
    """An integer or bool field that is a whole further payload (an enrichment's
    ``containerPid``, ``hostnetwork``): per distinct value when coded, else as one column.
    None when an entry is not exactly the kind's width (the per-value path reports it)."""
    col = batch.extra[f.payload_index - 1]
    form = column_form(col)
    kind = f.base_kind
    width = KIND_WIDTH[kind]
    dtype = NUMPY_DTYPE[kind]
    n = len(batch)
    if isinstance(form, Coded):
        form = used_only(form)
        if any(len(v) != width for v in form.table):
            return None
        table = np.frombuffer(b"".join(form.table), dtype=dtype)
        return _coded_texts(_number_texts(table, kind), form.codes)
    if isinstance(form, Fixed):
        if form.matrix.shape[1] != width:
            return None
        values = np.ascontiguousarray(form.matrix).view(dtype).reshape(-1)
    else:
        data = b"".join(col)
        if len(data) != n * width or any(len(v) != width for v in col):
            return None
        values = np.frombuffer(data, dtype=dtype)
    if kind is Kind.BOOL:
        block = _TRUE_FALSE[(values == 1).astype(np.intp)]
        return block, bool(block[:, 4].all())
    return _ints(values)


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


@dataclass(frozen=True, slots=True)
class _Slot:
    """A field of the template and how it is encoded."""

    field: Field
    kind: str
    """``int``, ``bool``, ``cstring`` (a C string member), ``payload-string``,
    ``payload-number`` (a whole further payload), or ``other`` (the per-value fallback)."""


@dataclass(frozen=True, slots=True)
class _Template:
    """The lines' layout for one set of batch-constant values: constant text before each
    varying slot, and the text after the last one."""

    heads: tuple[bytes, ...]
    slots: tuple[_Slot, ...]
    tail: bytes


TEMPLATE_CACHE = 16
"""Templates kept per data source (a few sets of constant values alternate: one per busy
process, say)."""


class JsonLines:
    """Encodes batches of one data source as JSON lines.

    Most fields of a batch hold one value for all its records (one process's records share
    its name, ids, user, container; a struct nobody fills is zeros). Those are found with one
    comparison of every row to the first (and a look at each coded column's codes), written
    once into the line's template, and the template is kept for the next batches with the same
    constant values; only the fields that vary are encoded over the batch.

    Args:
        pieces: the template: constant text, or None where the next field's value goes.
        fields: the fields, in template order.
        fallback: the per-value encoder for fields with no vectorised form here.
    """

    def __init__(self, pieces: Sequence[str | None], fields: Sequence[Field],
                 fallback: Fallback) -> None:
        self._fallback = fallback
        self._plan: list[bytes | _Slot] = []
        it = iter(fields)
        for p in pieces:
            if p is None:
                f = next(it)
                slot = _Slot(f, self._vector_kind(f))
                if slot.kind in ("cstring", "payload-string"):
                    self._const(b'"')
                    self._plan.append(slot)
                    self._const(b'"')
                else:
                    self._plan.append(slot)
            else:
                self._const(p.encode())
        self._const(b"\n")
        self._slots = [item for item in self._plan if isinstance(item, _Slot)]
        # Payload-0 members: their byte ranges in a row, to tell from which bytes vary
        # whether they do.
        # Payload-0 members: their byte ranges in a row, to tell from which bytes vary
        # whether they do (and the bytes of the constant ones, for the template's key).
        self._row_slots = np.array([k for k, sl in enumerate(self._slots)
                                    if sl.field.payload_index == 0 and sl.kind != "other"],
                                   dtype=np.intp)
        self._row_starts = np.array([self._slots[k].field.offs for k in self._row_slots],
                                    dtype=np.intp)
        self._row_stops = self._row_starts + np.array(
            [_width(self._slots[k]) for k in self._row_slots], dtype=np.intp)
        size = int(self._row_stops.max(initial=0))
        # Compared as 64-bit words (rows are as wide as their record: whole words when the
        # record is, and payload 0 of a BPF struct is padded to its alignment).
        self._row_width = -(-size // 8) * 8
        self._row_cover = np.zeros((len(self._row_slots), size), dtype=np.bool_)
        for r, (a, b) in enumerate(zip(self._row_starts.tolist(), self._row_stops.tolist(),
                                       strict=True)):
            self._row_cover[r, a:b] = True
        # C strings: after the NUL a member holds stale ring memory, so one that varies
        # there is still constant when every row has row 0's bytes up to its NUL.
        self._row_cstrings = [(r, int(k), self._slots[k].field.offs, self._slots[k].field.size)
                              for r, k in enumerate(self._row_slots.tolist())
                              if self._slots[k].kind == "cstring"]
        # Members of struct payloads, by payload; whole further payloads.
        self._struct_slots: dict[int, tuple[Field, list[tuple[int, int, int]]]] = {}
        self._column_slots: list[tuple[int, int]] = []
        for k, sl in enumerate(self._slots):
            f = sl.field
            if f.payload_index == 0 or sl.kind == "other":
                continue
            if f.size:
                self._struct_slots.setdefault(f.payload_index, (f, []))[1].append(
                    (k, f.offs, f.offs + _width(sl)))
            else:
                self._column_slots.append((k, f.payload_index))
        self._templates: dict[tuple[Any, ...], _Template] = {}

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
                return "payload-number" if kind in _INT_KINDS or kind is Kind.BOOL else "other"
        if kind in _INT_KINDS:
            return "int"
        if kind is Kind.BOOL:
            return "bool"
        if kind is Kind.CSTRING and f.size:
            return "cstring"
        return "other"

    def _block(self, batch: Batch, slot: _Slot, payloads: dict[int, Block]
               ) -> tuple[Block, bool]:
        """One field of every record as a block, and whether every row fills it."""
        f, kind = slot.field, slot.kind
        if kind == "int":
            return _ints(_column(batch, f, payloads))
        if kind == "bool":
            block = _TRUE_FALSE[(_column(batch, f, payloads) == 1).astype(np.intp)]
            return block, bool(block[:, 4].all())
        if kind == "cstring":
            return _cstring(batch, f, payloads)
        if kind == "payload-string":
            return _payload_string(batch, f)
        got = _payload_number(batch, f) if kind == "payload-number" else None
        return got if got is not None else _text_block(self._fallback(batch, f))

    def _constants(self, batch: Batch, payloads: dict[int, Block]
                   ) -> tuple[list[bool], tuple[Any, ...]]:
        """Which slots hold one value in every record of a batch of two or more, and a key of
        those values' bytes (equal keys: equal texts)."""
        const = [False] * len(self._slots)
        key: list[Any] = []
        rows = batch.rows
        if len(self._row_slots):
            varying = _varying_bytes(rows[:, : self._row_width])
            counts = np.concatenate(([0], np.cumsum(varying)))
            same = counts[self._row_stops] == counts[self._row_starts]
            for k in self._row_slots[same].tolist():
                const[k] = True
            mask = self._row_cover[same].any(axis=0)
            key.append(rows[0, : len(mask)][mask].tobytes())
            for r, k, offs, size in self._row_cstrings:
                if same[r]:
                    continue
                nul = np.flatnonzero(rows[0, offs: offs + size] == 0)
                end = offs + (int(nul[0]) + 1 if len(nul) else size)
                part = rows[:, offs:end]  # bytes, not the words compared above
                if bool((part[-1] == part[0]).all()) and bool((part == part[0]).all()):
                    const[k] = True
                    key.append((k, rows[0, offs:end].tobytes()))
        for f, members in self._struct_slots.values():
            block = payload_source(batch, f, payloads)
            if block.strides[0] == 0:  # one value for all (a payload the source left out)
                for k, _, _ in members:
                    const[k] = True
                key.append(block[0].tobytes())
                continue
            v = _varying_bytes(block)
            parts: list[bytes | None] = []
            for k, a, b in members:
                same_member = not v[a:b].any()
                const[k] = same_member
                parts.append(block[0, a:b].tobytes() if same_member else None)
            key.append(tuple(parts))
        codes_same: dict[int, bool] = {}
        for k, index in self._column_slots:
            form = column_form(batch.extra[index - 1])
            if isinstance(form, Coded):
                codes = form.codes
                same_codes = codes_same.get(id(codes))
                if same_codes is None:
                    same_codes = codes_same[id(codes)] = bool(
                        codes[0] == codes[-1] and (codes == codes[0]).all())
                if same_codes:
                    const[k] = True
                    key.append(form.table[int(codes[0])])
            elif isinstance(form, Fixed):
                m = form.matrix
                if m.strides[0] == 0 or (bool((m[0] == m[-1]).all())
                                         and not _varying_bytes(m).any()):
                    const[k] = True
                    key.append(m[0].tobytes())
        return const, (tuple(const), *key)

    def _compile(self, batch: Batch, const: list[bool], payloads: dict[int, Block]
                 ) -> _Template:
        """The template with the constant slots' texts (taken from the first record)."""
        first = batch if len(batch) == 1 else _first_record(batch)
        one: dict[int, Block] = {}
        heads: list[bytes] = []
        slots: list[_Slot] = []
        text = bytearray()
        k = 0
        for item in self._plan:
            if isinstance(item, bytes):
                text += item
                continue
            if const[k]:
                block, _ = self._block(first, item, one)
                text += block[0].tobytes().replace(b"\0", b"")  # JSON text has no raw NUL
            else:
                heads.append(bytes(text))
                slots.append(item)
                text = bytearray()
            k += 1
        return _Template(tuple(heads), tuple(slots), bytes(text))

    def encode(self, batch: Batch) -> tuple[bytes | bytearray, npt.NDArray[np.intp]]:
        """Every record's JSON followed by a newline, concatenated, and where each line ends
        (exclusive offsets into the bytes, newline included)."""
        n = len(batch)
        if n == 0:
            return b"", np.zeros(0, dtype=np.intp)
        payloads: dict[int, Block] = {}
        if n == 1:  # every value is constant: the template is the line (not kept)
            line = self._compile(batch, [True] * len(self._slots), payloads).tail
            return line, np.array([len(line)], dtype=np.intp)
        const, key = self._constants(batch, payloads)
        cached = self._templates.get(key)
        if cached is not None:
            tmpl = cached
        else:
            tmpl = self._compile(batch, const, payloads)
            if len(self._templates) >= TEMPLATE_CACHE:
                self._templates.pop(next(iter(self._templates)))
            self._templates[key] = tmpl
        # The line as constant pieces and, between them, the blocks of the varying values.
        pieces: list[bytes] = []
        blocks: list[Block] = []
        nuls: list[npt.NDArray[np.intp]] = []  # NULs after the values, per filler block
        text = bytearray()
        for head, slot in zip(tmpl.heads, tmpl.slots, strict=True):
            text += head
            block, full = self._block(batch, slot, payloads)
            if full and (block.strides[0] == 0 or (bool((block[0] == block[-1]).all())
                                                   and bool((block == block[0]).all()))):
                # One value for the whole batch after all (a varying raw form with one text):
                # it joins the template row instead of being written row by row.
                text += block[0].tobytes()
                continue
            pieces.append(bytes(text))
            text = bytearray()
            blocks.append(block)
            if not full:
                nuls.append(np.count_nonzero(block == 0, axis=1))
        text += tmpl.tail
        pieces.append(bytes(text))
        if not nuls:
            # Every value as wide as its slot (one process's records, say): the rows are the
            # lines already.
            out, width = _lay_out(n, pieces, blocks)
            return out, np.arange(width, (n + 1) * width, width, dtype=np.intp)
        return _compact(n, pieces, blocks, nuls)


def _lay_out(n: int, pieces: list[bytes], blocks: list[Block]) -> tuple[bytearray, int]:
    """The rows pieces[0], blocks[0], pieces[1], ..., pieces[-1] of n records, one after the
    other, and their width: the pieces written once as a template row, then each block into
    its columns."""
    template = bytearray()
    offsets = []
    for piece, block in zip(pieces, blocks, strict=False):
        template += piece
        offsets.append(len(template))
        template += bytes(block.shape[1])
    template += pieces[-1]
    width = len(template)
    out = bytearray(n * width)
    matrix = np.frombuffer(out, dtype=np.uint8).reshape(n, width)
    matrix[:] = np.frombuffer(bytes(template), dtype=np.uint8)
    for off, block in zip(offsets, blocks, strict=True):
        matrix[:, off: off + block.shape[1]] = block
    return out, width


LONG_PIECE = 128
"""Constant text this long is written as one marker byte until the NULs are deleted."""
_MARKERS = [bytes([b]) for b in range(0x80, 0x100)]
"""Bytes that never occur in the encoded lines (they are ASCII: everything else is escaped)."""


def _compact(n: int, pieces: list[bytes], blocks: list[Block],
             nuls: list[npt.NDArray[np.intp]]) -> tuple[bytes | bytearray, npt.NDArray[np.intp]]:
    """The lines when some values are narrower than their slots (NULs after them; ``nuls``
    counts them per row of each such block).

    Deleting the NULs is one C loop over every byte (``bytes.translate``); most of a line is
    constant text, so each long constant piece is laid out as one marker byte, the NULs are
    deleted from that narrow matrix, and each marker is then replaced by its text
    (``bytes.replace``: a ``memchr`` and a ``memcpy`` per line). Where each line ends follows
    from the values' lengths.
    """
    long = sorted((k for k, p in enumerate(pieces) if len(p) >= LONG_PIECE),
                  key=lambda k: len(pieces[k]))[-len(_MARKERS):]
    marked = list(pieces)
    for j, k in enumerate(long):
        marked[k] = _MARKERS[j]
    out, _ = _lay_out(n, marked, blocks)
    data: bytes | bytearray = out.translate(None, b"\0")
    for j, k in enumerate(long):  # shortest first: the longest is copied once
        data = data.replace(_MARKERS[j], pieces[k])
    size = sum(map(len, pieces)) + sum(b.shape[1] for b in blocks)
    return data, np.cumsum(size - sum(nuls), dtype=np.intp)


def _width(slot: _Slot) -> int:
    """Bytes of its record a member slot reads."""
    f = slot.field
    return f.size if slot.kind == "cstring" else KIND_WIDTH[f.base_kind]


def _varying_bytes(block: Block) -> npt.NDArray[np.bool_]:
    """For each byte position of a block's rows, whether some row differs from the first
    (compared as 64-bit words when the rows allow it: 8 bytes per comparison)."""
    n, width = block.shape
    if n < 2:
        return np.zeros(width, dtype=np.bool_)
    if width % 8 == 0 and block.strides[1] == 1 and block.strides[0] % 8 == 0 \
            and block.ctypes.data % 8 == 0:
        words = block.view("<u8")
        differ = (words[1:] != words[0]).any(axis=0)
        return np.repeat(differ, 8)
    out: npt.NDArray[np.bool_] = (block[1:] != block[0]).any(axis=0)
    return out


def _first_record(batch: Batch) -> Batch:
    """Record 0 alone, its payload columns in the forms they have (nothing derived again)."""
    extra: list[Sequence[bytes]] = []
    for col in batch.extra:
        if isinstance(col, LazyColumn) and not col.computed:
            extra.append(col)  # not read by a constant slot
            continue
        form = column_form(col)
        if isinstance(form, Coded):
            extra.append(FormColumn(Coded(form.table, form.codes[:1])))
        elif isinstance(form, Fixed):
            extra.append(FormColumn(Fixed(form.matrix[:1])))
        else:
            extra.append([col[0]])
    return Batch(batch.schema, batch.rows[:1], tuple(extra))
