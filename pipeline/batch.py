"""Batches: one data source's records as one contiguous block, never one object per record.

Payload 0 of every record is a row of :attr:`Batch.rows`; payloads 1..P-1 are columns of
:attr:`Batch.extra`, one ``bytes`` per record. A column may be a :class:`LazyColumn`: a derived
payload (pipeline/derive) that is computed from the batch's raw columns the first time anyone
reads it, once for every consumer of the batch, and never when nobody does. The methods here
that reshape a batch (:meth:`Batch.select`, :meth:`Batch.slice`, :meth:`Batch.concat`) keep such
columns lazy. A column may also be a :class:`CodedColumn`: values an operator adds that repeat
across records (the container a record's process runs in), as distinct values and codes; the
reshaping methods keep it coded, and the wire encoder frames each distinct value once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import numpy.typing as npt

from pipeline.schema import DataSourceSchema

Rows = npt.NDArray[np.uint8]
"""Payload 0 of every record in a batch: shape (n, record_size), C-contiguous."""


@dataclass(slots=True)
class Batch:
    """Records of one data source.

    Args:
        schema: the data source the records belong to.
        rows: payload 0 (the BPF struct) of each record, one row per record.
        extra: payloads 1..P-1, each a sequence with one ``bytes`` per record.
    """

    schema: DataSourceSchema
    rows: Rows
    extra: tuple[Sequence[bytes], ...] = field(default=())

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def select(self, mask: npt.NDArray[np.bool_]) -> Batch:
        """The records where ``mask`` is true (copies; derived columns stay lazy)."""
        rows = self.rows[mask]
        if not self.extra:
            return Batch(self.schema, rows)
        idx = np.flatnonzero(mask)
        groups: dict[int, DerivedGroup] = {}
        out: list[Sequence[bytes]] = []
        codes_taken: dict[int, npt.NDArray[np.intp]] = {}  # shared codes stay shared
        for col in self.extra:
            if isinstance(col, LazyColumn):
                out.append(col.taken(idx, rows, groups))
            elif isinstance(col, CodedColumn):
                taken = codes_taken.setdefault(id(col.codes), col.codes[idx])
                out.append(CodedColumn(col.values, taken))
            elif isinstance(col, FormColumn):
                out.append(col.taken(idx))
            else:
                out.append(_take(col, idx))
        return Batch(self.schema, rows, tuple(out))

    def slice(self, start: int, stop: int | None = None) -> Batch:
        """Records ``[start, stop)``: a view of the rows, derived columns stay lazy."""
        rows = self.rows[start:stop]
        if not self.extra:
            return Batch(self.schema, rows)
        groups: dict[int, DerivedGroup] = {}
        out: list[Sequence[bytes]] = []
        codes: dict[int, npt.NDArray[np.intp]] = {}
        for col in self.extra:
            if isinstance(col, LazyColumn):
                out.append(col.sliced(start, stop, rows, groups))
            elif isinstance(col, CodedColumn):  # columns sharing codes keep sharing them
                view = codes.setdefault(id(col.codes), col.codes[start:stop])
                out.append(CodedColumn(col.values, view))
            else:
                out.append(col[start:stop])
        return Batch(self.schema, rows, tuple(out))

    @staticmethod
    def concat(batches: Sequence[Batch]) -> Batch:
        """One batch holding the records of ``batches`` (one schema), in order; derived columns
        stay lazy unless every part has computed them already."""
        first = batches[0]
        if len(batches) == 1:
            return first
        rows = np.concatenate([b.rows for b in batches])
        groups: dict[tuple[int, ...], DerivedGroup] = {}
        out = tuple(_joined([b.extra[i] for b in batches], rows, groups)
                    for i in range(len(first.extra)))
        return Batch(first.schema, rows, out)

    def with_schema(self, schema: DataSourceSchema) -> Batch:
        return Batch(schema, self.rows, self.extra)

    def payloads(self, i: int) -> list[bytes]:
        """Every payload entry of record ``i`` (the slow, general path)."""
        return [self.rows[i].tobytes(), *(col[i] for col in self.extra)]

    @classmethod
    def from_records(cls, schema: DataSourceSchema, records: Sequence[bytes],
                     extra: tuple[Sequence[bytes], ...] = ()) -> Batch:
        """Builds a batch from payload-0 byte strings (tests, replay); short ones are padded."""
        size = schema.record_size
        rows = np.zeros((len(records), size), dtype=np.uint8)
        for i, r in enumerate(records):
            b = np.frombuffer(r[:size], dtype=np.uint8)
            rows[i, : b.size] = b
        return cls(schema, rows, extra)

    @classmethod
    def empty(cls, schema: DataSourceSchema) -> Batch:
        return cls(schema, np.zeros((0, schema.record_size), dtype=np.uint8),
                   tuple([] for _ in range(schema.payload_count - 1)))


def _joined(cols: Sequence[Sequence[bytes]], rows: Rows,
            groups: dict[tuple[int, ...], DerivedGroup]) -> Sequence[bytes]:
    """One payload column of several batches, one after the other, in the form the parts
    share (lazy, coded, fixed-width): a list of every entry only when they share none."""
    if all(isinstance(c, LazyColumn) for c in cols):
        return LazyColumn.joined([c for c in cols if isinstance(c, LazyColumn)], rows, groups)
    if all(isinstance(c, CodedColumn) for c in cols):
        return CodedColumn.joined([c for c in cols if isinstance(c, CodedColumn)])
    if all(isinstance(c, FormColumn) for c in cols):
        return FormColumn.joined([c for c in cols if isinstance(c, FormColumn)])
    return [x for c in cols for x in c]


def join_forms(forms: Sequence[Coded | Fixed | None]) -> Coded | Fixed | None:
    """Columns in coded or fixed-width form, one after the other, in that form: coded ones
    sharing a table keep it (else the tables are appended), fixed-width ones of one width
    are stacked. None when the parts have no common form."""
    if not forms:
        return None
    first = forms[0]
    if isinstance(first, Coded) and all(isinstance(f, Coded) for f in forms):
        coded = [f for f in forms if isinstance(f, Coded)]
        if all(f.table is first.table or (len(f.table) == len(first.table) <= 64
                                          and list(f.table) == list(first.table))
               for f in coded):
            return Coded(first.table, np.concatenate([f.codes for f in coded]))
        table: list[bytes] = []
        codes = []
        for f in coded:
            codes.append(f.codes + len(table))
            table += list(f.table)
        return Coded(table, np.concatenate(codes))
    if isinstance(first, Fixed) and all(isinstance(f, Fixed) and
                                        f.matrix.shape[1] == first.matrix.shape[1]
                                        for f in forms):
        return Fixed(np.concatenate([f.matrix for f in forms if isinstance(f, Fixed)]))
    return None


def _take(col: Sequence[bytes], idx: npt.NDArray[np.intp]) -> Sequence[bytes]:
    if isinstance(col, FormColumn):
        return col.taken(idx)
    if isinstance(col, list) and len(col) == 0:
        return []
    return [col[i] for i in idx.tolist()]


def object_column(values: Sequence[bytes]) -> npt.NDArray[np.object_]:
    """``values`` as a 1-D numpy object array (``np.array`` would make a fixed-width S array or
    a 2-D one; this keeps the bytes objects themselves, for take-by-index)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


@dataclass(frozen=True, slots=True)
class Coded:
    """A column as its distinct values and, per record, an index into them: what most derived
    columns are (an errno name, a user name, a signal name), and what encoders can use to encode
    each distinct value once."""

    table: Sequence[bytes]
    codes: npt.NDArray[np.intp]

    def values(self) -> list[bytes]:
        if len(self.codes) == 0:
            return []
        return object_column(self.table)[self.codes].tolist()  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class Fixed:
    """A column whose entries all have the same length, as one (n, width) byte matrix (what a
    timestamp text is): encoders copy it as a block, with no object per record."""

    matrix: npt.NDArray[np.uint8]

    def values(self) -> list[bytes]:
        n, width = self.matrix.shape
        if width == 0:
            return [b""] * n
        out: list[bytes] = np.ascontiguousarray(self.matrix).view(f"V{width}").reshape(
            -1).tolist()
        return out


class CodedColumn(Sequence[bytes]):
    """A payload column as its distinct values and one code (an index into them) per record,
    readable as a sequence: what an operator adds when few values repeat over many records
    (the enrich operator: one value per container), so that nothing downstream holds one
    object per record unless it iterates. :meth:`form` is the :class:`Coded` view encoders
    use (pipeline/wire.py frames each distinct value once).

    Args:
        values: the distinct values.
        codes: for each record, the index of its value.
    """

    __slots__ = ("codes", "values")

    def __init__(self, values: Sequence[bytes], codes: npt.NDArray[np.integer[Any]]) -> None:
        self.values = list(values)
        self.codes: npt.NDArray[np.intp] = np.asarray(codes, dtype=np.intp)

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    @overload
    def __getitem__(self, i: int) -> bytes: ...

    @overload
    def __getitem__(self, i: slice) -> CodedColumn: ...

    def __getitem__(self, i: int | slice) -> bytes | CodedColumn:
        if isinstance(i, slice):
            return CodedColumn(self.values, self.codes[i])
        return self.values[int(self.codes[i])]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.tolist())

    def form(self) -> Coded:
        return Coded(self.values, self.codes)

    def take(self, idx: npt.NDArray[np.intp]) -> CodedColumn:
        return CodedColumn(self.values, self.codes[idx])

    def tolist(self) -> list[bytes]:
        return Coded(self.values, self.codes).values()

    @staticmethod
    def joined(parts: Sequence[CodedColumn]) -> CodedColumn:
        """``parts`` one after the other (their value tables appended)."""
        form = join_forms([p.form() for p in parts])
        if not isinstance(form, Coded):  # no parts
            return CodedColumn([], np.zeros(0, np.intp))
        return CodedColumn(form.table, form.codes)

    @classmethod
    def constant(cls, value: bytes, n: int) -> CodedColumn:
        return cls([value], np.zeros(n, dtype=np.intp))


Derived = list[bytes] | Coded | Fixed
"""What a derivation returns: one payload entry per record, plainly, coded or fixed-width."""


class FormColumn(Sequence[bytes]):
    """A payload column a source filled in coded or fixed-width form (a constant, a block cut
    from the record): encoders copy it as a block; ``values()`` makes the per-record list only
    for a consumer that wants one."""

    __slots__ = ("_values", "form")

    def __init__(self, form: Coded | Fixed) -> None:
        self.form = form
        self._values: list[bytes] | None = None

    @classmethod
    def constant(cls, value: bytes, n: int) -> FormColumn:
        """``value`` in each of ``n`` records."""
        return cls(Coded([value], np.zeros(n, dtype=np.intp)))

    def values(self) -> list[bytes]:
        if self._values is None:
            self._values = self.form.values()
        return self._values

    def __len__(self) -> int:
        f = self.form
        return len(f.codes) if isinstance(f, Coded) else int(f.matrix.shape[0])

    @overload
    def __getitem__(self, i: int) -> bytes: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[bytes]: ...

    def __getitem__(self, i: int | slice) -> bytes | Sequence[bytes]:
        if isinstance(i, slice) and i.step in (None, 1):
            return FormColumn(_form_part(self.form, i))
        return self.values()[i]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.values())

    def taken(self, idx: npt.NDArray[np.intp]) -> FormColumn:
        return FormColumn(_form_part(self.form, idx))

    @staticmethod
    def joined(parts: Sequence[FormColumn]) -> Sequence[bytes]:
        form = join_forms([p.form for p in parts])
        if form is not None:
            return FormColumn(form)
        return [x for p in parts for x in p.values()]


def _form_part(form: Coded | Fixed, sel: npt.NDArray[np.intp] | slice) -> Coded | Fixed:
    if isinstance(form, Coded):
        return Coded(form.table, form.codes[sel])
    return Fixed(form.matrix[sel])


class DeriveStats:
    """How much derivation a run did: tests and the bench read it to see that a run whose
    consumers read only raw fields derived nothing."""

    __slots__ = ("columns", "records")

    def __init__(self) -> None:
        self.columns = 0
        self.records = 0


class DerivedGroup:
    """What the derived columns of one batch share: the raw batch they are computed from
    (payload 0 and the payloads its source stored) and a memo for intermediate results that
    several columns use (an address's text for both ``addr`` and ``endpoint``)."""

    __slots__ = ("base", "memo", "stats")

    def __init__(self, base: Batch, stats: DeriveStats) -> None:
        self.base = base
        self.memo: dict[str, Any] = {}
        self.stats = stats

    def rebased(self, rows: Rows, stored: tuple[Sequence[bytes], ...]) -> DerivedGroup:
        return DerivedGroup(Batch(self.base.schema, rows, stored), self.stats)


Derivation = Callable[[Batch, dict[str, Any]], Derived]
"""Computes one derived payload for every record of a raw batch; the dict is the group memo."""


class LazyColumn(Sequence[bytes]):
    """A derived payload column, computed on first read and kept.

    Args:
        derive: the derivation.
        group: the raw batch it reads and the shared memo.
        key: the derived field's full name (for errors and the memo).
    """

    __slots__ = ("_done", "_form", "_values", "derive", "group", "key")

    def __init__(self, derive: Derivation, group: DerivedGroup, key: str) -> None:
        self.derive = derive
        self.group = group
        self.key = key
        self._done = False
        self._values: list[bytes] | None = None
        self._form: Coded | Fixed | None = None

    @classmethod
    def _computed(cls, like: LazyColumn, group: DerivedGroup, values: list[bytes] | None,
                  form: Coded | Fixed | None) -> LazyColumn:
        out = cls(like.derive, group, like.key)
        out._done, out._values, out._form = True, values, form
        return out

    @property
    def computed(self) -> bool:
        return self._done

    def _ensure(self) -> None:
        if self._done:
            return
        out = self.derive(self.group.base, self.group.memo)
        n = len(self.group.base)
        if isinstance(out, Coded):
            got = len(out.codes)
            self._form = out
        elif isinstance(out, Fixed):
            got = out.matrix.shape[0]
            self._form = out
        else:
            got = len(out)
            self._values = out
        if got != n:
            raise ValueError(f"derived field {self.key!r}: {got} values for {n} records")
        self._done = True
        self.group.stats.columns += 1
        self.group.stats.records += n

    def _compute(self) -> list[bytes]:
        self._ensure()
        if self._values is None:
            assert self._form is not None
            self._values = self._form.values()
        return self._values

    def values(self) -> list[bytes]:
        """Every record's entry (computes it if nobody has yet)."""
        return self._compute()

    def form(self) -> Coded | Fixed | None:
        """The column as its derivation produced it when coded or fixed-width (computes it);
        None for a plain list."""
        self._ensure()
        return self._form

    def __len__(self) -> int:
        return len(self.group.base)

    @overload
    def __getitem__(self, i: int) -> bytes: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[bytes]: ...

    def __getitem__(self, i: int | slice) -> bytes | Sequence[bytes]:
        if isinstance(i, slice):
            if i.step not in (None, 1):
                return self._compute()[i]
            base = self.group.base
            return self.sliced(i.start or 0, i.stop, base.rows[i.start:i.stop], {})
        return self._compute()[i]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._compute())

    # -- reshaping, without computing ---------------------------------------------------------

    def taken(self, idx: npt.NDArray[np.intp], rows: Rows,
              groups: dict[int, DerivedGroup]) -> Sequence[bytes]:
        """The entries at ``idx``; ``rows`` are the batch's rows already taken."""
        g = groups.get(id(self.group))
        if g is None:
            stored = tuple(_take(c, idx) for c in self.group.base.extra)
            g = groups[id(self.group)] = self.group.rebased(rows, stored)
        if not self._done:
            return LazyColumn(self.derive, g, self.key)
        form = self._form
        if isinstance(form, Coded):
            form = Coded(form.table, form.codes[idx])
        elif isinstance(form, Fixed):
            form = Fixed(form.matrix[idx])
        values = None if self._values is None else [self._values[i] for i in idx.tolist()]
        return LazyColumn._computed(self, g, values, form)

    def sliced(self, start: int, stop: int | None, rows: Rows,
               groups: dict[int, DerivedGroup]) -> Sequence[bytes]:
        g = groups.get(id(self.group))
        if g is None:
            stored = tuple(c[start:stop] for c in self.group.base.extra)
            g = groups[id(self.group)] = self.group.rebased(rows, stored)
        if not self._done:
            return LazyColumn(self.derive, g, self.key)
        form = self._form
        if isinstance(form, Coded):
            form = Coded(form.table, form.codes[start:stop])
        elif isinstance(form, Fixed):
            form = Fixed(form.matrix[start:stop])
        values = self._values[start:stop] if self._values is not None else None
        return LazyColumn._computed(self, g, values, form)

    @staticmethod
    def joined(parts: Sequence[LazyColumn], rows: Rows,
               groups: dict[tuple[int, ...], DerivedGroup]) -> Sequence[bytes]:
        """``parts`` one after the other; ``rows`` are the concatenated rows."""
        key = tuple(id(p.group) for p in parts)
        g = groups.get(key)
        if g is None:
            first = parts[0].group
            stored = tuple(_joined([p.group.base.extra[i] for p in parts], rows, {})
                           for i in range(len(first.base.extra)))
            g = groups[key] = first.rebased(rows, stored)
        if all(p._done for p in parts):
            # Computed parts stay in their form (coded, fixed-width): a sink that merges
            # queued batches gets blocks, not an object per record.
            form = join_forms([p._form for p in parts])
            if form is not None:
                return LazyColumn._computed(parts[0], g, None, form)
            return LazyColumn._computed(parts[0], g, [x for p in parts for x in p._compute()],
                                        None)
        return LazyColumn(parts[0].derive, g, parts[0].key)
