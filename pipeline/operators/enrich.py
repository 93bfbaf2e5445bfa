"""The ``enrich`` operator: adds the node name and the cgroup / container of each record's
process as dynamic fields (each in its own payload, ``size`` 0, spec 4.3).

Field names follow upstream Inspektor Gadget's enrichment where it has one: ``k8s.node``,
``runtime.containerId``, ``runtime.runtimeName``; ``runtime.cgroupPath`` has no upstream
counterpart (upstream knows containers from its runtime hooks, not from cgroups).

Records carry no cgroup id: the 64-byte ``gadget_process`` block is full, so the cgroup is
resolved in user space from ``/proc/<pid>/cgroup``. Resolutions are cached per (pid, mount
namespace) and checked against the record's mount namespace, so a reused pid is not taken for
its predecessor. A process that has already exited is resolved through its parent when the
parent is in the same mount namespace (a child starts in its parent's cgroup). Work is per
distinct process of a batch (``numpy.unique``), never per record.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.accessors import column
from pipeline.batch import Batch
from pipeline.params import ParamSpec
from pipeline.schema import DataSourceSchema, Field, FieldFlag, Kind

PREFIX = "operator.enrich."
# Keys carry the operator's name: upstream clients make a flag of every key, and ``node`` is
# one of theirs (see tests/unit/test_param_keys.py). The old keys are still accepted.
NODE = PREFIX + "enrich-node"
CONTAINER = PREFIX + "enrich-container"
PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("enrich-node", PREFIX, "Add k8s.node, the name of the node the daemon runs on "
              "($NODE_NAME, else the host name)", "false", "bool", tags=("group:Enrichment",),
              old_keys=(PREFIX + "node",)),
    ParamSpec("enrich-container", PREFIX, "Add runtime.cgroupPath, runtime.containerId and "
              "runtime.runtimeName of each record's process, from /proc/<pid>/cgroup", "false",
              "bool", tags=("group:Enrichment",), old_keys=(PREFIX + "container",)),
)

ANN_PID = "enrich.pid"
"""Data source annotation naming the pid field to enrich by (default: the first of
``proc.pid``, ``pid``, ``fprocess.pid`` that exists)."""
ANN_PPID = "enrich.ppid"
"""Data source annotation naming the parent pid field used when the process has exited;
``"-"`` disables the fallback."""
ANN_MNTNS = "enrich.mntns"
"""Data source annotation naming the mount namespace field of the process."""

_PID_FIELDS = ("proc.pid", "pid", "fprocess.pid")
_PPID_FIELDS = ("proc.parent.pid", "parent.pid", "fprocess.parent.pid")
_MNTNS_FIELDS = ("proc.mntns_id", "mntns_id", "fprocess.mntns_id")
# Upstream's enrichment fields sort before a gadget's own (orders -31 ... -21).
_ORDER = -30
_CACHE_TTL_S = 10.0
_CACHE_MAX = 65536
# Container ids as runtimes name their cgroups: docker-<id>.scope (systemd driver), /docker/<id>
# (cgroupfs driver), cri-containerd-<id>.scope, crio-<id>.scope, libpod-<id>.scope, and the bare
# id under kubepods. conmon/shim scopes carry a runtime prefix plus "conmon-" and are skipped.
_CONTAINER = re.compile(r"(?:^|/)(?:(docker|cri-containerd|crio|libpod)-)?([0-9a-f]{64})"
                        r"(?:\.scope)?(?=/|$)")
_RUNTIMES = {"docker": "docker", "cri-containerd": "containerd", "crio": "cri-o",
             "libpod": "podman"}
# Preferred cgroup v1 hierarchies when the unified (v2) path is the root (hybrid hosts).
_V1_ORDER = ("name=systemd", "memory", "pids", "cpu,cpuacct", "cpu")


def wanted(values: Mapping[str, Any]) -> bool:
    return bool(values.get(NODE) or values.get(CONTAINER))


def node_name() -> str:
    """The Kubernetes downward-API node name when set, else the host name."""
    return os.environ.get("NODE_NAME") or socket.gethostname()


@dataclass(frozen=True, slots=True)
class CgroupInfo:
    path: bytes
    container_id: bytes
    runtime: bytes


_NONE = CgroupInfo(b"", b"", b"")


def parse_cgroup_file(text: str) -> bytes:
    """The process's cgroup path from ``/proc/<pid>/cgroup``: the unified (v2) path unless it
    is the root on a hybrid host, then the first non-root v1 path by ``_V1_ORDER``."""
    v2 = ""
    v1: dict[str, str] = {}
    for line in text.splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hid == "0" and controllers == "":
            v2 = path
        elif path and path != "/":
            v1[controllers] = path
    if v2 and v2 != "/":
        return v2.encode()
    for name in _V1_ORDER:
        if name in v1:
            return v1[name].encode()
    if v1:
        return next(iter(v1.values())).encode()
    return v2.encode()


def container_of(path: bytes) -> tuple[bytes, bytes]:
    """(container id, runtime name) named by a cgroup path, or empty strings."""
    found = list(_CONTAINER.finditer(path.decode("utf-8", "replace")))
    if not found:
        return b"", b""
    m = found[-1]  # the innermost container (nested runtimes)
    runtime = _RUNTIMES.get(m[1] or "", "")
    if not runtime and "/docker/" in m.string:
        runtime = "docker"
    return m[2].encode(), runtime.encode()


class CgroupResolver:
    """(pid, mount namespace) -> cgroup info, cached for a few seconds."""

    def __init__(self, proc: str = "/proc", ttl: float = _CACHE_TTL_S) -> None:
        self._proc = proc
        self._ttl = ttl
        self._cache: dict[tuple[int, int], tuple[float, CgroupInfo]] = {}

    def _read(self, pid: int, mntns: int) -> CgroupInfo | None:
        """None when the process is gone or is another process than the record's."""
        try:
            if mntns and os.stat(f"{self._proc}/{pid}/ns/mnt").st_ino != mntns:
                return None  # pid reused by a process in another mount namespace
            with open(f"{self._proc}/{pid}/cgroup") as f:
                text = f.read()
        except OSError:
            return None
        path = parse_cgroup_file(text)
        cid, runtime = container_of(path)
        return CgroupInfo(path, cid, runtime)

    def resolve(self, pid: int, mntns: int, ppid: int = 0) -> CgroupInfo:
        now = time.monotonic()
        key = (pid, mntns)
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        info = self._read(pid, mntns) if pid else None
        if info is None and ppid:
            info = self._read(ppid, mntns)  # exited already: its parent's, same mount ns only
        if info is None:
            return _NONE  # not cached: a later record of a live process may still resolve
        if len(self._cache) >= _CACHE_MAX:
            for k in list(self._cache)[: _CACHE_MAX // 4]:  # oldest inserted first
                del self._cache[k]
        self._cache[key] = (now, info)
        return info


def _field_named(schema: DataSourceSchema, names: Iterable[str]) -> Field | None:
    for name in names:
        for f in schema.fields:
            if f.full_name == name and f.has_value and f.base_kind in (Kind.UINT32, Kind.UINT64):
                return f
    return None


@dataclass(frozen=True, slots=True)
class _Plan:
    schema: DataSourceSchema
    node: bool
    pid: Field | None
    ppid: Field | None
    mntns: Field | None
    container: bool


class Enrich:
    """Appends ``k8s.node`` and/or ``runtime.*`` to every data source."""

    name = "enrich"

    def __init__(self, values: Mapping[str, Any], schemas: Sequence[DataSourceSchema],
                 resolver: CgroupResolver | None = None) -> None:
        self._node = node_name().encode() if values.get(NODE) else None
        self._container = bool(values.get(CONTAINER))
        self._resolver = resolver or CgroupResolver()
        self._plans: dict[str, _Plan] = {s.name: self._plan(s) for s in schemas}

    def _plan(self, schema: DataSourceSchema) -> _Plan:
        ann = schema.annotations
        pid = _field_named(schema, [ann[ANN_PID]] if ANN_PID in ann else _PID_FIELDS)
        ppid = None if ann.get(ANN_PPID) == "-" else _field_named(
            schema, [ann[ANN_PPID]] if ANN_PPID in ann else _PPID_FIELDS)
        mntns = _field_named(schema, [ann[ANN_MNTNS]] if ANN_MNTNS in ann else _MNTNS_FIELDS)
        container = self._container and pid is not None
        fields = list(schema.fields)
        payload = schema.payload_count

        def add(name: str, kind: Kind, parent: int | None, hidden: bool = False,
                description: str = "") -> int:
            nonlocal payload
            empty = kind is Kind.INVALID
            flags = (FieldFlag.EMPTY if empty else FieldFlag.NONE) | \
                (FieldFlag.HAS_PARENT if parent is not None else FieldFlag.NONE) | \
                (FieldFlag.HIDDEN if hidden else FieldFlag.NONE)
            ann = {"columns.width": "16", "columns.ellipsis": "end",
                   "columns.alignment": "left"}
            if hidden:
                ann["columns.hidden"] = "true"
            if description:
                ann["description"] = description
            prefix = fields[parent].full_name + "." if parent is not None else ""
            fields.append(Field(
                name=name, full_name=prefix + name, index=len(fields), kind=int(kind),
                payload_index=0 if empty else payload, flags=flags, tags=("src:enrich",),
                annotations=ann, parent=parent, order=_ORDER + len(fields) - len(schema.fields)))
            if not empty:
                payload += 1
            return len(fields) - 1

        if self._node is not None:
            k8s = add("k8s", Kind.INVALID, None)
            add("node", Kind.STRING, k8s, description="Node the daemon runs on")
        if container:
            rt = add("runtime", Kind.INVALID, None)
            add("containerId", Kind.STRING, rt,
                description="Container id named by the process's cgroup")
            add("runtimeName", Kind.STRING, rt, hidden=True,
                description="Container runtime named by the process's cgroup")
            add("cgroupPath", Kind.STRING, rt, hidden=True,
                description="cgroup of the process (v2 path, or a v1 one on hybrid hosts)")
        out = replace(schema, fields=tuple(fields), payload_count=payload)
        return _Plan(out, self._node is not None, pid, ppid, mntns, container)

    def output_schema(self, schema: DataSourceSchema) -> DataSourceSchema:
        plan = self._plans.get(schema.name)
        return schema if plan is None else plan.schema

    def process(self, batch: Batch) -> Batch:
        plan = self._plans.get(batch.schema.name)
        if plan is None:
            return batch
        n = len(batch)
        extra: list[Sequence[bytes]] = list(batch.extra)
        if plan.node and self._node is not None:
            extra.append([self._node] * n)
        if plan.container and plan.pid is not None:
            ids, runtimes, paths = self._containers(batch, plan.pid, plan)
            extra += [ids, runtimes, paths]
        return Batch(plan.schema, batch.rows, tuple(extra))

    def _containers(self, batch: Batch, pid: Field, plan: _Plan,
                    ) -> tuple[list[bytes], list[bytes], list[bytes]]:
        n = len(batch)
        if n == 0:
            return [], [], []
        cols = [column(batch, pid).astype(np.uint64)]
        cols.append(column(batch, plan.mntns).astype(np.uint64) if plan.mntns is not None
                    else np.zeros(n, np.uint64))
        cols.append(column(batch, plan.ppid).astype(np.uint64) if plan.ppid is not None
                    else np.zeros(n, np.uint64))
        keys: npt.NDArray[np.uint64] = np.stack(cols, axis=1)
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        infos = [self._resolver.resolve(int(p), int(m), int(pp)) for p, m, pp in uniq.tolist()]
        take = inverse.reshape(-1)
        ids = np.array([i.container_id for i in infos], dtype=object)[take].tolist()
        runtimes = np.array([i.runtime for i in infos], dtype=object)[take].tolist()
        paths = np.array([i.path for i in infos], dtype=object)[take].tolist()
        return ids, runtimes, paths
