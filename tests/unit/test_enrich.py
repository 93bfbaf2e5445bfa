"""The enrich operator without a kernel: cgroup parsing, container ids, schema and payloads."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.batch import Batch
from pipeline.layout import StructRegistry
from pipeline.operators.enrich import (
    CONTAINER,
    NODE,
    CgroupResolver,
    Enrich,
    container_of,
    parse_cgroup_file,
)
from pipeline.schema import DataSourceSchema, DataSourceType, FieldFlag

CID = "ab" * 32


def _schema() -> DataSourceSchema:
    reg = StructRegistry({}, {"ev": ["u32 pid", "u64 mntns_id"]})
    fields, size = reg.fields("ev")
    return DataSourceSchema("ev", DataSourceType.SINGLE, tuple(fields), size)


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


def test_fields_get_their_own_payloads_and_values_are_grouped_per_process(
        tmp_path: Path) -> None:
    (tmp_path / "7" / "ns").mkdir(parents=True)
    (tmp_path / "7" / "cgroup").write_text(f"0::/docker-{CID}.scope\n")
    s = _schema()
    op = Enrich({NODE: True, CONTAINER: True}, [s], CgroupResolver(str(tmp_path)))
    out = op.output_schema(s)
    by = {f.full_name: f for f in out.fields}
    assert by["k8s"].flags & FieldFlag.EMPTY
    assert [by[n].payload_index for n in ("k8s.node", "runtime.containerId",
                                          "runtime.runtimeName", "runtime.cgroupPath")] == \
        [1, 2, 3, 4]
    assert out.payload_count == 5 and all(by[n].size == 0 for n in ("k8s.node",))
    rows = np.zeros((3, s.record_size), dtype=np.uint8)
    rows[:, 0:4] = np.array([7, 8, 7], dtype="<u4").view(np.uint8).reshape(3, 4)
    b = op.process(Batch(s, rows))
    assert len(b.extra) == 4
    assert b.extra[1] == [CID.encode(), b"", CID.encode()]
    assert b.extra[2] == [b"docker", b"", b"docker"]
