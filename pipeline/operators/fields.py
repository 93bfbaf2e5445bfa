"""The ``fields`` operator: selects which fields a data source announces.

Payload 0 passes through untouched, so selecting is free on the hot path and decoders simply
never look at the other fields of the record. Further payloads (derived fields, enrichment)
that no selected field references are dropped from the batch and the remaining ones
renumbered, so they are neither sent nor, for derived ones, ever computed.
"""

from __future__ import annotations

from dataclasses import replace

from pipeline.batch import Batch
from pipeline.operators import OperatorError
from pipeline.schema import DataSourceSchema, Field

PREFIX = "operator.fields."
PARAM = PREFIX + "fields-select"
"""Not ``fields``: upstream clients run their own ``cli`` operator, whose ``fields`` param
becomes the ``--fields`` flag; a second ``fields`` key makes them panic."""
OLD_PARAM = PREFIX + "fields"
"""The key before: still accepted as the same param."""


def parse(spec: str) -> dict[str | None, list[str]]:
    """``a,b`` for every data source, or ``ds:a,b;ds2:c``."""
    out: dict[str | None, list[str]] = {}
    for group in (g for g in spec.split(";") if g.strip()):
        ds, _, names = group.rpartition(":")
        out[ds.strip() or None] = [n.strip() for n in names.split(",") if n.strip()]
    return out


class FieldSelect:
    """Announces only the selected fields (with their parents) of each data source."""

    name = "fields"

    def __init__(self, spec: str, schemas: list[DataSourceSchema]) -> None:
        wanted = parse(spec)
        self._schemas: dict[str, DataSourceSchema] = {}
        self._kept: dict[str, tuple[int, ...]] = {}
        for s in schemas:
            names = wanted.get(s.name, wanted.get(None))
            if names is None:
                continue
            self._schemas[s.name], self._kept[s.name] = _compact(_select(s, names))
        for ds in wanted:
            if ds is not None and ds not in {s.name for s in schemas}:
                raise OperatorError(PARAM, f"no data source {ds!r}")

    def output_schema(self, schema: DataSourceSchema) -> DataSourceSchema:
        return self._schemas.get(schema.name, schema)

    def process(self, batch: Batch) -> Batch:
        out = self._schemas.get(batch.schema.name)
        if out is None:
            return batch
        kept = self._kept[batch.schema.name]
        if len(kept) == len(batch.extra):
            return batch.with_schema(out)
        return Batch(out, batch.rows, tuple(batch.extra[p - 1] for p in kept))


def _compact(schema: DataSourceSchema) -> tuple[DataSourceSchema, tuple[int, ...]]:
    """The schema with the payloads no kept field references removed (payload 0 always
    stays), and the old indexes of the further payloads kept, in order."""
    used = sorted({f.payload_index for f in schema.fields if f.has_value} - {0})
    renumber = {p: i + 1 for i, p in enumerate(used)}
    fields = [replace(f, payload_index=renumber.get(f.payload_index, 0)) for f in schema.fields]
    return replace(schema, fields=tuple(fields), payload_count=len(used) + 1), tuple(used)


def _select(schema: DataSourceSchema, names: list[str]) -> DataSourceSchema:
    by_index = {f.index: f for f in schema.fields}
    keep: set[int] = set()
    for name in names:
        try:
            f: Field | None = schema.field(name)
        except KeyError as e:
            raise OperatorError(PARAM, str(e.args[0])) from None
        # Children of a selected block come along; parents keep the tree well-formed.
        prefix = name + "."
        keep.update(c.index for c in schema.fields if c.full_name.startswith(prefix))
        while f is not None:
            keep.add(f.index)
            f = by_index.get(f.parent) if f.parent is not None else None
    return schema.with_fields(f for f in schema.fields if f.index in keep)
