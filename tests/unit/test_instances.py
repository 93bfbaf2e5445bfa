"""Instance manager pieces without eBPF: replay buffer, client queues, validation, restore,
resolution; legacy param mapping and JSON; CLI reference resolution."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from grpclib import GRPCError, Status

from api.cli_instances import ResolveError, resolve
from api.context import ServiceContext
from api.instance import NOT_TRACING_YET, Instance
from api.instance_manager import NAME_RE, InstanceManager, random_name
from api.instance_packets import Attacher, Chunk, PacketRing, node_field
from api.legacy_run import legacy_json_encoder, legacy_params, select_nodes
from api.peers import PeerPool
from api.store import InstanceStore
from pipeline._gen import gadget_service_pb2 as pb
from pipeline.batch import Batch
from pipeline.ledger import DELIVERED, DROPPED, PRODUCED, Ledger
from pipeline.operators.derive import Derive
from pipeline.schema import DataSourceSchema, DataSourceType, Field, FieldFlag, Kind
from pipeline.sinks.encode import JsonEncoder as SinkJsonEncoder
from pipeline.sources.catalog import Catalog
from tests.specdecode import split_frames

# -- packets ----------------------------------------------------------------------------------


def demo_schema() -> DataSourceSchema:
    return DataSourceSchema("demo", DataSourceType.SINGLE, (
        Field("pid", "pid", 0, Kind.UINT32, 0, 0, 4, FieldFlag.STATIC_MEMBER),
        Field("comm", "comm", 1, Kind.CSTRING, 0, 4, 8, FieldFlag.STATIC_MEMBER),
    ), 12)


def demo_batch(pids: list[int]) -> Batch:
    rows = np.zeros((len(pids), 12), dtype=np.uint8)
    for i, p in enumerate(pids):
        rows[i, :4] = np.frombuffer(p.to_bytes(4, "little"), dtype=np.uint8)
        rows[i, 4:8] = np.frombuffer(b"bash", dtype=np.uint8)
    return Batch(demo_schema(), rows)


def chunk(pids: list[int], seq: int = 0) -> Chunk:
    c = Chunk.from_records(demo_batch(pids), 0)
    if seq:
        c.number(seq)
    return c


def events_of(chunks: list[Chunk], base: int = 0) -> list[pb.GadgetEvent]:
    return [pb.GadgetEvent.FromString(f) for c in chunks
            for f in split_frames(bytes(c.frame(base)))]


def pids_of(chunks: list[Chunk]) -> list[int]:
    return [int.from_bytes(pb.GadgetData.FromString(e.payload).data.payload[0][:4], "little")
            for e in events_of(chunks)]


def test_ring_numbers_packets_and_keeps_the_newest() -> None:
    ring = PacketRing(5)
    for pids in ([1, 2, 3], [4, 5], [6, 7, 8]):
        ring.append(chunk(pids, ring.next_seq))
    assert len(ring) == 5
    assert ring.first_seq == 4 and ring.next_seq == 9
    assert pids_of(ring.since(0)) == [4, 5, 6, 7, 8]
    assert [c.seq for c in ring.since(0)] == [4, 6]
    assert [e.seq for e in events_of(ring.since(0))] == [4, 5, 6, 7, 8]
    assert pids_of(ring.since(7)) == [7, 8]
    assert ring.since(9) == []


def test_ring_trims_a_chunk_bigger_than_itself_and_does_not_pin_it() -> None:
    ring = PacketRing(2)
    c = chunk(list(range(1, 101)), 1)
    ring.append(c)
    [kept] = ring.since(0)
    assert pids_of([kept]) == [99, 100] and kept.seq == 99
    assert kept.encoded is not c.encoded and len(kept.encoded) == kept.nbytes  # a copy


def test_chunk_frames_decode_with_the_spec_decoder_and_carry_stream_seqs() -> None:
    c = chunk([10, 11, 12], 101)
    events = events_of([c], base=100)
    assert [e.seq for e in events] == [1, 2, 3]
    assert [pb.GadgetData.FromString(e.payload).data.payload[0][:4] for e in events] == \
        [(p).to_bytes(4, "little") for p in (10, 11, 12)]
    assert [e.seq for e in events_of([c.slice(1)], base=100)] == [2, 3]
    p = Chunk.from_payloads([node_field("n1") + b"\x1a\x00"], 2)
    p.number(7)
    [ev] = events_of([p])
    assert (ev.seq, ev.dataSourceID) == (7, 2)
    assert pb.GadgetData.FromString(ev.payload).node == "n1"


def test_seqs_wrap_at_32_bits_and_stay_five_bytes() -> None:
    c = chunk([1, 2, 3], 0xFFFFFFFF)
    assert [e.seq for e in events_of([c])] == [0xFFFFFFFF, 0, 1]
    assert [e.seq for e in events_of([c], base=0xFFFFFFFE)] == [1, 2, 3]
    sizes = {len(f) for f in split_frames(bytes(c.frame(0)))}
    assert len(sizes) == 1  # every seq takes five bytes, so every frame has one length


def test_every_client_shares_the_one_encoding_of_a_batch() -> None:
    ledger = Ledger()
    ring = PacketRing(100)
    clients = [Attacher(f"attach-{i}", 100, ledger, "instance:x") for i in range(4)]
    c = chunk([1, 2, 3], ring.next_seq)
    ring.append(c)
    for a in clients:
        a.offer(c)
    queued = [a._items[0] for a in clients]
    assert all(q is c for q in queued)  # references, not copies
    [replayed] = ring.since(0)
    assert replayed is c
    # A client numbered from base 0 gets the encoded bytes themselves (a view, no copy).
    view = c.frame(0)
    assert isinstance(view, memoryview) and view.obj is c.encoded
    # A client with another base gets the same packets with its own seqs.
    assert [e.payload for e in events_of([c], 0)] == [e.payload for e in events_of([c], 1)]


def test_a_long_trailing_string_is_kept_compact_and_sent_at_full_size() -> None:
    s = DataSourceSchema("big", DataSourceType.SINGLE, (
        Field("pid", "pid", 0, Kind.UINT32, 0, 0, 4, FieldFlag.STATIC_MEMBER),
        Field("args", "args", 1, Kind.CSTRING, 0, 4, 5120, FieldFlag.STATIC_MEMBER),
    ), 5124)
    rows = np.full((3, 5124), 0xEE, dtype=np.uint8)  # stale ring bytes after each string
    for i, text in enumerate([b"ls\xc2\xa0-l", b"", b"x" * 5120]):
        rows[i, :4] = np.frombuffer((i + 1).to_bytes(4, "little"), dtype=np.uint8)
        rows[i, 4: 4 + len(text)] = np.frombuffer(text, dtype=np.uint8)
        if len(text) < 5120:
            rows[i, 4 + len(text)] = 0
    c = Chunk.from_records(Batch(s, rows), 1)
    c.number(1)
    assert c.nbytes < 5124 + 3 * 40  # the first two records are a few bytes each
    for base in (0, 5):
        payloads = [pb.GadgetData.FromString(e.payload).data.payload[0]
                    for e in events_of([c], base)]
        assert [len(p) for p in payloads] == [5124] * 3
        assert payloads[0][4:] == b"ls\xc2\xa0-l" + bytes(5120 - 6)
        assert payloads[1][4:] == bytes(5120)
        assert payloads[2][4:] == b"x" * 5120
        assert [e.seq for e in events_of([c], base)] == [1 - base & 0xFFFFFFFF,
                                                          2 - base & 0xFFFFFFFF,
                                                          3 - base & 0xFFFFFFFF]
    assert [len(p) for p in split_frames(bytes(c.slice(1).frame(0)))] == [len(
        split_frames(bytes(c.frame(0)))[1])] * 2
    ring = PacketRing(1)
    ring.append(c)
    [kept] = ring.since(0)
    assert len(kept.encoded) == kept.nbytes and len(split_frames(bytes(kept.frame(0)))) == 1


def test_trace_exec_records_are_kept_at_their_used_size() -> None:
    schema = Catalog().resolve("trace_exec").datasources[0]
    strings = [f for f in schema.fields if f.payload_index == 0 and f.size >= 512]
    assert {f.full_name for f in strings} >= {"args", "cwd", "file", "exepath"}
    rows = np.full((4, schema.record_size), 0xEE, dtype=np.uint8)  # stale ring bytes
    expected = rows.copy()
    for i, f in enumerate(strings):
        text = f"/v{i}".encode() + b"\0"
        rows[:, f.offs: f.offs + len(text)] = np.frombuffer(text, dtype=np.uint8)
        expected[:, f.offs: f.offs + f.size] = 0
        expected[:, f.offs: f.offs + len(text)] = np.frombuffer(text, dtype=np.uint8)
    c = Chunk.from_records(Batch(schema, rows), 0)
    c.number(1)
    assert c.nbytes < 4 * (schema.record_size - sum(f.size for f in strings) + 200)
    for base in (0, 3):
        payloads = [pb.GadgetData.FromString(e.payload).data.payload[0]
                    for e in events_of([c], base)]
        assert payloads == [expected[i].tobytes() for i in range(4)]
    assert [len(f) for f in split_frames(bytes(c.slice(2).frame(0)))] == [
        len(f) for f in split_frames(bytes(c.frame(0)))][2:]


def test_client_queue_is_drop_newest_and_the_ledger_balances() -> None:
    ledger = Ledger()
    a = Attacher("attach-1", 4, ledger, "instance:x")
    for pids in ([1, 2, 3], [4, 5, 6], [7]):
        a.offer(chunk(pids, pids[0]))
    assert a.dropped == 3
    assert pids_of(list(a._items)) == [1, 2, 3, 4]
    produced = ledger.get("instance:x", "attach", PRODUCED)
    dropped = ledger.get("instance:x", "attach", DROPPED, "queue_full")
    assert (produced, dropped) == (7, 3)
    a.abandon("client_gone")
    assert ledger.get("instance:x", "attach", DROPPED, "client_gone") == 4
    assert ledger.get("instance:x", "attach", DELIVERED) == 0
    a.offer(chunk([9]))  # closed: ignored
    assert ledger.get("instance:x", "attach", PRODUCED) == 7


def test_client_queue_is_bounded_in_bytes_too() -> None:
    ledger = Ledger()
    one = chunk([1]).nbytes
    a = Attacher("attach-1", 1000, ledger, "instance:x", max_bytes=3 * one)
    a.offer(chunk([1, 2], 1))
    a.offer(chunk([3, 4], 3))  # one of these fits
    assert pids_of(list(a._items)) == [1, 2, 3] and a.dropped == 1
    assert ledger.get("instance:x", "attach", DROPPED, "queue_full") == 1


def test_random_names_are_valid_and_unique() -> None:
    names: set[str] = set()
    for _ in range(200):
        n = random_name(names)
        assert NAME_RE.match(n)
        names.add(n)
    assert len(names) == 200


# -- the manager, in-process (validation never reaches eBPF) ------------------------------------

ID = "0123456789abcdef0123456789abcdef"


def create_request(**kw: object) -> pb.CreateGadgetInstanceRequest:
    gi = pb.GadgetInstance(id=str(kw.get("id", "")), name=str(kw.get("name", "")),
                           nodes=list(kw.get("nodes", [])),  # type: ignore[call-overload]
                           gadgetConfig=pb.GadgetRunRequest(
                               imageName=str(kw.get("image", "trace_exec")),
                               version=int(kw.get("version", 1)),  # type: ignore[call-overload]
                               timeout=int(kw.get("timeout", 0)),  # type: ignore[call-overload]
                               paramValues=dict(kw.get("params", {}))))  # type: ignore[call-overload]
    return pb.CreateGadgetInstanceRequest(
        gadgetInstance=gi, eventBufferLength=int(kw.get("buffer", 0)))  # type: ignore[call-overload]


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[InstanceManager]:
    ctx = ServiceContext(Catalog(), Ledger(), node="here")
    m = InstanceManager(ctx, tmp_path, {"peer1": "unix:///nonexistent.sock"}, ready_wait=60)
    await m.start()
    ctx.instances = m
    yield m
    await m.stop()


# A param that passes validation but makes the source refuse to start, so the instance lands
# in the Error state without loading any BPF.
BAD_AT_START = {"operator.oci.ebpf.comm": "no;such;comm"}


@pytest.mark.parametrize(("kw", "status", "text"), [
    ({"id": "XYZ"}, Status.INVALID_ARGUMENT, "invalid gadget instance id: XYZ"),
    ({"id": ID[:31]}, Status.INVALID_ARGUMENT, f"invalid gadget instance id: {ID[:31]}"),
    ({"id": ID.upper()}, Status.INVALID_ARGUMENT, "invalid gadget instance id"),
    ({"name": "Upper"}, Status.INVALID_ARGUMENT, "invalid gadget instance name: Upper"),
    ({"name": "a" * 33}, Status.INVALID_ARGUMENT, "invalid gadget instance name"),
    ({"name": "with space"}, Status.INVALID_ARGUMENT, "invalid gadget instance name"),
    ({"image": "no_such_gadget"}, Status.NOT_FOUND, "unknown gadget 'no_such_gadget'"),
    ({"version": 0}, Status.INVALID_ARGUMENT, "expected version to be 1, got 0"),
    ({"params": {"operator.oci.ebpf.pid": "abc"}}, Status.INVALID_ARGUMENT,
     "operator.oci.ebpf.pid"),
    ({"params": {"operator.oci.ebpf.nosuch": "1"}}, Status.INVALID_ARGUMENT,
     "operator.oci.ebpf.nosuch"),
    ({"params": {"operator.filter.filter": "nofield==1"}}, Status.INVALID_ARGUMENT, "nofield"),
    ({"timeout": -1}, Status.INVALID_ARGUMENT, "timeout"),
    ({"buffer": -1}, Status.INVALID_ARGUMENT, "eventBufferLength"),
    ({"buffer": 1 << 20}, Status.INVALID_ARGUMENT, "eventBufferLength"),
    ({"nodes": ["mars"]}, Status.INVALID_ARGUMENT, "unknown node 'mars'"),
])
async def test_invalid_create_is_refused_and_nothing_is_persisted(
        manager: InstanceManager, kw: dict[str, object], status: Status, text: str) -> None:
    with pytest.raises(GRPCError) as e:
        await manager.create(create_request(**kw))
    assert e.value.status is status
    assert text in (e.value.message or "")
    assert list(manager.store.directory.iterdir()) == []
    assert manager.list() == []


async def test_create_fills_id_name_time_and_persists_then_duplicates_are_refused(
        manager: InstanceManager) -> None:
    resp = await manager.create(create_request(params=BAD_AT_START, buffer=5))
    gi = resp.gadgetInstance
    assert resp.result == 0
    assert len(gi.id) == 32 and NAME_RE.match(gi.name) and gi.timeCreated > 0
    assert manager.store.load(gi.id).gadgetInstance.name == gi.name
    assert manager.store.load(gi.id).eventBufferLength == 5
    with pytest.raises(GRPCError, match=f'gadget with id "{gi.id}" already exists'):
        await manager.create(create_request(id=gi.id, params=BAD_AT_START))
    with pytest.raises(GRPCError, match=f'gadget with name "{gi.name}" already exists'):
        await manager.create(create_request(name=gi.name, params=BAD_AT_START))
    # The start fails after the reply: the state says why (docs/gadget-service.md §6.1).
    inst = manager.resolve(gi.id)
    assert inst is not None
    await asyncio.wait_for(inst.started.wait(), 30)
    [listed] = manager.list()
    assert listed.state.status == pb.StatusError
    assert listed.state.message
    with pytest.raises(GRPCError) as e:
        await manager.gadget_info(gi.name)
    assert e.value.status is Status.FAILED_PRECONDITION
    assert gi.id in (e.value.message or "")
    await manager.stop()


async def test_get_and_remove_follow_the_spec(manager: InstanceManager) -> None:
    with pytest.raises(GRPCError, match="invalid gadget instance id: nope"):
        manager.get("nope")
    with pytest.raises(GRPCError) as e:
        manager.get(ID)
    assert e.value.status is Status.NOT_FOUND and ID in (e.value.message or "")
    with pytest.raises(GRPCError, match="invalid gadget instance id: nope"):
        await manager.remove("nope")
    resp = await manager.remove(ID)
    assert resp.result == 1 and ID in resp.message and "not found" in resp.message
    gi = (await manager.create(create_request(id=ID, name="x1", params=BAD_AT_START))
          ).gadgetInstance
    assert manager.get(ID).name == "x1"
    assert (await manager.remove(gi.id)).result == 0
    assert not manager.store.exists(ID)
    assert manager.list() == []


async def test_gadget_info_resolves_id_name_then_prefix(manager: InstanceManager) -> None:
    await manager.create(create_request(id=ID, name="first", params=BAD_AT_START))
    await manager.create(create_request(id="f" * 32, name="second", params=BAD_AT_START))
    for ref, want in ((ID, ID), ("first", ID), ("second", "f" * 32), ("0123", ID),
                      ("fff", "f" * 32)):
        inst = manager.resolve(ref)
        assert inst is not None and inst.id == want
    with pytest.raises(GRPCError, match="instance nothing not found"):
        await manager.gadget_info("nothing")
    assert manager.resolve("") is None
    await manager.stop()


async def test_restart_restores_instances_and_sets_corrupt_files_aside(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    store.start()
    store.save(create_request(id=ID, name="kept", params=BAD_AT_START))
    (store.directory / ("a" * 32 + ".gadget")).write_text("{broken")
    ctx = ServiceContext(Catalog(), Ledger(), node="here")
    m = InstanceManager(ctx, tmp_path)
    await m.start()
    assert [gi.name for gi in m.list()] == ["kept"]
    [problem] = m.problems()
    assert problem.moved_to is not None and problem.moved_to.name.endswith(".gadget.corrupt")
    states = m.list_states()
    assert [s.name for s in states] == ["kept"]
    await m.stop()
    assert store.exists(ID)  # stopping the daemon keeps instances


# -- legacy -----------------------------------------------------------------------------------


def test_legacy_params_map_bare_runtime_and_operator_keys() -> None:
    spec = Catalog().legacy("trace", "exec")
    values, ignored = legacy_params(spec, {
        "ignore-failed": "false", "pid": "42", "runtime.ringbuf-size": "65536",
        "operator.filter.filter": "proc.comm==x", "operator.LocalManager.host": "true",
        "operator.oci.ebpf.uid": "0", "nonsense": "1"})
    assert values == {
        "operator.oci.ebpf.ignore-failed": "false", "operator.oci.ebpf.pid": "42",
        "operator.bcc.ringbuf-size": "65536", "operator.filter.filter": "proc.comm==x",
        "operator.LocalManager.host": "true", "operator.oci.ebpf.uid": "0"}
    assert ignored == ["nonsense"]


def test_select_nodes() -> None:
    peers = PeerPool({"b": "unix:///b.sock", "c": "127.0.0.1:1"})
    assert select_nodes("a", peers, [], False) == (True, [])
    assert select_nodes("a", peers, [], True) == (True, ["b", "c"])
    assert select_nodes("a", peers, ["c"], False) == (False, ["c"])
    assert select_nodes("a", peers, ["a", "b", "b"], False) == (True, ["b"])
    with pytest.raises(GRPCError, match="unknown node"):
        select_nodes("a", peers, ["z"], False)


def test_json_encoder_nests_by_parent_and_adds_the_node() -> None:
    spec = Catalog().resolve("trace_exec")
    ds = spec.datasources[0]
    rec = np.zeros((2, ds.record_size), dtype=np.uint8)
    comm = ds.field("proc.comm")
    pid = ds.field("proc.pid")
    args = ds.field("args")
    for i, (name, p) in enumerate(((b"bash", 7), (b"sh", 8))):
        rec[i, comm.offs: comm.offs + len(name)] = np.frombuffer(name, dtype=np.uint8)
        rec[i, pid.offs: pid.offs + 4] = np.frombuffer(p.to_bytes(4, "little"), dtype=np.uint8)
        a = "x\u00a0y".encode()
        rec[i, args.offs: args.offs + len(a)] = np.frombuffer(a, dtype=np.uint8)
    enc = legacy_json_encoder(ds, "node-1")
    objs = [orjson.loads(b) for b in enc.encode(Batch(ds, rec))]
    assert [o["proc"]["comm"] for o in objs] == ["bash", "sh"]
    assert [o["proc"]["pid"] for o in objs] == [7, 8]
    assert objs[0]["proc"]["creds"] == {"uid": 0, "gid": 0}
    assert objs[0]["args"] == "x\u00a0y"
    assert {o["node"] for o in objs} == {"node-1"}
    assert json.loads(enc.encode_array(Batch(ds, rec)))[1]["proc"]["pid"] == 8


def test_legacy_json_is_the_sinks_json_and_leaves_out_json_skip_fields() -> None:
    spec = Catalog().resolve("trace_dns")
    raw = spec.datasources[0]
    derive = Derive(spec.datasources, spec.derive)
    # As a run emits it: derived fields announced, further payloads filled.
    batch = derive.process(Batch(raw, np.zeros((1, raw.record_size), dtype=np.uint8)))
    ds = batch.schema
    skipped = {f.full_name for f in ds.fields if f.annotations.get("json.skip") == "true"}
    assert skipped == {"dns_off", "data_len", "data", "src.endpoint", "dst.endpoint"}
    [legacy] = legacy_json_encoder(ds, "n1").encode(batch)
    [sink] = SinkJsonEncoder(ds).encode(batch)
    obj = orjson.loads(legacy)
    assert obj.pop("node") == "n1"
    assert obj == orjson.loads(sink)
    assert not {"dns_off", "data_len", "data"} & set(obj) and "endpoint" not in obj["src"]
    assert "latency_ns" in obj


# -- CLI ----------------------------------------------------------------------------------------


def test_cli_resolves_id_then_name_then_unique_prefix() -> None:
    insts = [pb.GadgetInstance(id="ab" + "0" * 30, name="web"),
             pb.GadgetInstance(id="ac" + "0" * 30, name="ab"),
             pb.GadgetInstance(id="b" * 32, name="db")]
    assert resolve(insts, "b" * 32).name == "db"
    assert resolve(insts, "ab").id == "ac" + "0" * 30  # an exact name beats a prefix
    assert resolve(insts, "db").id == "b" * 32
    assert resolve(insts, "bbb").name == "db"
    with pytest.raises(ResolveError, match="ambiguous"):
        resolve(insts, "a")
    with pytest.raises(ResolveError, match="no gadget instance"):
        resolve(insts, "zz")


def test_an_instance_is_starting_and_not_tracing_until_its_programs_are_attached(
        tmp_path: Path) -> None:
    ctx = ServiceContext(Catalog(), Ledger())
    inst = Instance(ctx, create_request(name="later"), PeerPool({}))
    state = inst.to_proto().state
    assert (state.status, state.message) == (pb.StatusInvalid, NOT_TRACING_YET)
    summary = inst.summary()
    assert (summary.status, summary.tracing, summary.ready_seconds) == ("Starting", False, None)
