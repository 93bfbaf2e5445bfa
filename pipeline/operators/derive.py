"""The ``derive`` operator: announces each data source's derived fields and attaches them to
every batch as lazy payload columns (pipeline/derive explains the rules and the laziness).

It runs first in every chain, so every later operator, the streams and the sinks see the
announced schema; attaching costs one small object per derived field per batch, whatever the
batch size, and computing happens only when a consumer reads a column.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.batch import Batch, DerivedGroup, DeriveStats, LazyColumn
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

    def output_schema(self, schema: DataSourceSchema) -> DataSourceSchema:
        plan = self._plans.get(schema.name)
        return schema if plan is None else plan.schema

    def process(self, batch: Batch) -> Batch:
        plan = self._plans.get(batch.schema.name)
        if plan is None:
            return batch
        if not plan.columns:
            return batch.with_schema(plan.schema)
        if len(batch.extra) != plan.first_payload - 1:
            raise ValueError(f"data source {batch.schema.name!r}: the source filled "
                             f"{len(batch.extra) + 1} payloads, its layout has "
                             f"{plan.first_payload}")
        group = DerivedGroup(batch, self.stats)
        lazy = tuple(LazyColumn(fn, group, key) for key, fn in plan.columns)
        return Batch(plan.schema, batch.rows, (*batch.extra, *lazy))
