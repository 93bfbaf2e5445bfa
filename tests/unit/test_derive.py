"""Derived fields (pipeline/derive): the texts, their computation per batch, the announced
fields, and that nothing is derived for consumers that read only raw fields."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import wire
from pipeline._gen import gadget_service_pb2 as pb
from pipeline.accessors import column, values
from pipeline.batch import Batch, Coded, Fixed, LazyColumn
from pipeline.derive import DeclaredField, DeriveEnv, DeriveSpec, EnumSpec, build_plan, net
from pipeline.derive import formatters as fmt
from pipeline.derive.users import IdNames, UserNames, parse_id_file
from pipeline.gadget import GadgetSpec
from pipeline.layout import StructRegistry
from pipeline.operators.derive import Derive
from pipeline.operators.fields import FieldSelect
from pipeline.operators.filter import Filter
from pipeline.schema import DataSourceSchema, DataSourceType, FieldFlag, Kind
from pipeline.sinks.encode import JsonEncoder
from pipeline.sources.catalog import Catalog
from tests.specdecode import field_value, split_frames

CATALOG = Catalog()


def spec(name: str) -> GadgetSpec:
    return CATALOG.resolve(name)


def rows_for(ds: DataSourceSchema, n: int, **cols: list[int]) -> Batch:
    """A batch of ``n`` zeroed records with the given numeric fields set (dots as __)."""
    rows = np.zeros((n, ds.record_size), dtype=np.uint8)
    for name, vals in cols.items():
        f = ds.field(name.replace("__", "."))
        dtype = {1: "<u1", 2: "<u2", 4: "<u4", 8: "<u8"}[f.size]
        rows[:, f.offs: f.offs + f.size] = np.array(vals, dtype=dtype).view(np.uint8).reshape(
            n, f.size)
    return Batch(ds, rows)


def wire_values(batch: Batch) -> list[dict[str, Any]]:
    """Every field of every record as a client decodes it from per-record events
    (docs/gadget-service.md §4.3)."""
    info = batch.schema.to_proto()
    out = []
    for frame in split_frames(wire.per_record_events(batch, 1, 0)):
        el = pb.GadgetData.FromString(pb.GadgetEvent.FromString(frame).payload).data
        out.append({f.fullName: field_value(f, el) for f in info.fields if not f.flags & 33})
    return out


# -- texts --------------------------------------------------------------------------------------


def test_errno_and_signal_names_are_go_unix_names() -> None:
    assert fmt.errno_name(0) == b""
    assert fmt.errno_name(2) == b"ENOENT"
    assert fmt.errno_name(95) == b"ENOTSUP"          # Go's name, not EOPNOTSUPP
    assert fmt.errno_name(117) == b"EFSCORRUPTED"    # Go's name for EUCLEAN
    assert fmt.errno_name(41) == b"error#41"         # no errno 41 on Linux
    assert fmt.signal_name(9) == b"SIGKILL"
    assert fmt.signal_name(17) == b"SIGCHLD"
    assert fmt.signal_name(0) == b"signal#0"
    assert fmt.signal_name(34) == b"signal#34"       # real-time signals are not named


def test_open_flags_as_upstream_decodes_them() -> None:
    assert fmt.open_flags(os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC) == b"O_WRONLY|O_CREAT|O_CLOEXEC"
    assert fmt.open_flags(0) == b"O_RDONLY"
    assert fmt.open_flags(os.O_RDWR | os.O_TRUNC | os.O_APPEND) == b"O_RDWR|O_TRUNC|O_APPEND"
    # O_SYNC is O_DSYNC plus another bit: upstream lists O_DSYNC only.
    assert fmt.open_flags(os.O_SYNC) == b"O_RDONLY|O_DSYNC"
    assert fmt.open_flags(3) == b""                  # access mode 3 has no name
    assert fmt.open_flags(os.O_DIRECTORY | os.O_NOFOLLOW) == b"O_RDONLY|O_DIRECTORY|O_NOFOLLOW"


def test_file_mode_is_go_file_mode_text() -> None:
    assert fmt.file_mode(0o640) == b"-rw-r-----"
    assert fmt.file_mode(0) == b"----------"
    assert fmt.file_mode(0o4755) == b"-rwxr-xr-x"    # st_mode's setuid is not Go's ModeSetuid
    assert fmt.file_mode((1 << 31) | 0o755) == b"drwxr-xr-x"
    assert fmt.file_mode((1 << 31) | (1 << 27) | 0o777) == b"dLrwxrwxrwx"


def test_sizes_and_durations() -> None:
    assert fmt.human_bytes(0) == b"0 B"
    assert fmt.human_bytes(9) == b"9 B"
    assert fmt.human_bytes(1500) == b"1.5 kB"
    assert fmt.human_bytes(12_345_678) == b"12 MB"
    assert fmt.duration_text(999) == b"999ns"
    assert fmt.duration_text(1500) == "1.50µs".encode()
    assert fmt.duration_text(2_345_000) == b"2.35ms"
    assert fmt.duration_text(61_500_000_000) == b"1m1.5s"
    assert fmt.syscall_name(257) == b"SYS_OPENAT"
    assert fmt.syscall_name(100000) == b"SYS_UNKNOWN"


def test_enum_names_and_bit_sets() -> None:
    name = fmt.enum_names({0: "HOST", 4: "OUTGOING"}, bitfield=False)
    assert name(4) == b"OUTGOING" and name(9) == b"UNKNOWN"
    bits = fmt.enum_names({1: "A", 2: "B", 4: "C"}, bitfield=True)
    assert bits(5) == b"A|C" and bits(0) == b""


def test_addresses_as_go_prints_them() -> None:
    assert net.ip_text(4, bytes([10, 0, 0, 1]) + bytes(12)) == b"10.0.0.1"
    assert net.ip_text(6, ipaddress.IPv6Address("2001:db8::1").packed) == b"2001:db8::1"
    mapped = ipaddress.IPv6Address("::ffff:192.0.2.7").packed
    assert net.ip_text(6, mapped) == b"192.0.2.7"    # Go's net.IP prints mapped v4 dotted
    assert net.ip_text(0, bytes(16)) == b""
    version = np.array([4, 6, 0], dtype=np.uint8)
    addr = np.zeros((3, 16), dtype=np.uint8)
    addr[0, :4] = [127, 0, 0, 1]
    addr[1, 15] = 1
    a = net.addresses(version, addr)
    assert a.values() == [b"127.0.0.1", b"::1", b""]
    ports = np.array([53, 5353, 80], dtype=np.uint16)
    assert net.endpoints(a, version, ports).values() == [b"127.0.0.1:53", b"::1:5353", b""]
    protos = np.array([17, 6, 17], dtype=np.uint16)
    assert net.protocols(protos, version).values() == [b"UDP", b"TCP", b""]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 140), min_size=0, max_size=300))
def test_by_unique_equals_formatting_each_record(vals: list[int]) -> None:
    col = np.array(vals, dtype=np.uint32)
    for f in (fmt.errno_name, fmt.signal_name, fmt.open_flags, fmt.file_mode):
        assert fmt.by_unique(col, f).values() == [f(v) for v in vals]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4_102_444_800 * 10**9), min_size=1, max_size=200))
def test_timestamps_match_go_layout_in_local_time(ns: list[int]) -> None:
    out = fmt.timestamps(np.array(ns, dtype=np.uint64))
    got = out.values() if isinstance(out, Fixed) else out
    for v, text in zip(ns, got, strict=True):
        secs, frac = divmod(v, 10**9)
        local = dt.datetime.fromtimestamp(secs).astimezone()
        off = local.utcoffset() or dt.timedelta(0)
        zone = "Z" if not off else local.strftime("%z")[:3] + ":" + local.strftime("%z")[3:]
        assert text.decode() == local.strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}" + zone


def test_timestamps_follow_the_local_zone_across_a_change(monkeypatch: pytest.MonkeyPatch,
                                                         ) -> None:
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        # Half a second before and a quarter after CET -> CEST (2024-03-31 01:00 UTC).
        ns = [1_711_846_799_500_000_000, 1_711_846_800_250_000_000, 1_711_846_800_250_000_001]
        assert fmt.timestamps(np.array(ns, dtype=np.uint64)) == [
            b"2024-03-31T01:59:59.500000000+01:00", b"2024-03-31T03:00:00.250000000+02:00",
            b"2024-03-31T03:00:00.250000001+02:00"]
        out = fmt.timestamps(np.array(ns[1:], dtype=np.uint64))
        assert isinstance(out, Fixed) and out.values()[0].endswith(b"+02:00")
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


# -- user and group names -----------------------------------------------------------------------


def test_id_files_parse_as_upstream(tmp_path: Path) -> None:
    text = "root:x:0:0::/root:/bin/sh\n# comment\n  \tbin:x:1:1\nbad:x:notanumber\nshort:x\n" \
           "again:x:1:1\n"
    assert parse_id_file(text) == {0: b"root", 1: b"again"}  # the last line naming an id wins
    passwd = tmp_path / "passwd"
    passwd.write_text(text)
    names = IdNames(passwd, "uid", recheck=0)
    assert names.names([0, 1, 7]) == [b"root", b"again", b"uid:7"]
    passwd.write_text(text + "seven:x:7:7\n")
    os.utime(passwd, ns=(time.time_ns(), time.time_ns() + 10**9))  # a change stat() sees
    assert names.names([7]) == [b"seven"]
    passwd.unlink()
    assert names.names([0]) == [b"uid:0"]


# -- what a gadget announces ----------------------------------------------------------------------


def announced(name: str) -> DataSourceSchema:
    s = spec(name)
    return Derive(s.datasources, s.derive).output_schema(s.datasources[0])


def test_trace_open_announces_upstreams_readable_fields() -> None:
    ds = announced("trace_open")
    by = {f.full_name: f for f in ds.fields}
    for raw, text in (("error_raw", "error"), ("flags_raw", "flags"), ("mode_raw", "mode"),
                      ("timestamp_raw", "timestamp")):
        assert by[raw].hidden, raw
        assert by[text].base_kind is Kind.STRING and by[text].size == 0
        assert by[text].payload_index > 0 and by[text].parent is None
    assert by["error"].annotations["template"] == "errorString"
    assert by["error"].annotations["columns.width"] == "12"
    assert "ENOENT" in by["error"].annotations["value.one-of"]
    assert by["timestamp"].hidden and by["timestamp"].annotations["columns.width"] == "35"
    user, group = by["proc.creds.user"], by["proc.creds.group"]
    assert user.hidden and group.hidden and by["proc.creds.uid"].hidden
    assert user.flags & FieldFlag.HAS_PARENT and user.parent == by["proc.creds"].index
    # Static members get their types' templates, and aliases inside the process structs.
    assert by["proc.comm"].annotations["description"] == "Process name"
    assert by["proc.comm"].annotations["columns.alias"] == "comm"
    assert by["proc"].hidden and by["proc.pid"].annotations["columns.minwidth"] == "7"
    assert by["proc.parent.comm"].hidden  # gadget_pcomm's template
    payloads = {f.payload_index for f in ds.fields if f.has_value}
    assert sorted(payloads) == list(range(ds.payload_count))
    # ustack and fpath (payloads 1, 2) are the source's; each derived field has its own.
    assert by["ustack"].payload_index == 1 and by["ustack.inode"].payload_index == 1
    assert by["ustack.inode"].offs == 8 and by["fpath"].payload_index == 2
    assert by["fpath"].size == 0 and by["fpath"].base_kind is Kind.CSTRING


def test_l4_endpoints_announce_text_and_hide_the_raw_union() -> None:
    ds = announced("trace_dns")
    by = {f.full_name: f for f in ds.fields}
    for ep in ("src", "dst"):
        assert by[f"{ep}.addr_raw"].flags & FieldFlag.UNREFERENCED
        assert by[f"{ep}.addr_raw.v4"].flags & FieldFlag.UNREFERENCED
        assert by[f"{ep}.addr"].base_kind is Kind.STRING and by[f"{ep}.addr"].hidden
        assert by[f"{ep}.proto"].hidden and by[f"{ep}.endpoint"].hidden
        assert by[f"{ep}.endpoint"].annotations["json.skip"] == "true"
        assert by[ep].annotations["columns.replace"] == f"{ep}.endpoint"
        assert not by[ep].hidden and by[f"{ep}.port"].hidden
    assert by["nameserver"].annotations["columns.replace"] == "nameserver.addr"
    with pytest.raises(KeyError):
        ds.field("src.addr_raw")  # unreferenced: not addressable by name


def test_enums_and_declared_fields() -> None:
    reg = StructRegistry()
    reg.add_enum("kind_t", "u8")
    reg.add_enum("opts_set", "u16")
    reg.add_struct("ev", ["enum kind_t kind_raw", "enum opts_set opts_raw", "u32 n"])
    fields, size = reg.fields("ev")
    raw = DataSourceSchema("x", DataSourceType.SINGLE, tuple(fields), size)

    def double(batch: Batch, memo: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = (column(batch, raw.field("n")).astype("<u4") * 2).view("V4").tolist()
        return out

    dspec = DeriveSpec(
        enums={"kind_t": EnumSpec("kind_t", {0: "ZERO", 1: "ONE"}),
               "opts_set": EnumSpec("opts_set", {1: "A", 2: "B", 4: "C"})},
        declared={"x": [DeclaredField("twice", Kind.UINT32, double)]},
        config={"x": {"kind": {"columns.width": "5"}}})
    plan = build_plan(raw, dspec, DeriveEnv())
    by = {f.full_name: f for f in plan.schema.fields}
    assert by["kind_raw"].hidden and by["opts_raw"].hidden
    assert by["kind"].annotations["columns.width"] == "5"  # gadget.yaml config applies
    assert by["kind"].order == by["kind"].index  # no same-order: upstream's AddField default
    batch = Batch(raw, np.array([[1, 0, 5, 0, 3, 0, 0, 0], [7, 0, 0, 0, 0, 0, 0, 0]],
                                dtype=np.uint8))
    out = Derive([raw], dspec).process(batch)
    assert values(out, out.schema.field("kind")) == ["ONE", "UNKNOWN"]
    assert values(out, out.schema.field("opts")) == ["A|C", ""]
    assert values(out, out.schema.field("twice")) == [6, 0]


# -- laziness -------------------------------------------------------------------------------------


def open_batch(n: int = 64) -> tuple[Derive, Batch]:
    s = spec("trace_open")
    ds = s.datasources[0]
    d = Derive(s.datasources, s.derive)
    raw = rows_for(ds, n, error_raw=[i % 3 for i in range(n)], flags_raw=[0o101] * n,
                   proc__creds__uid=[0] * n, timestamp_raw=[1_700_000_000 * 10**9 + i
                                                             for i in range(n)])
    f = ds.field("proc.comm")
    raw.rows[:, f.offs: f.offs + 4] = np.frombuffer(b"bash", dtype=np.uint8)
    raw.rows[::2, f.offs: f.offs + 4] = np.frombuffer(b"cat\0", dtype=np.uint8)
    return d, d.process(raw)


def test_consumers_of_raw_fields_derive_nothing() -> None:
    d, batch = open_batch()
    assert sum(isinstance(c, LazyColumn) for c in batch.extra) == len(batch.extra) - 2
    # A metric label, a filter on a raw field, coalescing and slicing (sinks, replay),
    # and a stream that selected raw fields only.
    column(batch, batch.schema.field("proc.pid"))
    kept = Filter("proc.comm==cat", [batch.schema]).process(batch)
    joined = Batch.concat([kept, batch.slice(3, 10), batch.slice(10)])
    sel = FieldSelect("proc.comm,fname,error_raw", [batch.schema])
    chosen = sel.process(joined)
    assert chosen.extra == () and chosen.schema.payload_count == 1
    wire.per_record_events(chosen, 1, 0)
    assert d.stats.columns == 0 and d.stats.records == 0


def test_derived_values_survive_filter_slice_and_concat() -> None:
    d, batch = open_batch(10)
    kept = Filter("proc.comm==cat", [batch.schema]).process(batch)  # records 0, 2, 4, 6, 8
    joined = Batch.concat([kept.slice(1, 3), batch.slice(7)])          # 2, 4, then 7, 8, 9
    got = [r["error"] for r in wire_values(joined)]
    assert got == [b"ENOENT", b"EPERM", b"EPERM", b"ENOENT", b""]  # errno = i % 3
    derived = sum(isinstance(c, LazyColumn) for c in joined.extra)
    assert d.stats.records == 5 * derived  # what was sent, each column once


def test_one_computation_serves_every_consumer() -> None:
    d, batch = open_batch(8)
    first = wire_values(batch)
    cols = d.stats.columns
    JsonEncoder(batch.schema).encode(batch)
    wire.gadget_data_array(batch)
    assert d.stats.columns == cols == sum(isinstance(c, LazyColumn) for c in batch.extra)
    assert first[0]["ustack.inode"] == 0 and first[0]["fpath"] == b""  # the defaults
    assert first[1]["error"] == b"EPERM" and first[0]["flags"] == b"O_WRONLY|O_CREAT"
    assert first[0]["proc.creds.user"] == b"root"
    assert first[0]["timestamp"].startswith(b"2023-11-1")


def test_selecting_a_derived_field_keeps_only_its_payload() -> None:
    d, batch = open_batch(6)
    sel = FieldSelect("fname,error", [batch.schema])
    out = sel.process(batch)
    assert out.schema.payload_count == 2 and len(out.extra) == 1
    assert [r["error"] for r in wire_values(out)] == [b"", b"EPERM", b"ENOENT"] * 2
    assert d.stats.columns == 1


def test_json_skip_fields_stay_out_of_json() -> None:
    s = spec("trace_dns")
    ds = s.datasources[0]
    d = Derive(s.datasources, s.derive)
    batch = d.process(rows_for(ds, 1, src__version=[4], src__port=[53], src__proto_raw=[17]))
    text = JsonEncoder(batch.schema).encode(batch)[0].decode()
    assert '"endpoint"' not in text and '"addr_raw"' not in text
    assert '"addr":"0.0.0.0"' in text and '"proto":"UDP"' in text


def test_coded_columns_encode_like_plain_ones() -> None:
    _, batch = open_batch(5)
    plain = Batch(batch.schema, batch.rows, tuple(list(c) for c in batch.extra))
    assert wire.per_record_events(batch, 7, 3) == wire.per_record_events(plain, 7, 3)
    assert wire.gadget_data_array(batch) == wire.gadget_data_array(plain)
    assert wire.data_elements(batch) == [wire.data_element(plain.payloads(i))
                                         for i in range(len(plain))]


def test_users_are_read_per_run(tmp_path: Path) -> None:
    (tmp_path / "passwd").write_text("alice:x:1234:1234\n")
    (tmp_path / "group").write_text("staff:x:1234:\n")
    s = spec("trace_open")
    ds = s.datasources[0]
    env = DeriveEnv(UserNames(tmp_path / "passwd", tmp_path / "group"))
    d = Derive(s.datasources, s.derive, env)
    batch = d.process(rows_for(ds, 2, proc__creds__uid=[1234, 0], proc__creds__gid=[1234, 7]))
    got = wire_values(batch)
    assert [r["proc.creds.user"] for r in got] == [b"alice", b"uid:0"]
    assert [r["proc.creds.group"] for r in got] == [b"staff", b"gid:7"]


def test_a_coded_column_values() -> None:
    c = Coded([b"a", b"bc"], np.array([1, 0, 1], dtype=np.intp))
    assert c.values() == [b"bc", b"a", b"bc"]
    assert Coded([], np.zeros(0, dtype=np.intp)).values() == []


def test_merged_batches_keep_computed_columns_in_their_forms() -> None:
    from pipeline.batch import CodedColumn, FormColumn

    d, a = open_batch(6)
    _, b = open_batch(4)
    want = [wire_values(a), wire_values(b)]  # computes every derived column of both
    computed = d.stats.columns
    joined = Batch.concat([a, b])
    forms = [c.form() for c in joined.extra if isinstance(c, LazyColumn)]
    assert forms and all(isinstance(f, (Coded, Fixed)) for f in forms)  # no list per record
    assert all(c.computed for c in joined.extra if isinstance(c, LazyColumn))
    assert wire_values(joined) == want[0] + want[1]
    assert d.stats.columns == computed  # nothing derived again
    # coded columns with equal tables keep one table; others append theirs
    x = CodedColumn([b"a", b"b"], np.array([1, 0]))
    y = CodedColumn([b"a", b"b"], np.array([0, 0, 1]))
    z = CodedColumn([b"c"], np.array([0]))
    assert Batch.concat([Batch(a.schema, a.rows[:2], (x,)), Batch(a.schema, a.rows[:3], (y,))]
                        ).extra[0].values == [b"a", b"b"]  # type: ignore[attr-defined]
    xyz = CodedColumn.joined([x, y, z])
    assert list(xyz) == [b"b", b"a", b"a", b"a", b"b", b"c"]
    fixed = FormColumn.joined([FormColumn(Fixed(np.ones((2, 3), np.uint8))),
                               FormColumn(Fixed(np.zeros((1, 3), np.uint8)))])
    assert isinstance(fixed, FormColumn) and isinstance(fixed.form, Fixed)
    assert list(fixed) == [b"\1\1\1", b"\1\1\1", b"\0\0\0"]
