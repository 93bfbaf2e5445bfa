"""The ``filter`` operator: comparisons on fields, evaluated over a whole batch at once.

Syntax (comma-separated, all must hold): ``field==value``, ``!=``, ``>``, ``>=``, ``<``, ``<=``,
``~regex`` and ``!~regex``; for several data sources prefix a data source, ``exec:proc.comm==sh``.
Numbers compare as numbers, strings as bytes (a CString up to its first NUL).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.accessors import column, cstrings, raw_slices
from pipeline.batch import Batch
from pipeline.operators import OperatorError
from pipeline.schema import NUMPY_DTYPE, DataSourceSchema, Field, Kind

PARAM = "operator.filter.filter"

_EXPR = re.compile(r"^\s*(?:(?P<ds>[\w-]+):)?(?P<field>[\w.]+)\s*(?P<op>==|!=|>=|<=|!~|>|<|~|=)"
                   r"(?P<value>.*)$")
_NUMERIC_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq, "=": operator.eq, "!=": operator.ne, ">": operator.gt,
    ">=": operator.ge, "<": operator.lt, "<=": operator.le,
}

Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class Condition:
    datasource: str | None
    field: str
    op: str
    value: str


def parse(expr: str) -> list[Condition]:
    """Parses a filter string; raises OperatorError saying which part is wrong."""
    out = []
    for part in (p for p in expr.split(",") if p.strip()):
        m = _EXPR.match(part)
        if not m:
            raise OperatorError(PARAM, f"cannot parse {part.strip()!r}: expected FIELD OP VALUE "
                                "with OP one of ==, !=, >, >=, <, <=, ~, !~")
        out.append(Condition(m["ds"], m["field"], m["op"], m["value"].strip()))
    return out


def _compile(schema: DataSourceSchema, c: Condition) -> Callable[[Batch], Mask]:
    try:
        f = schema.field(c.field)
    except KeyError as e:
        raise OperatorError(PARAM, str(e.args[0])) from None
    kind = f.base_kind
    if c.op in ("~", "!~"):
        try:
            rx = re.compile(c.value)
        except re.error as e:
            raise OperatorError(PARAM, f"bad regular expression {c.value!r}: {e}") from None
        want = c.op == "~"

        def regex(batch: Batch) -> Mask:
            texts = _texts(batch, f)
            return np.fromiter((bool(rx.search(t)) == want for t in texts), bool, len(texts))
        return regex
    if f.is_array:
        raise OperatorError(PARAM, f"field {f.full_name!r} is an array; only ~ applies")
    if kind in NUMPY_DTYPE:
        return _numeric(f, c)
    if c.op not in ("==", "=", "!="):
        raise OperatorError(PARAM, f"field {f.full_name!r} is a {kind.name.lower()}: "
                            f"use ==, != or ~, not {c.op}")
    return _bytes_equal(f, c)


def _numeric(f: Field, c: Condition) -> Callable[[Batch], Mask]:
    kind = f.base_kind
    raw = c.value
    value: int | float | bool
    try:
        if kind is Kind.BOOL:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            value = raw.lower() in ("true", "1")
        elif kind in (Kind.FLOAT32, Kind.FLOAT64):
            value = float(raw)
        else:
            value = int(raw, 0)
    except ValueError:
        raise OperatorError(PARAM, f"field {f.full_name!r} is {kind.name.lower()}, "
                            f"{raw!r} is not a valid value") from None
    op = _NUMERIC_OPS[c.op]

    def numeric(batch: Batch) -> Mask:
        return np.asarray(op(column(batch, f), value), dtype=bool)
    return numeric


def _bytes_equal(f: Field, c: Condition) -> Callable[[Batch], Mask]:
    want = c.value.encode()
    negate = c.op == "!="
    cstring = f.base_kind is Kind.CSTRING
    if f.payload_index == 0 and f.size and cstring:
        if len(want) > f.size:
            def never(batch: Batch) -> Mask:
                return np.full(len(batch), negate, dtype=bool)
            return never
        # Compare the prefix and require a NUL right after it (or the field's end).
        pattern = np.frombuffer(want, dtype=np.uint8)
        end = f.offs + len(want)

        def fixed(batch: Batch) -> Mask:
            rows = batch.rows
            eq = np.all(rows[:, f.offs:end] == pattern, axis=1)
            if len(want) < f.size:
                eq &= rows[:, end] == 0
            return np.asarray(~eq if negate else eq, dtype=bool)
        return fixed

    def general(batch: Batch) -> Mask:
        vals = raw_slices(batch, f)
        if cstring:
            vals = [v.split(b"\0", 1)[0] for v in vals]
        eq = np.fromiter((v == want for v in vals), bool, len(vals))
        return ~eq if negate else eq
    return general


def _texts(batch: Batch, f: Field) -> list[str]:
    kind = f.base_kind
    if kind is Kind.CSTRING:
        return cstrings(batch, f)
    if kind in NUMPY_DTYPE and not f.is_array:
        return [str(v) for v in column(batch, f).tolist()]
    return [b.decode("utf-8", "replace") for b in raw_slices(batch, f)]


class Filter:
    """Keeps the records of each data source that satisfy all its conditions."""

    name = "filter"

    def __init__(self, expr: str, schemas: list[DataSourceSchema]) -> None:
        conds = parse(expr)
        self._checks: dict[str, list[Callable[[Batch], Mask]]] = {}
        for c in conds:
            targets = [s for s in schemas if c.datasource in (None, s.name)]
            if c.datasource is not None and not targets:
                names = ", ".join(s.name for s in schemas)
                raise OperatorError(PARAM, f"no data source {c.datasource!r} (have: {names})")
            if c.datasource is None and len(schemas) > 1:
                targets = [s for s in schemas if _has_field(s, c.field)] or targets
            for s in targets:
                self._checks.setdefault(s.name, []).append(_compile(s, c))

    def output_schema(self, schema: DataSourceSchema) -> DataSourceSchema:
        return schema

    def process(self, batch: Batch) -> Batch:
        checks = self._checks.get(batch.schema.name)
        if not checks or not len(batch):
            return batch
        mask = checks[0](batch)
        for check in checks[1:]:
            mask &= check(batch)
        return batch if mask.all() else batch.select(mask)


def _has_field(s: DataSourceSchema, name: str) -> bool:
    try:
        s.field(name)
    except KeyError:
        return False
    return True
