"""The instance file store: format, atomic writes, corrupt files set aside."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from api.store import InstanceStore
from pipeline._gen import gadget_service_pb2 as pb

ID_A = "61c8" + "0" * 24 + "f854"
ID_B = "b" * 32


def request(instance_id: str, name: str = "brave_bartik") -> pb.CreateGadgetInstanceRequest:
    return pb.CreateGadgetInstanceRequest(gadgetInstance=pb.GadgetInstance(
        id=instance_id, name=name, tags=[""], timeCreated=1764000000,
        gadgetConfig=pb.GadgetRunRequest(imageName="trace_exec:latest", version=1,
                                         paramValues={"operator.oci.ebpf.paths": "false"})),
        eventBufferLength=7)


@pytest.fixture
def store(tmp_path: Path) -> InstanceStore:
    s = InstanceStore(tmp_path / "state")
    s.start()
    return s


def test_directory_is_private_and_files_are_protobuf_json(store: InstanceStore) -> None:
    path = store.save(request(ID_A))
    assert path == store.directory / f"{ID_A}.gadget"
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    doc = json.loads(path.read_text())
    # lowerCamelCase proto names, int64 as a string, zero values omitted
    # (docs/gadget-service.md §6.3).
    assert doc == {"gadgetInstance": {
        "id": ID_A, "name": "brave_bartik", "tags": [""], "timeCreated": "1764000000",
        "gadgetConfig": {"imageName": "trace_exec:latest",
                         "paramValues": {"operator.oci.ebpf.paths": "false"}, "version": 1}},
        "eventBufferLength": 7}


def test_upstream_written_file_loads(store: InstanceStore) -> None:
    # The spec's example, with whitespace as upstream's randomizing writer may put it.
    text = ('{"gadgetInstance": {"id":"ID",  "gadgetConfig":{"imageName":"trace_exec:latest",'
            '"paramValues":{"operator.oci.ebpf.paths":"false"},"version":1},"tags":[""],'
            '"name":"brave_bartik"}}').replace("ID", ID_A)
    (store.directory / f"{ID_A}.gadget").write_text(text)
    [req] = store.load_all()
    assert req.gadgetInstance.name == "brave_bartik"
    assert req.gadgetInstance.gadgetConfig.paramValues["operator.oci.ebpf.paths"] == "false"
    assert store.problems() == []


def test_save_load_delete_round_trip(store: InstanceStore) -> None:
    store.save(request(ID_B, "second"))
    store.save(request(ID_A))
    assert [r.gadgetInstance.id for r in store.load_all()] == [ID_A, ID_B]  # id order
    assert store.load(ID_B) == request(ID_B, "second")
    assert store.delete(ID_A) is True
    assert store.delete(ID_A) is False
    assert [r.gadgetInstance.id for r in store.load_all()] == [ID_B]


def test_save_replaces_atomically_and_leaves_no_temp_files(store: InstanceStore) -> None:
    store.save(request(ID_A, "one"))
    store.save(request(ID_A, "two"))
    assert store.load(ID_A).gadgetInstance.name == "two"
    assert sorted(p.name for p in store.directory.iterdir()) == [f"{ID_A}.gadget"]


def test_stale_temp_file_from_a_crash_is_removed_at_start(tmp_path: Path) -> None:
    s = InstanceStore(tmp_path)
    s.start()
    s.save(request(ID_A))
    stale = s.directory / ".tmp-abc.gadget"
    stale.write_text("{half")
    s2 = InstanceStore(tmp_path)
    s2.start()
    assert not stale.exists()
    assert [r.gadgetInstance.id for r in s2.load_all()] == [ID_A]


@pytest.mark.parametrize(("content", "reason"), [
    (b"{not json", "not a CreateGadgetInstanceRequest"),
    (b'{"gadgetInstance": {"id": "%s", "bogus": 1}}', "bogus"),
    (b'{"gadgetInstance": {"id": "%s"}, "eventBufferLength": "x"}', "eventBufferLength"),
    (b'{"gadgetInstance": {"id": "cccccccccccccccccccccccccccccccc"}}', "content says"),
    (b"\xff\xfe", "not a CreateGadgetInstanceRequest"),
])
def test_corrupt_file_is_set_aside_reported_and_others_load(
        store: InstanceStore, content: bytes, reason: str) -> None:
    store.save(request(ID_B, "good"))
    bad = store.directory / f"{ID_A}.gadget"
    bad.write_bytes(content.replace(b"%s", ID_A.encode()))
    loaded = store.load_all()
    assert [r.gadgetInstance.id for r in loaded] == [ID_B]
    [problem] = store.problems()
    assert problem.path == bad
    assert reason in problem.reason
    assert problem.moved_to == bad.with_name(bad.name + ".corrupt")
    assert problem.moved_to.read_bytes() == content.replace(b"%s", ID_A.encode())
    assert not bad.exists()
    # Set aside once: the next load is clean.
    assert [r.gadgetInstance.id for r in store.load_all()] == [ID_B]
    assert len(store.problems()) == 1


def test_unreadable_file_is_reported_not_fatal(store: InstanceStore) -> None:
    if os.geteuid() == 0:
        # root reads anything; a directory named like an instance file is unreadable as a file.
        (store.directory / f"{ID_A}.gadget").mkdir()
    else:
        p = store.directory / f"{ID_A}.gadget"
        p.write_text("{}")
        p.chmod(0)
    store.save(request(ID_B, "good"))
    assert [r.gadgetInstance.id for r in store.load_all()] == [ID_B]
    assert len(store.problems()) == 1


def test_save_refuses_a_request_without_a_valid_id(store: InstanceStore) -> None:
    with pytest.raises(ValueError, match=r"invalid gadget instance id: \.\./x"):
        store.save(request("../x"))
