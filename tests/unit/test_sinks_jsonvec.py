"""The batch JSON encoder (pipeline/sinks/jsonvec.py) against ``json.dumps`` of each record,
byte for byte, over random batches: every integer width and sign at its extremes, bools, floats,
C strings with stale bytes after the NUL, no NUL at all, quotes, control characters, non-ASCII
and invalid UTF-8, strings longer than the search head, and batches where every value has the
same width (the path with no NUL to delete) or not."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import pytest

from pipeline.batch import Batch, Coded, Fixed, FormColumn
from pipeline.layout import StructRegistry
from pipeline.schema import KIND_WIDTH, DataSourceSchema, DataSourceType, Field, FieldFlag, Kind
from pipeline.sinks.encode import JsonEncoder

REG = StructRegistry(
    typedefs={},
    structs={
        "inner": ["char name[16]", "s32 n"],
        "ev": ["u64 a", "s64 b", "u32 c", "s32 d", "u16 e", "s16 f", "u8 g", "s8 h",
               "bool ok", "f64 x", "f32 y", "struct inner in", "char path[200]", "char tag[4]"],
    })
FMT = {Kind.UINT64: "<Q", Kind.INT64: "<q", Kind.UINT32: "<I", Kind.INT32: "<i",
       Kind.UINT16: "<H", Kind.INT16: "<h", Kind.UINT8: "<B", Kind.INT8: "<b", Kind.BOOL: "<?",
       Kind.FLOAT64: "<d", Kind.FLOAT32: "<f"}
LIMITS = {Kind.UINT64: (0, (1 << 64) - 1), Kind.INT64: (-(1 << 63), (1 << 63) - 1),
          Kind.UINT32: (0, (1 << 32) - 1), Kind.INT32: (-(1 << 31), (1 << 31) - 1),
          Kind.UINT16: (0, 65535), Kind.INT16: (-32768, 32767), Kind.UINT8: (0, 255),
          Kind.INT8: (-128, 127)}
STRINGS = [b"", b"bash", b"a\"b", b"back\\slash", b"tab\there", b"\x01\x1f", b"caf\xc3\xa9",
           b"bad\xff\xfe", b"\xe2\x82\xac euro", b"x" * 63, b"y" * 64, b"z" * 150, b"\x7f del"]


def schema() -> DataSourceSchema:
    fields, size = REG.fields("ev")
    return DataSourceSchema("ev", DataSourceType.SINGLE, tuple(fields), size)


def _value(rng: np.random.Generator, kind: Kind) -> Any:
    lo, hi = LIMITS[kind]
    pick = rng.integers(0, 6)
    if pick == 0:
        return lo
    if pick == 1:
        return hi
    if pick == 2:
        return 0
    # any width of digits, not just the largest
    digits = int(rng.integers(1, len(str(hi)) + 1))
    v = int(rng.integers(0, 10 ** min(digits, 18))) * (10 ** max(0, digits - 18))
    v = min(v, hi)
    return -v if lo < 0 and rng.integers(0, 2) and -v >= lo else v


def build(rng: np.random.Generator, n: int, uniform: bool) -> tuple[Batch, list[str]]:
    s = schema()
    rows = rng.integers(1, 256, size=(n, s.record_size), dtype=np.uint8)  # stale ring bytes
    expected: list[str] = []
    fixed: dict[str, Any] = {}
    for i in range(n):
        buf = bytearray(rows[i].tobytes())
        obj: dict[str, Any] = {}
        for f in s.fields:
            if not f.has_value or f.base_kind is Kind.BYTES:
                continue
            if uniform and f.full_name in fixed:
                v = fixed[f.full_name]
            elif f.base_kind is Kind.CSTRING:
                v = STRINGS[int(rng.integers(0, len(STRINGS)))]
                if f.size == 4 and rng.integers(0, 2):
                    v = b"full"  # fills the field: no NUL at all
            elif f.base_kind is Kind.BOOL:
                v = bool(rng.integers(0, 2))
            elif f.base_kind in (Kind.FLOAT64, Kind.FLOAT32):
                v = [0.5, -1e30, float("nan"), float("inf"), 3.25][int(rng.integers(0, 5))]
            else:
                v = _value(rng, f.base_kind)
            if uniform:
                fixed.setdefault(f.full_name, v)
            if f.base_kind is Kind.CSTRING:
                raw = v[: f.size]
                buf[f.offs: f.offs + len(raw)] = raw
                if len(raw) < f.size:
                    buf[f.offs + len(raw)] = 0
                text: Any = raw.decode("utf-8", "replace")
            else:
                struct.pack_into(FMT[f.base_kind], buf, f.offs, v)
                text = struct.unpack_from(FMT[f.base_kind], buf, f.offs)[0]
                if isinstance(text, float) and not math.isfinite(text):
                    text = None
            path = f.full_name.split(".")
            node = obj
            for p in path[:-1]:
                node = node.setdefault(p, {})
            node[path[-1]] = text
        rows[i] = np.frombuffer(bytes(buf), dtype=np.uint8)
        expected.append(json.dumps(obj, separators=(",", ":"), ensure_ascii=True))
    return Batch(s, rows), expected


@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_batch_json_equals_json_dumps_of_each_record(seed: int, uniform: bool) -> None:
    rng = np.random.default_rng(seed)
    batch, expected = build(rng, int(rng.integers(1, 300)), uniform)
    enc = JsonEncoder(batch.schema)
    assert [line.decode() for line in enc.encode(batch)] == expected
    data, ends = enc.encode_lines(batch)
    assert data.decode() == "".join(e + "\n" for e in expected)
    assert ends.tolist() == np.cumsum([len(e) + 1 for e in expected]).tolist()


def test_same_width_values_take_the_path_without_deletion() -> None:
    batch, expected = build(np.random.default_rng(1), 50, uniform=True)
    _, ends = JsonEncoder(batch.schema).encode_lines(batch)
    width = len(expected[0]) + 1
    assert all(len(e) + 1 == width for e in expected)
    assert ends.tolist() == list(range(width, 51 * width, width))


def test_extra_payload_strings_are_encoded_per_value() -> None:
    fields = (Field("n", "n", 0, int(Kind.UINT32), 0, 0, 4, FieldFlag.STATIC_MEMBER),
              Field("s", "s", 1, int(Kind.STRING), payload_index=1))
    s = DataSourceSchema("d", DataSourceType.SINGLE, fields, 4, payload_count=2)
    rows = np.array([[7, 0, 0, 0], [8, 0, 0, 0]], dtype=np.uint8)
    batch = Batch(s, rows, ([b"he\"llo", b"\xc3\xa9"],))
    assert JsonEncoder(s).encode(batch) == [b'{"n":7,"s":"he\\"llo"}', b'{"n":8,"s":"\\u00e9"}']


PAYLOAD_VALUES = [b"", b"root", b"O_RDONLY|O_CLOEXEC", b'q"uote', b"nul\x00inside", b"caf\xc3\xa9",
                  b"bad\xff", b"2024-11-25T13:06:40.123456789Z"]


@pytest.mark.parametrize("form", ["coded", "coded-one", "fixed", "list"])
@pytest.mark.parametrize("kind", [Kind.STRING, Kind.CSTRING])
def test_payload_strings_in_every_form(form: str, kind: Kind) -> None:
    rng = np.random.default_rng(7)
    n = 200
    fields = (Field("n", "n", 0, int(Kind.UINT32), 0, 0, 4, FieldFlag.STATIC_MEMBER),
              Field("s", "s", 1, int(kind), payload_index=1))
    s = DataSourceSchema("d", DataSourceType.SINGLE, fields, 4, payload_count=2)
    rows = np.arange(n, dtype="<u4").view(np.uint8).reshape(n, 4).copy()
    codes = rng.integers(0, len(PAYLOAD_VALUES), n).astype(np.intp)
    if form == "coded-one":
        codes[:] = 2
    values = [PAYLOAD_VALUES[c] for c in codes]
    col: Any
    if form.startswith("coded"):
        col = FormColumn(Coded(PAYLOAD_VALUES, codes))
    elif form == "fixed":
        values = [v.ljust(30, b"\0")[:30] for v in values]
        col = FormColumn(Fixed(np.frombuffer(b"".join(values), dtype=np.uint8).reshape(n, 30)))
    else:
        col = values
    texts = [(v.partition(b"\0")[0] if kind is Kind.CSTRING else v).decode("utf-8", "replace")
             for v in values]
    expected = [json.dumps({"n": i, "s": t}, separators=(",", ":")).encode()
                for i, t in enumerate(texts)]
    assert JsonEncoder(s).encode(Batch(s, rows, (col,))) == expected


# -- trace_open as a run has it: derived columns, container columns, merged batches -----------


def _open_run() -> tuple[Any, DataSourceSchema]:
    from pipeline.ledger import Ledger
    from pipeline.run import GadgetRun
    from pipeline.sources.catalog import Catalog

    run = GadgetRun(Catalog().resolve("trace_open"), {}, Ledger(), "json-test")
    return run, run.spec.datasources[0]


def _open_rows(raw: DataSourceSchema, rng: np.random.Generator, n: int, comms: list[bytes],
               files: list[bytes]) -> Batch:
    """Raw trace_open records: stale ring bytes everywhere, the given strings and ids."""
    rows = rng.integers(0, 256, size=(n, raw.record_size), dtype=np.uint8)
    pick = rng.integers(0, len(comms), n)
    for name, pool in (("proc.comm", comms), ("fname", files), ("proc.parent.comm", [b"bash"])):
        f = raw.field(name)
        for i in range(n):
            v = pool[pick[i] % len(pool)] + b"\0"
            rows[i, f.offs: f.offs + len(v)] = np.frombuffer(v, dtype=np.uint8)
    for name, vals in (("proc.pid", 4000 + pick), ("proc.tid", 4000 + pick),
                       ("proc.creds.uid", np.where(pick % 2, 1000, 0)),
                       ("proc.creds.gid", np.zeros(n)), ("error_raw", np.where(pick == 1, 2, 0)),
                       ("flags_raw", np.full(n, 0o2000000)), ("mode_raw", np.zeros(n)),
                       ("timestamp_raw", 1_732_540_000 * 10**9 + np.arange(n) * 997)):
        f = raw.field(name)
        rows[:, f.offs: f.offs + f.size] = np.asarray(vals).astype(f"<u{f.size}").view(
            np.uint8).reshape(n, f.size)
    return Batch(raw, rows)


def _expected_lines(batch: Batch) -> list[str]:
    """Each record as json.dumps of its values (pipeline.accessors), nested as upstream."""
    from pipeline.accessors import values
    from pipeline.sinks.encode import json_skipped, leaf_fields

    schema = batch.schema
    skipped = {f.index for f in schema.fields if json_skipped(f)}
    fields = [f for f in leaf_fields(schema)
              if not any(i in skipped for i in _ancestry(schema, f))]
    cols = {f.index: values(batch, f) for f in fields}
    out = []
    for i in range(len(batch)):
        obj: dict[str, Any] = {}
        for f in fields:
            node = obj
            for parent in _ancestry(schema, f)[:-1]:
                node = node.setdefault(schema.fields[parent].name, {})
            v = cols[f.index][i]
            node[f.name] = bool(v) if f.base_kind is Kind.BOOL else v
        out.append(json.dumps(obj, separators=(",", ":")))
    return out


def _ancestry(schema: DataSourceSchema, f: Field) -> list[int]:
    chain = [f.index]
    while schema.fields[chain[-1]].parent is not None:
        chain.append(schema.fields[chain[-1]].parent)  # type: ignore[arg-type]
    return chain[::-1]


def _with_containers(batch: Batch, rng: np.random.Generator) -> Batch:
    """The container columns as the enrich operator fills them for three containers."""
    from pipeline.batch import CodedColumn

    codes = rng.integers(0, 3, len(batch))
    extra = list(batch.extra)
    for f in batch.schema.fields:
        if not (f.full_name.startswith(("k8s.", "runtime.")) and f.has_value):
            continue
        if f.base_kind is Kind.STRING:
            vals = [b"", b"web-0", b'q"uote\xc3\xa9']
        elif f.base_kind is Kind.BOOL:
            vals = [b"\0", b"\1", b"\0"]
        else:
            vals = [int(v).to_bytes(KIND_WIDTH[f.base_kind], "little", signed=True)
                    for v in (0, 4242, -(1 << 40) if f.base_kind is Kind.INT64 else 7)]
        extra[f.payload_index - 1] = CodedColumn(vals, codes)
    return Batch(batch.schema, batch.rows, tuple(extra))


@pytest.mark.parametrize("shape", ["one-process", "mixed", "containers"])
def test_trace_open_batches_as_a_run_has_them(shape: str) -> None:
    from pipeline.sinks.base import coalesce

    run, raw = _open_run()
    rng = np.random.default_rng(3)
    comms, files = ([b"gpb1a2b3c4d"], [b"/etc/hostname"]) if shape == "one-process" else \
        ([b"bash", b"python3", b"sh", b"x" * 16], [b"/etc/ld.so.cache", b"/dev/null", b"/x"])

    def batch(n: int) -> Batch:
        b = _open_rows(raw, rng, n, comms, files)
        for op in run._operators:
            b = op.process(b)
        return _with_containers(b, rng) if shape == "containers" else b

    enc = JsonEncoder(run.schemas[0])
    batches = [batch(n) for n in (300, 1, 2, 257)]
    # merged as a sink merges what queued (derived columns computed in some parts or not)
    enc.encode_lines(batches[0])
    batches += [coalesce([batches[0], batch(40), batches[3]]), batches[0].slice(5, 50)]
    for b in batches * 2:  # twice: the second time from the kept templates
        expected = _expected_lines(b)
        data, ends = enc.encode_lines(b)
        assert bytes(data).decode() == "".join(e + "\n" for e in expected)
        assert ends.tolist() == np.cumsum([len(e) + 1 for e in expected]).tolist()


def test_kept_templates_are_per_constant_values() -> None:
    run, raw = _open_run()
    rng = np.random.default_rng(5)
    enc = JsonEncoder(run.schemas[0])
    for comm, file in ((b"aaa", b"/a"), (b"bbb", b"/a"), (b"aaa", b"/b"), (b"aaa", b"/a")):
        b = _open_rows(raw, rng, 64, [comm], [file])
        for op in run._operators:
            b = op.process(b)
        lines = bytes(enc.encode_lines(b)[0]).decode().splitlines()
        assert lines == _expected_lines(b)
        assert f'"comm":"{comm.decode()}"' in lines[0] and f'"fname":"{file.decode()}"' in lines[0]
