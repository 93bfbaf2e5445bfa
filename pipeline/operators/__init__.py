"""Per-batch operators: each maps a batch to a batch, vectorised, decoding only what it reads."""

from __future__ import annotations

from typing import Protocol

from pipeline.batch import Batch
from pipeline.schema import DataSourceSchema


class Operator(Protocol):
    """One step of a run's chain, applied to every batch in order."""

    name: str

    def output_schema(self, schema: DataSourceSchema) -> DataSourceSchema:
        """The schema of what :meth:`process` returns for a batch of ``schema``."""
        ...

    def process(self, batch: Batch) -> Batch:
        """The batch after this step (possibly empty); never mutates shared memory."""
        ...


class OperatorError(ValueError):
    """An operator's parameter is invalid; ``param`` names it, the message says why."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param}: {reason}")
        self.param = param
        self.reason = reason
