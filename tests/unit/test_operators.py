"""Filter and field selection over batches, checked against per-record Python expectations."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.batch import Batch
from pipeline.layout import StructRegistry
from pipeline.operators import OperatorError
from pipeline.operators.fields import FieldSelect
from pipeline.operators.filter import Filter
from pipeline.schema import DataSourceSchema, DataSourceType

REG = StructRegistry(structs={
    "inner": ["u32 uid", "u32 gid"],
    "ev": ["u32 pid", "char comm[16]", "struct inner creds", "s64 delta", "bool ok"],
})


def schema() -> DataSourceSchema:
    fields, size = REG.fields("ev")
    return DataSourceSchema("ev", DataSourceType.SINGLE, tuple(fields), size)


def make(rows: list[tuple[int, bytes, int, int, bool]]) -> Batch:
    s = schema()
    out = np.zeros((len(rows), s.record_size), dtype=np.uint8)
    for i, (pid, comm, uid, delta, ok) in enumerate(rows):
        rec = bytearray(s.record_size)
        rec[0:4] = pid.to_bytes(4, "little")
        # garbage after the NUL, as ring memory would hold
        rec[4:20] = (comm + b"\0" + b"\xff" * 16)[:16]
        rec[20:24] = uid.to_bytes(4, "little")
        rec[32:40] = delta.to_bytes(8, "little", signed=True)
        rec[40] = int(ok)
        out[i] = np.frombuffer(bytes(rec), dtype=np.uint8)
    return Batch(s, out)


ROWS = [(1, b"bash", 0, -5, True), (200, b"bashful", 1000, 7, False), (300, b"sh", 1000, 0, True),
        (42, b"bas", 0, 99, False), (7, b"0123456789abcdef", 5, 1, True)]


def pids(b: Batch) -> list[int]:
    return b.rows[:, 0:4].copy().view("<u4").reshape(-1).tolist()


@pytest.mark.parametrize(("expr", "want"), [
    ("comm==bash", [1]),
    ("comm!=bash", [200, 300, 42, 7]),
    ("comm==0123456789abcdef", [7]),
    ("pid>100", [200, 300]),
    ("pid>=42,pid<=200", [200, 42]),
    ("creds.uid==1000", [200, 300]),
    ("delta<0", [1]),
    ("ok==true", [1, 300, 7]),
    ("comm~^ba", [1, 200, 42]),
    ("comm!~sh", [42, 7]),
    ("ev:pid==7", [7]),
])
def test_filter_matches_python_semantics(expr: str, want: list[int]) -> None:
    b = make(ROWS)
    assert pids(Filter(expr, [b.schema]).process(b)) == want


@pytest.mark.parametrize(("expr", "message"), [
    ("nosuch==1", "no field 'nosuch'"),
    ("pid==abc", "not a valid value"),
    ("comm>3", "use ==, != or ~"),
    ("comm~(", "bad regular expression"),
    ("pid", "cannot parse"),
    ("other:pid==1", "no data source 'other'"),
])
def test_bad_filters_name_the_problem(expr: str, message: str) -> None:
    with pytest.raises(OperatorError, match=message.replace("(", r"\(")):
        Filter(expr, [schema()])


def test_field_selection_changes_the_schema_not_the_bytes() -> None:
    b = make(ROWS)
    op = FieldSelect("pid,creds", [b.schema])
    out = op.process(b)
    assert [f.full_name for f in out.schema.fields] == ["pid", "creds", "creds.uid", "creds.gid"]
    assert out.rows is b.rows
    assert out.schema.fields[2].parent == 1


def test_field_selection_refuses_unknown_fields() -> None:
    with pytest.raises(OperatorError, match="no field 'nope'"):
        FieldSelect("pid,nope", [schema()])
