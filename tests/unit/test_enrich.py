"""The enrich operator without a kernel: upstream's k8s/runtime fields, values looked up from a
collection per batch, container selection, classification from /proc, the cgroup fallback."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.batch import Batch, CodedColumn
from pipeline.containers.collection import ContainerCollection
from pipeline.containers.model import Container
from pipeline.containers.procfs import parse_cgroup_file
from pipeline.layout import StructRegistry
from pipeline.operators.enrich import (
    CONTAINER,
    NODE,
    CgroupResolver,
    Enrich,
    container_of,
    node_name,
)
from pipeline.schema import DataSourceSchema, DataSourceType, FieldFlag, Kind

CID = "ab" * 32
DEFAULT = {"columns.width": "16", "columns.ellipsis": "end", "columns.alignment": "left"}


def _schema() -> DataSourceSchema:
    reg = StructRegistry({"gadget_mntns_id": "u64", "gadget_netns_id": "u32"},
                         {"ev": ["u32 pid", "gadget_mntns_id mntns_id", "gadget_netns_id netns"]})
    fields, size = reg.fields("ev")
    return DataSourceSchema("ev", DataSourceType.SINGLE, tuple(fields), size)


def _rows(s: DataSourceSchema, recs: list[tuple[int, int, int]]) -> np.ndarray:
    rows = np.zeros((len(recs), s.record_size), dtype=np.uint8)
    for i, (pid, mntns, netns) in enumerate(recs):
        for name, fmt, v in (("pid", "<I", pid), ("mntns_id", "<Q", mntns), ("netns", "<I", netns)):
            f = s.field(name)
            rows[i, f.offs: f.offs + f.size] = np.frombuffer(struct.pack(fmt, v), np.uint8)
    return rows


def _values(batch: Batch, name: str) -> list[bytes]:
    f = batch.schema.field(name)
    return list(batch.extra[f.payload_index - 1])


def test_cgroup_v2_path_wins_unless_it_is_the_root() -> None:
    assert parse_cgroup_file("0::/system.slice/x.scope\n") == b"/system.slice/x.scope"
    hybrid = "4:memory:/process_api/abc\n1:cpu:/\n0::/\n"
    assert parse_cgroup_file(hybrid) == b"/process_api/abc"
    assert parse_cgroup_file("0::/\n") == b"/"


def test_container_ids_by_runtime_naming() -> None:
    assert container_of(f"/system.slice/docker-{CID}.scope".encode()) == (CID.encode(), b"docker")
    assert container_of(f"/docker/{CID}".encode()) == (CID.encode(), b"docker")
    assert container_of(f"/kubepods.slice/x/cri-containerd-{CID}.scope".encode()) == \
        (CID.encode(), b"containerd")
    assert container_of(f"/machine.slice/libpod-{CID}.scope".encode()) == \
        (CID.encode(), b"podman")
    assert container_of(f"/machine.slice/libpod-conmon-{CID}.scope".encode()) == (b"", b"")
    assert container_of(b"/user.slice") == (b"", b"")


def test_resolver_checks_the_mount_namespace_and_falls_back_to_the_parent(
        tmp_path: Path) -> None:
    for pid, cg in ((10, f"0::/docker-{CID}.scope\n"), (11, "0::/other\n")):
        (tmp_path / str(pid) / "ns").mkdir(parents=True)
        (tmp_path / str(pid) / "cgroup").write_text(cg)
        (tmp_path / str(pid) / "ns" / "mnt").write_text("")
    ino10 = os.stat(tmp_path / "10" / "ns" / "mnt").st_ino
    r = CgroupResolver(str(tmp_path))
    assert r.resolve(10, ino10).container_id == CID.encode()
    assert r.resolve(11, ino10).path == b""  # pid 11 lives in another mount namespace
    assert r.resolve(99, ino10, ppid=10).path == f"/docker-{CID}.scope".encode()


# (full name, kind, hidden outside Kubernetes, order, annotations, tags): upstream's
# pkg/datasource/compat/wrapper.go with pkg/metadata/v1/annotations.go's templates applied.
UPSTREAM = [
    ("k8s.node", Kind.STRING, True, -31,
     {"template": "node", "columns.width": "30", "columns.ellipsis": "middle"}, ("kubernetes",)),
    ("k8s.namespace", Kind.STRING, True, -30,
     {"template": "namespace", "columns.width": "30"}, ("kubernetes",)),
    ("k8s.podName", Kind.STRING, True, -29,
     {"template": "pod", "columns.width": "30", "columns.ellipsis": "middle"}, ("kubernetes",)),
    ("k8s.containerName", Kind.STRING, True, -28,
     {"template": "container", "columns.width": "30"}, ("kubernetes",)),
    ("k8s.hostnetwork", Kind.BOOL, True, -27, DEFAULT, ("kubernetes",)),
    ("k8s.podLabels", Kind.STRING, True, -26, DEFAULT, ("kubernetes",)),
    ("k8s.owner.kind", Kind.STRING, True, 0, DEFAULT, ("kubernetes",)),
    ("k8s.owner.name", Kind.STRING, True, 0, DEFAULT, ("kubernetes",)),
    ("runtime.containerName", Kind.STRING, False, -27,
     {"template": "container", "columns.width": "30"}, ()),
    ("runtime.runtimeName", Kind.STRING, True, -26,
     {"columns.width": "19", "columns.fixed": "true"}, ()),
    ("runtime.containerId", Kind.STRING, True, -25,
     {"columns.width": "13", "columns.maxwidth": "64"}, ()),
    ("runtime.containerPid", Kind.UINT32, True, -24,
     {"template": "containerPid", "columns.width": "6", "columns.hidden": "true",
      "columns.alignment": "right"}, ()),
    ("runtime.containerImageName", Kind.STRING, True, -23, DEFAULT, ()),
    ("runtime.containerImageDigest", Kind.STRING, True, -22, DEFAULT, ()),
    ("runtime.containerStartedAt", Kind.INT64, True, -21, DEFAULT, ()),
]


def test_every_record_gets_upstreams_k8s_and_runtime_fields(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    s = _schema()
    out = Enrich({}, [s]).output_schema(s)
    by = {f.full_name: f for f in out.fields}
    for group in ("k8s", "runtime", "k8s.owner"):
        assert by[group].flags & FieldFlag.EMPTY and by[group].kind == Kind.INVALID
        assert dict(by[group].annotations) == DEFAULT
    assert by["k8s"].hidden and not by["runtime"].hidden
    assert by["k8s"].order == by["k8s"].index and by["runtime"].order == by["runtime"].index
    for i, (name, kind, hidden, order, ann, tags) in enumerate(UPSTREAM):
        f = by[name]
        assert (f.kind, f.hidden, f.order, dict(f.annotations), f.tags) == \
            (kind, hidden, order, ann, tags), name
        assert f.payload_index == 1 + i and f.size == 0 and f.flags & FieldFlag.HAS_PARENT
        assert out.fields[f.parent or 0].full_name == name.rpartition(".")[0]
    assert out.payload_count == 1 + len(UPSTREAM)


def test_in_kubernetes_the_runtime_object_is_hidden_instead(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    s = _schema()
    by = {f.full_name: f for f in Enrich({}, [s]).output_schema(s).fields}
    assert not by["k8s"].hidden and not by["k8s.podName"].hidden and by["k8s.podLabels"].hidden
    assert by["runtime"].hidden and by["runtime.containerName"].hidden


def _collection() -> ContainerCollection:
    c = ContainerCollection(host_netns=1)
    c.connected = True
    c.upsert(Container.from_labels("c1", {"io.kubernetes.pod.name": "web-0",
                                          "io.kubernetes.pod.namespace": "shop",
                                          "io.kubernetes.container.name": "app"},
                                   "docker.io/library/nginx:1").with_(
        pid=4242, mntns=1001, netns=2001, started_at=1_700_000_000_000_000_000,
        image_digest="sha256:" + "e" * 64, pod_labels={"app": "web", "tier": "front"}))
    c.upsert(Container.from_labels("c2", {"io.kubernetes.pod.name": "db-0",
                                          "io.kubernetes.pod.namespace": "shop"}).with_(
        pid=77, mntns=1002, netns=2002))
    return c


def test_values_are_looked_up_per_batch_by_mount_namespace() -> None:
    s = _schema()
    op = Enrich({NODE: True}, [s], _collection())
    b = op.process(Batch(s, _rows(s, [(1, 1001, 0), (2, 999, 0), (3, 1002, 0), (4, 1001, 0)])))
    # One codes array for every added column: the wire frames each distinct value once.
    coded = [c for c in b.extra if isinstance(c, CodedColumn)]
    assert len(coded) == len(UPSTREAM) and len({id(c.codes) for c in coded}) == 1
    assert _values(b, "k8s.podName") == [b"web-0", b"", b"db-0", b"web-0"]
    assert _values(b, "k8s.namespace") == [b"shop", b"", b"shop", b"shop"]
    assert _values(b, "k8s.containerName") == [b"app", b"", b"", b"app"]
    assert _values(b, "runtime.containerName") == [b"app", b"", b"c2", b"app"]
    assert _values(b, "runtime.containerId") == [b"c1", b"", b"c2", b"c1"]
    assert _values(b, "runtime.runtimeName") == [b"containerd", b"", b"containerd",
                                                 b"containerd"]
    assert _values(b, "runtime.containerPid") == [struct.pack("<I", p) for p in (4242, 0, 77,
                                                                                   4242)]
    assert _values(b, "runtime.containerStartedAt")[0] == struct.pack(
        "<q", 1_700_000_000_000_000_000)
    assert _values(b, "runtime.containerImageName")[0] == b"docker.io/library/nginx:1"
    assert _values(b, "runtime.containerImageDigest")[0] == b"sha256:" + b"e" * 64
    assert _values(b, "k8s.podLabels")[0] == b"app=web,tier=front"
    assert _values(b, "k8s.hostnetwork") == [b"\x00"] * 4
    assert set(_values(b, "k8s.node")) == {node_name().encode()}


def test_without_node_param_k8s_node_is_empty_as_upstreams_daemon_sends_it() -> None:
    s = _schema()
    b = Enrich({}, [s], _collection()).process(Batch(s, _rows(s, [(1, 1001, 0)])))
    assert _values(b, "k8s.node") == [b""]


def test_a_network_namespace_places_records_the_mount_namespace_does_not() -> None:
    s = _schema()
    b = Enrich({}, [s], _collection()).process(Batch(s, _rows(s, [(1, 5, 2002), (2, 5, 2001)])))
    assert _values(b, "runtime.containerId") == [b"c2", b"c1"]


def test_selection_keeps_only_the_selected_pods_records() -> None:
    s = _schema()
    op = Enrich({"operator.LocalManager.k8s-podname": "web-0"}, [s], _collection())
    b = op.process(Batch(s, _rows(s, [(1, 1001, 0), (2, 999, 0), (3, 1002, 0), (4, 1001, 0)])))
    assert _values(b, "k8s.podName") == [b"web-0", b"web-0"]
    host = Enrich({"operator.LocalManager.k8s-podname": "web-0",
                   "operator.LocalManager.host": True}, [s], _collection())
    assert len(host.process(Batch(s, _rows(s, [(1, 1001, 0), (2, 999, 0)])))) == 2
    labels = Enrich({"operator.LocalManager.k8s-selector": "tier=front"}, [s], _collection())
    assert _values(labels.process(Batch(s, _rows(s, [(1, 1001, 0), (3, 1002, 0)]))),
                   "runtime.containerId") == [b"c1"]


def _fake_proc(root: Path, pid: int, cgroup: str) -> int:
    (root / str(pid) / "ns").mkdir(parents=True)
    (root / str(pid) / "ns" / "mnt").write_text("")
    (root / str(pid) / "ns" / "net").write_text("")
    (root / str(pid) / "cgroup").write_text(cgroup)
    return os.stat(root / str(pid) / "ns" / "mnt").st_ino


def test_a_namespace_no_event_named_is_classified_from_the_process_cgroup(
        tmp_path: Path) -> None:
    mnt_new = _fake_proc(tmp_path, 10, "0::/k8s.io/fresh\n")
    mnt_host = _fake_proc(tmp_path, 11, "0::/user.slice/session-1.scope\n")
    coll = ContainerCollection(proc=str(tmp_path), host_netns=1)
    coll.connected = True
    # Known from /containers/create; its task event has not arrived.
    coll.set_metadata(Container.from_labels("fresh", {"io.kubernetes.pod.name": "new-0"}))
    s = _schema()
    op = Enrich({}, [s], coll)
    b = op.process(Batch(s, _rows(s, [(10, mnt_new, 0), (11, mnt_host, 0)])))
    assert _values(b, "k8s.podName") == [b"new-0", b""]
    fresh = coll.get("fresh")
    assert fresh is not None and fresh.mntns == mnt_new
    # The host's namespace is remembered: no second look at /proc for it.
    (tmp_path / "11" / "cgroup").write_text("0::/k8s.io/fresh\n")
    b2 = op.process(Batch(s, _rows(s, [(11, mnt_host, 0)])))
    assert _values(b2, "k8s.podName") == [b""]
    coll.close()


def test_enrich_container_resolves_other_runtimes_from_proc(tmp_path: Path) -> None:
    (tmp_path / "7" / "ns").mkdir(parents=True)
    (tmp_path / "7" / "cgroup").write_text(f"0::/docker-{CID}.scope\n")
    s = _schema()
    op = Enrich({CONTAINER: True}, [s], _collection(), CgroupResolver(str(tmp_path)))
    out = op.output_schema(s)
    assert out.field("runtime.cgroupPath").hidden
    b = op.process(Batch(s, _rows(s, [(7, 0, 0), (8, 0, 0), (1, 1001, 0)])))
    assert _values(b, "runtime.containerId") == [CID.encode(), b"", b"c1"]
    assert _values(b, "runtime.runtimeName") == [b"docker", b"", b"containerd"]
    assert _values(b, "runtime.cgroupPath")[0] == f"/docker-{CID}.scope".encode()
    assert _values(b, "k8s.podName") == [b"", b"", b"web-0"]
