"""The ``derive`` operator: announces each data source's derived fields and attaches them to
every batch as lazy payload columns (pipeline/derive explains the rules and the laziness).

Further payloads a gadget declares (gadget.yaml ``payloads:``) that its source leaves out of a
batch are filled with their defaults here: zeros for a struct, empty for a string.

It runs first in every chain, so every later operator, the streams and the sinks see the
announced schema; attaching costs one small object per derived field per batch, whatever the
batch size, and computing happens only when a consumer reads a column.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.batch import Batch, DerivedGroup, DeriveStats, FormColumn, LazyColumn
from pipeline.derive import DeriveEnv, DerivePlan, DeriveSpec, build_plan
from pipeline.schema import DataSourceSchema


class Derive:
    """Derived fields for a run's data sources.

    Args:
        schemas: the data sources as the source emits them.
        spec: the gadget's derivation settings.
        env: what derivations share for this run (user names); one is made when None.
    """

    name = "derive"

    def __init__(self, schemas: Sequence[DataSourceSchema], spec: DeriveSpec,
                 env: DeriveEnv | None = None) -> None:
        self.stats = DeriveStats()
        env = env or DeriveEnv()
        self._plans: dict[str, DerivePlan] = {s.name: build_plan(s, spec, env) for s in schemas}
        self._defaults = {s.name: _defaults(s) for s in schemas}

    def output_schema(self, schema: DataSourceSchema) -> DataSourceSchema:
        plan = self._plans.get(schema.name)
        return schema if plan is None else plan.schema

    def process(self, batch: Batch) -> Batch:
        plan = self._plans.get(batch.schema.name)
        if plan is None:
            return batch
        if not plan.columns:
            return batch.with_schema(plan.schema)
        stored = plan.first_payload - 1
        if len(batch.extra) < stored:
            # Payloads the source left out hold their defaults (zeros, empty).
            n = len(batch)
            fill = tuple(FormColumn.constant(v, n) for v in self._defaults[batch.schema.name])
            batch = Batch(batch.schema, batch.rows, (*batch.extra, *fill[len(batch.extra):]))
        elif len(batch.extra) > stored:
            raise ValueError(f"data source {batch.schema.name!r}: the source filled "
                             f"{len(batch.extra) + 1} payloads, its layout has "
                             f"{plan.first_payload}")
        group = DerivedGroup(batch, self.stats)
        lazy = tuple(LazyColumn(fn, group, key) for key, fn in plan.columns)
        return Batch(plan.schema, batch.rows, (*batch.extra, *lazy))


def _defaults(schema: DataSourceSchema) -> list[bytes]:
    """The entry of each further payload a source may leave out: zeros for a struct (a payload
    whose fields have offsets in it), empty for a whole-entry field."""
    out = []
    for p in range(1, schema.payload_count):
        top = [f for f in schema.fields if f.payload_index == p and f.parent is None]
        out.append(bytes(top[0].size) if top and top[0].size else b"")
    return out
