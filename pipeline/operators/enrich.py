"""The ``enrich`` operator: every record of a data source with a mount or network namespace
field gains upstream's ``k8s`` and ``runtime`` objects, filled from the container collection;
and a run's container selection (upstream's LocalManager params) is applied to its records.

Fields, kinds, flags, orders and annotations are upstream Inspektor Gadget's
(``pkg/datasource/compat/wrapper.go``, its annotation templates in
``pkg/metadata/v1/annotations.go``): ``k8s.{node, namespace, podName, containerName,
hostnetwork, podLabels, owner.kind, owner.name}`` and ``runtime.{containerName, runtimeName,
containerId, containerPid, containerImageName, containerImageDigest, containerStartedAt}``,
each a dynamic field in its own payload (docs/gadget-service.md §4.3). Outside Kubernetes
(no ``KUBERNETES_SERVICE_HOST``) the ``k8s`` object is hidden, as upstream's daemon hides it;
inside, ``runtime`` is. A record of a process in no known container carries them empty
(numbers 0), as upstream sends them. ``k8s.node`` is filled when
``operator.enrich.enrich-node`` is set (upstream's daemon fills it only when it talks to the
API server). ``owner.*`` stay empty: they need the API server.

Values come per batch: the data source's mount namespace column is looked up in the
collection's sorted key array (``numpy.searchsorted``), giving each record a row, and each
field becomes a :class:`~pipeline.batch.CodedColumn` of the rows' values, so nothing is done per
record in Python. A record whose namespace the collection does not know yet (a container's
first process, before the runtime's task event arrived) is classified once per namespace from
its process's cgroup (:meth:`ContainerCollection.classify`); namespaces found to be no
container's are remembered for :data:`NEGATIVE_TTL_S`. Records the mount namespace does not
place are looked up by network namespace (trace_dns, trace_tcp), as upstream does.

``operator.enrich.enrich-container`` (ours, off by default) also resolves processes the collection
does not know (other runtimes: docker, podman, ...) from ``/proc/<pid>/cgroup`` into
``runtime.containerId`` and ``runtime.runtimeName``, and adds ``runtime.cgroupPath`` (no
upstream counterpart), per distinct process of a batch.

Selection (see ``pipeline.containers.selector``): records of processes outside the selected
containers are dropped here (counted as filtered); gadgets compiled with the shared filter
also get the selection in the kernel (``gadget_mntns_filter`` in
pipeline/sources/bpf/gadget_containers.h), kept in step with the collection by
``pipeline.containers.kernel_filter``, so most such records never reach the ring.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.accessors import column
from pipeline.batch import Batch, CodedColumn
from pipeline.containers.attach import attach_to_source
from pipeline.containers.collection import Classified, ContainerCollection, LookupTable
from pipeline.containers.kernel_filter import KernelSelection
from pipeline.containers.model import Container
from pipeline.containers.procfs import parse_cgroup_file
from pipeline.containers.selector import PARAMS as SELECTOR_PARAMS
from pipeline.containers.selector import ContainerSelector
from pipeline.params import ParamSpec
from pipeline.schema import DataSourceSchema, Field, FieldFlag, Kind
from pipeline.severity import Severity

PREFIX = "operator.enrich."
# Keys carry the operator's name: upstream clients make a flag of every key, and ``node`` is
# one of theirs (see tests/unit/test_param_keys.py). The old keys are still accepted.
NODE = PREFIX + "enrich-node"
CONTAINER = PREFIX + "enrich-container"
PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("enrich-node", PREFIX, "Fill k8s.node with the name of the node the daemon runs "
              "on ($NODE_NAME, else the host name)", "false", "bool", tags=("group:Enrichment",),
              old_keys=(PREFIX + "node",)),
    ParamSpec("enrich-container", PREFIX, "Also resolve processes of containers the runtime does "
              "not report (docker, podman, ...) from /proc/<pid>/cgroup into "
              "runtime.containerId and runtime.runtimeName, and add runtime.cgroupPath",
              "false", "bool", tags=("group:Enrichment",), old_keys=(PREFIX + "container",)),
    *SELECTOR_PARAMS,
)

ANN_PID = "enrich.pid"
"""Data source annotation naming the pid field to enrich by (default: the first of
``proc.pid``, ``pid``, ``fprocess.pid`` that exists)."""
ANN_PPID = "enrich.ppid"
"""Data source annotation naming the parent pid field used when the process has exited;
``"-"`` disables the fallback."""
ANN_MNTNS = "enrich.mntns"
"""Data source annotation naming the mount namespace field (default: the first field tagged
``type:gadget_mntns_id``, as upstream picks it)."""

MNTNS_TAG = "type:gadget_mntns_id"
NETNS_TAG = "type:gadget_netns_id"
NEGATIVE_TTL_S = 10.0
"""Seconds a mount namespace found to be no container's is not looked at again (its inode
may later be reused by a container's, whose runtime event then names it)."""
UNKNOWN_TTL_S = 0.5
"""Seconds a namespace whose process was gone before it could be classified is not tried
again (bounds the /proc reads a stream of short-lived processes costs)."""
CLASSIFY_PER_BATCH = 32
"""At most this many unknown namespaces are classified from /proc per batch."""

_PID_FIELDS = ("proc.pid", "pid", "fprocess.pid")
_PPID_FIELDS = ("proc.parent.pid", "parent.pid", "fprocess.parent.pid")
_MNTNS_FIELDS = ("proc.mntns_id", "mntns_id", "fprocess.mntns_id")
_CACHE_TTL_S = 10.0
_CACHE_MAX = 65536
# Container ids as runtimes name their cgroups: docker-<id>.scope (systemd driver), /docker/<id>
# (cgroupfs driver), cri-containerd-<id>.scope, crio-<id>.scope, libpod-<id>.scope, and the bare
# id under kubepods. conmon/shim scopes carry a runtime prefix plus "conmon-" and are skipped.
_CONTAINER = re.compile(r"(?:^|/)(?:(docker|cri-containerd|crio|libpod)-)?([0-9a-f]{64})"
                        r"(?:\.scope)?(?=/|$)")
_RUNTIMES = {"docker": "docker", "cri-containerd": "containerd", "crio": "cri-o",
             "libpod": "podman"}
_DEFAULT_ANN = {"columns.width": "16", "columns.ellipsis": "end", "columns.alignment": "left"}


def in_kubernetes() -> bool:
    """Whether the daemon runs in a Kubernetes pod (what upstream calls its environment)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def node_name() -> str:
    """The Kubernetes downward-API node name when set, else the host name."""
    return os.environ.get("NODE_NAME") or socket.gethostname()


# -- the upstream fields -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _FieldDef:
    """One field the operator adds: its name under its parent, kind, upstream's flags,
    annotations and order, and how a container's value is encoded."""

    parent: str  # "k8s", "runtime", "k8s.owner"
    name: str
    kind: Kind
    annotations: Mapping[str, str]
    order: int | None  # None: upstream leaves it at 0 (AddSubField without WithOrder)
    hidden: bool = False
    tags: tuple[str, ...] = ()
    value: str = ""  # the Container attribute, or a computed name (see _encode)


_K8S = ("kubernetes",)
_TEMPLATE_NODE = {"template": "node", "columns.width": "30", "columns.ellipsis": "middle"}
_TEMPLATE_NS = {"template": "namespace", "columns.width": "30"}
_TEMPLATE_POD = {"template": "pod", "columns.width": "30", "columns.ellipsis": "middle"}
_TEMPLATE_CONTAINER = {"template": "container", "columns.width": "30"}
_TEMPLATE_PID = {"template": "containerPid", "columns.width": "6", "columns.hidden": "true",
                 "columns.alignment": "right"}
FIELDS: tuple[_FieldDef, ...] = (
    _FieldDef("k8s", "node", Kind.STRING, _TEMPLATE_NODE, -31, tags=_K8S, value="node"),
    _FieldDef("k8s", "namespace", Kind.STRING, _TEMPLATE_NS, -30, tags=_K8S, value="namespace"),
    _FieldDef("k8s", "podName", Kind.STRING, _TEMPLATE_POD, -29, tags=_K8S, value="pod_name"),
    _FieldDef("k8s", "containerName", Kind.STRING, _TEMPLATE_CONTAINER, -28, tags=_K8S,
              value="k8s_container_name"),
    _FieldDef("k8s", "hostnetwork", Kind.BOOL, _DEFAULT_ANN, -27, True, _K8S, "host_network"),
    _FieldDef("k8s", "podLabels", Kind.STRING, _DEFAULT_ANN, -26, True, _K8S, "pod_labels_text"),
    _FieldDef("k8s.owner", "kind", Kind.STRING, _DEFAULT_ANN, None, True, _K8S, "owner_kind"),
    _FieldDef("k8s.owner", "name", Kind.STRING, _DEFAULT_ANN, None, True, _K8S, "owner_name"),
    _FieldDef("runtime", "containerName", Kind.STRING, _TEMPLATE_CONTAINER, -27, value="name"),
    _FieldDef("runtime", "runtimeName", Kind.STRING, {"columns.width": "19",
              "columns.fixed": "true"}, -26, True, value="runtime"),
    _FieldDef("runtime", "containerId", Kind.STRING, {"columns.width": "13",
              "columns.maxwidth": "64"}, -25, True, value="id"),
    _FieldDef("runtime", "containerPid", Kind.UINT32, _TEMPLATE_PID, -24, True, value="pid"),
    _FieldDef("runtime", "containerImageName", Kind.STRING, _DEFAULT_ANN, -23, True,
              value="image"),
    _FieldDef("runtime", "containerImageDigest", Kind.STRING, _DEFAULT_ANN, -22, True,
              value="image_digest"),
    _FieldDef("runtime", "containerStartedAt", Kind.INT64, _DEFAULT_ANN, -21, True,
              value="started_at"),
)
_FIELD_INDEX = {d.name: i for i, d in enumerate(FIELDS) if d.parent == "runtime"}
CGROUP_PATH = _FieldDef("runtime", "cgroupPath", Kind.STRING, {
    **_DEFAULT_ANN, "description": "cgroup of the process (v2 path, or a v1 one on hybrid hosts)"},
    None, True, value="cgroup_path")
"""Ours, with ``operator.enrich.container``."""
_NUMERIC = {Kind.BOOL: "<?", Kind.UINT32: "<I", Kind.INT64: "<q"}


def _encode(d: _FieldDef, c: Container | None, node: bytes) -> bytes:
    """Field ``d``'s payload entry for container ``c`` (None: a process in no container)."""
    if d.value == "node":
        return node
    if d.kind in _NUMERIC:
        v = getattr(c, d.value) if c is not None else 0
        return struct.pack(_NUMERIC[d.kind], v)
    if c is None or d.value in ("owner_kind", "owner_name"):
        return b""
    return str(getattr(c, d.value)).encode()


@dataclass(frozen=True)
class _Values:
    """Per table version: every field's value per row (row 0: no container), and which rows
    the run's selection keeps."""

    version: int
    table: LookupTable
    columns: tuple[list[bytes], ...]
    selected: npt.NDArray[np.bool_]


# -- the /proc fallback (operator.enrich.container) ---------------------------------------------

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


@dataclass(frozen=True, slots=True)
class CgroupInfo:
    path: bytes
    container_id: bytes
    runtime: bytes


_NONE = CgroupInfo(b"", b"", b"")


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


# -- the operator ---------------------------------------------------------------------------

def _field_named(schema: DataSourceSchema, names: Iterable[str]) -> Field | None:
    for name in names:
        for f in schema.fields:
            if f.full_name == name and f.has_value and f.base_kind in (Kind.UINT32, Kind.UINT64):
                return f
    return None


def _field_tagged(schema: DataSourceSchema, tag: str) -> Field | None:
    for f in schema.fields:
        if tag in f.tags and f.has_value and f.base_kind in (Kind.UINT32, Kind.UINT64):
            return f
    return None


@dataclass(frozen=True, slots=True)
class _Plan:
    schema: DataSourceSchema
    objects: bool  # the k8s and runtime objects are added
    node_only: bool  # no namespace field: just k8s.node (operator.enrich.node)
    mntns: Field | None
    netns: Field | None
    pid: Field | None
    ppid: Field | None
    cgroup: bool  # operator.enrich.container


class Enrich:
    """Adds upstream's ``k8s`` and ``runtime`` objects and applies the container selection.

    Args:
        values: the run's resolved params.
        schemas: the gadget's data sources.
        collection: the daemon's containers (None: none are known, fields stay empty).
        resolver: the /proc cgroup resolver of ``operator.enrich.container``.
    """

    name = "enrich"

    def __init__(self, values: Mapping[str, Any], schemas: Sequence[DataSourceSchema],
                 collection: ContainerCollection | None = None,
                 resolver: CgroupResolver | None = None) -> None:
        self._node = node_name().encode() if values.get(NODE) else b""
        self._cgroup = bool(values.get(CONTAINER))
        self._resolver = resolver or CgroupResolver()
        self.collection = collection if collection is not None else ContainerCollection(
            host_netns=0)
        self.selector = ContainerSelector.from_values(values)
        self._k8s_hidden = not in_kubernetes()
        self._plans: dict[str, _Plan] = {s.name: self._plan(s) for s in schemas}
        self._values: _Values | None = None
        self._negative: dict[int, float] = {}
        self._kernel: KernelSelection | None = None  # the in-kernel selection, once attached
        self._detach: Callable[[], None] | None = None

    def _plan(self, schema: DataSourceSchema) -> _Plan:
        ann = schema.annotations
        mntns = (_field_named(schema, [ann[ANN_MNTNS]]) if ANN_MNTNS in ann
                 else _field_tagged(schema, MNTNS_TAG) or _field_named(schema, _MNTNS_FIELDS))
        netns = _field_tagged(schema, NETNS_TAG)
        pid = _field_named(schema, [ann[ANN_PID]] if ANN_PID in ann else _PID_FIELDS)
        ppid = None if ann.get(ANN_PPID) == "-" else _field_named(
            schema, [ann[ANN_PPID]] if ANN_PPID in ann else _PPID_FIELDS)
        objects = mntns is not None or netns is not None
        node_only = not objects and bool(self._node)
        cgroup = self._cgroup and objects and pid is not None
        fields = list(schema.fields)
        payload = schema.payload_count
        parents: dict[str, int] = {}

        def add(name: str, kind: Kind, parent: str | None, annotations: Mapping[str, str],
                order: int | None, hidden: bool, tags: tuple[str, ...] = ()) -> None:
            nonlocal payload
            empty = kind is Kind.INVALID
            pidx = parents[parent] if parent is not None else None
            flags = (FieldFlag.EMPTY if empty else FieldFlag.NONE) | \
                (FieldFlag.HAS_PARENT if pidx is not None else FieldFlag.NONE) | \
                (FieldFlag.HIDDEN if hidden else FieldFlag.NONE)
            full = f"{parent}.{name}" if parent is not None else name
            # A top-level field without an order gets its index, as upstream's AddField.
            index = len(fields)
            fields.append(Field(
                name=name, full_name=full, index=index, kind=int(kind),
                payload_index=0 if empty else payload, flags=flags, tags=tags,
                annotations=dict(annotations), parent=pidx,
                order=order if order is not None else (index if pidx is None else 0)))
            if empty:
                parents[full] = index
            else:
                payload += 1

        if objects:
            add("k8s", Kind.INVALID, None, _DEFAULT_ANN, None, self._k8s_hidden)
            for d in FIELDS[:6]:
                add(d.name, d.kind, d.parent, d.annotations, d.order, d.hidden or self._k8s_hidden,
                    d.tags)
            add("owner", Kind.INVALID, "k8s", _DEFAULT_ANN, None, self._k8s_hidden)
            for d in FIELDS[6:8]:
                add(d.name, d.kind, d.parent, d.annotations, d.order, True, d.tags)
            rt_hidden = not self._k8s_hidden  # upstream hides runtime inside Kubernetes
            add("runtime", Kind.INVALID, None, _DEFAULT_ANN, None, rt_hidden)
            for d in FIELDS[8:]:
                add(d.name, d.kind, d.parent, d.annotations, d.order, d.hidden or rt_hidden)
            if cgroup:
                add(CGROUP_PATH.name, CGROUP_PATH.kind, "runtime", CGROUP_PATH.annotations, None,
                    True)
        elif node_only:
            add("k8s", Kind.INVALID, None, _DEFAULT_ANN, None, False)
            add("node", Kind.STRING, "k8s", _TEMPLATE_NODE, -31, False, _K8S)
        out = replace(schema, fields=tuple(fields), payload_count=payload)
        return _Plan(out, objects, node_only, mntns, netns, pid, ppid, cgroup)

    def output_schema(self, schema: DataSourceSchema) -> DataSourceSchema:
        plan = self._plans.get(schema.name)
        return schema if plan is None else plan.schema

    # -- per batch --------------------------------------------------------------------------

    def _values_for(self, table: LookupTable) -> _Values:
        v = self._values
        if v is not None and v.version == table.version:
            return v
        rows: list[Container | None] = [None, *table.containers]
        columns = tuple([_encode(d, c, self._node) for c in rows] for d in FIELDS)
        selected = np.array([c is not None and self.selector.matches(c) for c in rows],
                            dtype=bool)
        self._values = _Values(table.version, table, columns, selected)
        return self._values

    def process(self, batch: Batch) -> Batch:
        plan = self._plans.get(batch.schema.name)
        if plan is None or not (plan.objects or plan.node_only):
            return batch
        n = len(batch)
        extra: list[Sequence[bytes]] = list(batch.extra)
        if plan.node_only:
            extra.append(CodedColumn.constant(self._node, n))
            return Batch(plan.schema, batch.rows, tuple(extra))
        rows = self._rows(batch, plan)
        vals = self._values_for(self.collection.table())
        extra += [CodedColumn(col, rows) for col in vals.columns]
        if plan.cgroup:
            extra.append(self._cgroups(batch, plan, rows, vals, extra))
        out = Batch(plan.schema, batch.rows, tuple(extra))
        if self.selector.active and n:
            keep = vals.selected[rows]
            if not keep.all():
                out = out.select(keep)
        return out

    def _rows(self, batch: Batch, plan: _Plan) -> npt.NDArray[np.intp]:
        n = len(batch)
        table = self.collection.table()
        if not n:
            return np.zeros(0, dtype=np.intp)
        if plan.mntns is None:
            rows = np.zeros(n, dtype=np.intp)
        else:
            mnt = column(batch, plan.mntns).astype(np.uint64)
            rows = table.rows_by_mntns(mnt)
            miss = (rows == 0) & (mnt != 0)
            # Without a runtime nothing can be learnt: no /proc reads then.
            learn = plan.pid is not None and (self.collection.connected or len(self.collection))
            if learn and miss.any() and self._learn(batch, plan, mnt, miss):
                table = self.collection.table()
                rows = table.rows_by_mntns(mnt)
        if plan.netns is not None and len(table.netns_keys):
            unplaced = rows == 0
            if unplaced.any():
                by_net = table.rows_by_netns(column(batch, plan.netns).astype(np.uint64))
                rows = np.where(unplaced, by_net, rows)
        return rows

    def _learn(self, batch: Batch, plan: _Plan, mnt: npt.NDArray[np.uint64],
               miss: npt.NDArray[np.bool_]) -> bool:
        """Classifies the namespaces the table missed; True when one became a container's."""
        now = time.monotonic()
        if len(self._negative) > 4096:
            self._negative = {k: t for k, t in self._negative.items() if t > now}
        assert plan.pid is not None
        uniq, first = np.unique(mnt[miss], return_index=True)
        pids = column(batch, plan.pid)[np.flatnonzero(miss)[first]]
        learnt = False
        tried = 0
        for m, pid in zip(uniq.tolist(), pids.tolist(), strict=True):
            until = self._negative.get(m)
            if until is not None and until > now:
                continue
            if tried >= CLASSIFY_PER_BATCH:
                break
            tried += 1
            what = self.collection.classify(m, pid)
            if what is Classified.CONTAINER:
                learnt = True
            elif what is Classified.NOT_CONTAINER:
                self._negative[m] = now + NEGATIVE_TTL_S
                if self._kernel is not None:
                    self._kernel.exclude(m)
            else:
                self._negative[m] = now + UNKNOWN_TTL_S
        return learnt

    def _cgroups(self, batch: Batch, plan: _Plan, rows: npt.NDArray[np.intp], vals: _Values,
                 extra: list[Sequence[bytes]]) -> CodedColumn:
        """``operator.enrich.container``: runtime.containerId/runtimeName of processes the
        collection does not place, from /proc, per distinct process (replaced in ``extra``);
        returns the runtime.cgroupPath column."""
        base = len(extra) - len(FIELDS)
        i_id = base + _FIELD_INDEX["containerId"]
        i_rt = base + _FIELD_INDEX["runtimeName"]
        table_paths = [b"", *(c.cgroup_path.encode() for c in vals.table.containers)]
        outside = np.flatnonzero(rows == 0)
        if not len(outside) or plan.pid is None:
            return CodedColumn(table_paths, rows)
        cols = [column(batch, plan.pid).astype(np.uint64)[outside]]
        cols.append(column(batch, plan.mntns).astype(np.uint64)[outside] if plan.mntns
                    is not None else np.zeros(len(outside), np.uint64))
        cols.append(column(batch, plan.ppid).astype(np.uint64)[outside] if plan.ppid
                    is not None else np.zeros(len(outside), np.uint64))
        uniq, inverse = np.unique(np.stack(cols, axis=1), axis=0, return_inverse=True)
        infos = [self._resolver.resolve(int(p), int(m), int(pp)) for p, m, pp in uniq.tolist()]
        # Codes past the table's rows name the resolved processes.
        codes = rows.copy()
        codes[outside] = len(table_paths) + inverse.reshape(-1)
        ids = vals.columns[i_id - base] + [i.container_id for i in infos]
        runtimes = vals.columns[i_rt - base] + [i.runtime for i in infos]
        extra[i_id] = CodedColumn(ids, codes)
        extra[i_rt] = CodedColumn(runtimes, codes)
        return CodedColumn(table_paths + [i.path for i in infos], codes)

    # -- the kernel side and sources that follow containers ------------------------------------

    def attach(self, source: object, log: Callable[[Severity, str], None]) -> None:
        """Hands the run's started source what it needs to follow containers: the in-kernel
        selection map when the source has one, the collection when it follows containers."""
        self._kernel, self._detach = attach_to_source(source, self.collection, self.selector,
                                                      log)

    def close(self) -> None:
        """Stops following containers (the run's source is stopping)."""
        if self._detach is not None:
            self._detach()
            self._detach = None
        self._kernel = None
