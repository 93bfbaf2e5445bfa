"""Which derived fields a data source gets, with upstream's names, kinds, flags, annotations and
order, and the derivation that fills each (see the package docstring for the rules)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline import annotations as ann
from pipeline.accessors import column
from pipeline.batch import Batch, Coded, Derivation, Derived, Fixed
from pipeline.derive import formatters as fmt
from pipeline.derive import net
from pipeline.derive.tables import ERRNO_ONE_OF, SIGNAL_ONE_OF
from pipeline.derive.users import UserNames
from pipeline.schema import KIND_WIDTH, DataSourceSchema, Field, FieldFlag, Kind

ENUM_TARGET = "ebpf.formatter.enum"
ENUM_SEPARATOR = "ebpf.formatter.bitfield.separator"
UID_TARGET = "uidgidresolver.target"


class DeriveError(ValueError):
    """A derived field declaration that cannot work; the message names the field."""


@dataclass(frozen=True, slots=True)
class EnumSpec:
    """A C enum: value -> member name in declaration order; a name ending in ``_set`` makes it
    a bit set (every member whose bits are set is shown)."""

    name: str
    values: Mapping[int, str]

    @property
    def bitfield(self) -> bool:
        return self.name.endswith("_set")


@dataclass(frozen=True, slots=True)
class DeclaredField:
    """A derived field a gadget declares (gadget.yaml ``derived:``), filled by its own code.

    Args:
        full_name: e.g. ``qr`` or ``proc.something``; the parent must exist.
        kind: its kind; numbers must be returned as entries of exactly their width.
        derive: ``(raw batch, memo) -> one entry per record`` (a list or :class:`Coded`).
        order: its ``order``; None or 0: its index, as upstream gives fields operators add.
        hidden: hidden by default (before the gadget's ``columns.hidden`` setting).
    """

    full_name: str
    kind: Kind
    derive: Derivation
    order: int | None = None
    hidden: bool = False


@dataclass(frozen=True)
class DeriveSpec:
    """A gadget's derivation settings, read once from its folder.

    Args:
        enums: the C enums its structs use, by name.
        declared: per data source, the fields its own code derives.
        config: per data source, gadget.yaml's annotations per field full name (they apply to
            derived fields as to any other).
    """

    enums: Mapping[str, EnumSpec] = field(default_factory=dict)
    declared: Mapping[str, Sequence[DeclaredField]] = field(default_factory=dict)
    config: Mapping[str, Mapping[str, Mapping[str, str]]] = field(default_factory=dict)


class DeriveEnv:
    """What derivations of one run share: the user and group names (re-read when the files
    change)."""

    def __init__(self, users: UserNames | None = None) -> None:
        self.users = users or UserNames()


@dataclass(frozen=True)
class DerivePlan:
    """A data source as announced (raw fields plus derived ones) and, in payload order from
    ``first_payload``, the derivation of each derived payload."""

    schema: DataSourceSchema
    columns: tuple[tuple[str, Derivation], ...]
    first_payload: int


# -- reading raw values -----------------------------------------------------------------------

def block(batch: Batch, f: Field) -> npt.NDArray[np.uint8]:
    """A field's bytes in every record as an (n, size) block."""
    if f.payload_index == 0:
        return batch.rows[:, f.offs: f.offs + f.size]
    entries = batch.extra[f.payload_index - 1]
    data = b"".join(b[f.offs: f.offs + f.size] for b in entries)
    return np.frombuffer(data, dtype=np.uint8).reshape(len(entries), f.size)


def _num(batch: Batch, f: Field) -> npt.NDArray[Any]:
    return column(batch, f)


def _unique(f: Field, fn: Callable[[int], bytes]) -> Derivation:
    def derive(batch: Batch, memo: dict[str, Any]) -> Derived:
        return fmt.by_unique(_num(batch, f), fn)
    return derive


# -- the builder ------------------------------------------------------------------------------

class _Builder:
    """Upstream's field operations (AddField, SetHidden, RemoveReference, ...) over a field
    list, with payloads assigned to each valued field it adds."""

    def __init__(self, raw: DataSourceSchema, config: Mapping[str, Mapping[str, str]]) -> None:
        self.raw = raw
        self.fields: list[Field] = list(raw.fields)
        self.config = config
        self.payload = raw.payload_count
        self.columns: list[tuple[str, Derivation]] = []

    def get(self, full_name: str) -> int | None:
        for i, f in enumerate(self.fields):
            if f.full_name == full_name and not f.flags & FieldFlag.UNREFERENCED:
                return i
        return None

    def with_tag(self, tag: str) -> list[int]:
        return [i for i, f in enumerate(self.fields) if tag in f.tags]

    def children(self, i: int) -> list[int]:
        return [j for j, f in enumerate(self.fields) if f.parent == i and
                f.flags & FieldFlag.HAS_PARENT]

    def add(self, name: str, kind: Kind, parent: int | None, derive: Derivation, *,
            annotations: Mapping[str, str] | None = None, flags: FieldFlag = FieldFlag.NONE,
            order: int = 0, tags: tuple[str, ...] = (), sub: bool = False) -> int:
        """upstream's AddField (``sub``: AddSubField): the default annotations, or exactly
        ``annotations`` when given (WithAnnotations replaces them); a ``template`` among them
        expanded, then the gadget's settings; Hidden when ``columns.hidden`` is "true". Order
        0 becomes the field's index for AddField (not for AddSubField), as upstream does."""
        full = name if parent is None else f"{self.fields[parent].full_name}.{name}"
        if self.get(full) is not None:
            raise DeriveError(f"data source {self.raw.name!r}: derived field {full!r} "
                              "already exists")
        a = dict(ann.DEFAULT_ANNOTATIONS if annotations is None else annotations)
        if ann.TEMPLATE in a:
            ann.expand_template(a[ann.TEMPLATE], a)
        a = ann.configured(a, self.config.get(full, {}))
        if ann.hidden(a):
            flags |= FieldFlag.HIDDEN
        if parent is not None:
            flags |= FieldFlag.HAS_PARENT
        index = len(self.fields)
        self.fields.append(Field(
            name=name, full_name=full, index=index, kind=int(kind), payload_index=self.payload,
            flags=flags, tags=tags, annotations=a, parent=parent,
            order=index if order == 0 and not sub else order))
        self.payload += 1
        self.columns.append((full, derive))
        return index

    def set_hidden(self, i: int, hidden: bool, recurse: bool = False) -> None:
        f = self.fields[i]
        flags = f.flags | FieldFlag.HIDDEN if hidden else f.flags & ~FieldFlag.HIDDEN
        self.fields[i] = replace(f, flags=flags)
        if recurse:
            for c in self.children(i):
                self.set_hidden(c, hidden, True)

    def set_visibility(self, i: int, default: bool) -> None:
        """upstream's SetFieldVisibility(default, in): the field and its children hidden, then
        the field itself as its ``columns.hidden`` says, else hidden iff ``default``."""
        self.set_hidden(i, True, True)
        a = self.fields[i].annotations
        self.set_hidden(i, a[ann.COLUMNS_HIDDEN] == "true" if ann.COLUMNS_HIDDEN in a
                        else default)

    def remove_reference(self, i: int) -> None:
        f = self.fields[i]
        self.fields[i] = replace(f, flags=f.flags | FieldFlag.UNREFERENCED)
        for c in self.children(i):
            self.remove_reference(c)

    def annotate(self, i: int, key: str, value: str) -> None:
        f = self.fields[i]
        self.fields[i] = replace(f, annotations={**f.annotations, key: value})

    def target(self, i: int, annotation: str, fallback: str = "") -> str:
        """The derived field's name: the annotation, else the name without ``_raw``."""
        f = self.fields[i]
        if annotation in f.annotations:
            return f.annotations[annotation]
        if f.name.endswith("_raw"):
            return f.name[: -len("_raw")]
        return fallback

    def plan(self) -> DerivePlan:
        schema = replace(self.raw, fields=tuple(self.fields), payload_count=self.payload)
        return DerivePlan(schema, tuple(self.columns), self.raw.payload_count)


def _parent_of(b: _Builder, i: int) -> int | None:
    f = b.fields[i]
    return f.parent if f.flags & FieldFlag.HAS_PARENT else None


# -- the rules --------------------------------------------------------------------------------

def _enums(b: _Builder, enums: Mapping[str, EnumSpec]) -> None:
    """upstream's ebpf operator: ``<name>`` (String) beside each enum member ``<name>_raw``,
    which is hidden; ``UNKNOWN`` for a value the enum does not name."""
    for i, f in list(enumerate(b.fields)):
        spec = next((enums[t[5:]] for t in f.tags if t.startswith("type:") and t[5:] in enums),
                    None)
        if spec is None:
            continue
        b.set_hidden(i, True)
        name = b.target(i, ENUM_TARGET)
        if not name:
            raise DeriveError(f"data source {b.raw.name!r}: enum field {f.full_name!r} needs a "
                              f"name ending in _raw or an {ENUM_TARGET} annotation")
        sep = f.annotations.get(ENUM_SEPARATOR, "|")
        b.add(name, Kind.STRING, _parent_of(b, i),
              _unique(b.fields[i], fmt.enum_names(spec.values, spec.bitfield, sep)))


def _declared(b: _Builder, declared: Iterable[DeclaredField]) -> None:
    for d in declared:
        parent_name, _, name = d.full_name.rpartition(".")
        parent = b.get(parent_name) if parent_name else None
        if parent_name and parent is None:
            raise DeriveError(f"data source {b.raw.name!r}: derived field {d.full_name!r} has "
                              f"no parent field {parent_name!r}")
        b.add(name, d.kind, parent, _checked(d), order=d.order or 0,
              flags=FieldFlag.HIDDEN if d.hidden else FieldFlag.NONE)


def _checked(d: DeclaredField) -> Derivation:
    """The gadget's derivation, with numeric entries checked to be exactly the kind's width
    (docs/gadget-service.md §4.3: a client reads a wrong-sized entry as an error)."""
    width = KIND_WIDTH.get(d.kind)
    if width is None:
        return d.derive

    def derive(batch: Batch, memo: dict[str, Any]) -> Derived:
        out = d.derive(batch, memo)
        if isinstance(out, Fixed):
            bad = {out.matrix.shape[1]} - {width}
        else:
            bad = set(map(len, out.table if isinstance(out, Coded) else out)) - {width}
        if bad:
            raise DeriveError(f"derived field {d.full_name!r}: entries of {sorted(bad)} bytes, "
                              f"kind {d.kind.name} needs {width}")
        return out
    return derive


def _simple(b: _Builder, type_name: str, target_ann: str, kind: Kind | None,
            fn: Callable[[int], bytes], annotations: Mapping[str, str] | None) -> None:
    """One of upstream's formatters that turn a number into text: ``<name>`` beside
    ``<name>_raw`` (or the target annotation), same parent and order; the raw field hidden
    unless its own ``columns.hidden`` says otherwise."""
    for i in b.with_tag("type:" + type_name):
        f = b.fields[i]
        if kind is not None and f.base_kind is not kind:
            continue  # upstream skips (or leaves empty) a field of another width
        name = b.target(i, target_ann)
        if not name:
            continue
        b.add(name, Kind.STRING, _parent_of(b, i), _unique(f, fn), annotations=annotations,
              order=f.order)
        b.set_visibility(i, True)


def _timestamps(b: _Builder) -> None:
    for i in b.with_tag("type:gadget_timestamp"):
        f = b.fields[i]
        name = b.target(i, "formatters.timestamp.target")
        if not name or f.base_kind not in (Kind.UINT64, Kind.INT64):
            continue

        def derive(batch: Batch, memo: dict[str, Any], f: Field = f) -> Derived:
            return fmt.timestamps(_num(batch, f))
        b.add(name, Kind.STRING, _parent_of(b, i), derive,
              annotations={ann.TEMPLATE: "timestamp"}, order=f.order)
        b.set_visibility(i, True)


def _endpoint_parts(b: _Builder, i: int) -> tuple[Field, Field] | None:
    ips = [c for c in b.children(i) if "type:gadget_ip_addr_t" in b.fields[c].tags]
    versions = [c for c in b.children(i) if "name:version" in b.fields[c].tags]
    if len(ips) != 1 or len(versions) != 1:
        return None
    return b.fields[ips[0]], b.fields[versions[0]]


def _address(b: _Builder, i: int) -> tuple[Field, Field, str] | None:
    """upstream's handleL3Endpoint: ``addr`` (String) under the endpoint, the raw union
    unreferenced, the endpoint shown as ``addr`` in columns and visible, its members hidden."""
    parts = _endpoint_parts(b, i)
    if parts is None:
        return None
    ip, version = parts
    b.remove_reference(ip.index)
    name = ip.name.removesuffix("_raw")
    key = f"{b.fields[i].full_name}.{name}"

    def derive(batch: Batch, memo: dict[str, Any]) -> Derived:
        hit = memo.get(key)
        if hit is None:
            hit = memo[key] = net.addresses(_num(batch, version), block(batch, ip))
        return hit
    addr = b.add(name, Kind.STRING, i, derive, sub=True)
    b.annotate(i, ann.COLUMNS_REPLACE, b.fields[addr].full_name)
    b.set_visibility(i, False)
    return ip, version, key


def _l3endpoints(b: _Builder) -> None:
    for i in b.with_tag("type:gadget_l3endpoint_t"):
        _address(b, i)


def _l4endpoints(b: _Builder) -> None:
    for i in b.with_tag("type:gadget_l4endpoint_t"):
        ports = [c for c in b.children(i) if "name:port" in b.fields[c].tags]
        protos = [c for c in b.children(i) if "name:proto_raw" in b.fields[c].tags]
        if len(ports) != 1 or len(protos) > 1 or _endpoint_parts(b, i) is None:
            continue
        found = _address(b, i)
        assert found is not None
        ip, version, key = found
        port = b.fields[ports[0]]

        def addr_of(batch: Batch, memo: dict[str, Any], ip: Field = ip, version: Field = version,
                    key: str = key) -> Coded:
            hit = memo.get(key)
            if hit is None:
                hit = memo[key] = net.addresses(_num(batch, version), block(batch, ip))
            return hit

        if protos:
            proto = b.fields[protos[0]]

            def proto_text(batch: Batch, memo: dict[str, Any], proto: Field = proto,
                           version: Field = version) -> Derived:
                return net.protocols(_num(batch, proto), _num(batch, version))
            b.add(proto.name.removesuffix("_raw"), Kind.STRING, i, proto_text,
                  flags=FieldFlag.HIDDEN, sub=True)

        def endpoint(batch: Batch, memo: dict[str, Any], port: Field = port,
                     version: Field = version, addr_of: Callable[..., Coded] = addr_of,
                     ) -> Derived:
            return net.endpoints(addr_of(batch, memo), _num(batch, version), _num(batch, port))
        ep = b.add("endpoint", Kind.STRING, i, endpoint, annotations={ann.JSON_SKIP: "true"},
                   tags=("endpoint",), flags=FieldFlag.HIDDEN, sub=True)
        b.annotate(i, ann.COLUMNS_REPLACE, b.fields[ep].full_name)


def _ids(b: _Builder, type_name: str, fallback: str, env: DeriveEnv) -> None:
    """upstream's UidGidResolver: ``user``/``group`` (or the ``uidgidresolver.target``
    annotation, or ``<name>`` beside ``<name>_raw``) beside each uid/gid; both hidden."""
    names = env.users.users if type_name == "gadget_uid" else env.users.groups
    for i in b.with_tag("type:" + type_name):
        f = b.fields[i]
        name = b.target(i, UID_TARGET, fallback)

        def derive(batch: Batch, memo: dict[str, Any], f: Field = f) -> Derived:
            col = _num(batch, f)
            if len(col) == 0:
                return Coded([], np.zeros(0, dtype=np.intp))
            ids, codes = fmt.distinct(col)
            return Coded(names.names(ids), codes)
        added = b.add(name, Kind.STRING, _parent_of(b, i), derive)
        b.set_hidden(added, True)
        b.set_hidden(i, True)


def _empty(batch: Batch, memo: dict[str, Any]) -> Derived:
    return Coded([b""], np.zeros(len(batch), dtype=np.intp))


def _user_stacks(b: _Builder) -> None:
    """upstream's ustack operator: ``addresses``, ``buildid`` and ``symbols`` (String, hidden)
    under each ``struct gadget_user_stack``, empty (what the operator sends when no stack was
    collected: the stack's inode is 0), unless the gadget declares its own."""
    for i in b.with_tag("type:gadget_user_stack"):
        for name in ("addresses", "buildid", "symbols"):
            if b.get(f"{b.fields[i].full_name}.{name}") is not None:
                continue  # the gadget derives its own (it collects user stacks)
            b.add(name, Kind.STRING, i, _empty, annotations={}, flags=FieldFlag.HIDDEN,
                  tags=(f"name:{name}", "operator:ustack"), sub=True)


def build_plan(raw: DataSourceSchema, spec: DeriveSpec, env: DeriveEnv) -> DerivePlan:
    """The derived fields of ``raw``, in the order upstream's operators add them: the ebpf
    operator's enums, the gadget's own (as its WASM module would), the formatters (signal,
    errno, syscall, timestamp, bytes, duration, l3 and l4 endpoints, file mode, file flags),
    then user and group names, and the ustack operator's fields."""
    b = _Builder(raw, spec.config.get(raw.name, {}))
    _enums(b, spec.enums)
    _declared(b, spec.declared.get(raw.name, ()))
    _simple(b, "gadget_signal", "formatters.signal.target", None, fmt.signal_name,
            {ann.VALUE_ONE_OF: SIGNAL_ONE_OF})
    _simple(b, "gadget_errno", "formatters.errno.target", None, fmt.errno_name,
            {ann.TEMPLATE: "errorString", ann.VALUE_ONE_OF: ERRNO_ONE_OF})
    _simple(b, "gadget_syscall", "formatters.syscall.target", Kind.UINT64, fmt.syscall_name,
            None)
    _timestamps(b)
    _simple(b, "gadget_bytes", "formatters.bytes.target", None, fmt.human_bytes,
            {ann.TEMPLATE: "bytes"})
    _simple(b, "gadget_duration", "formatters.duration.target", None, fmt.duration_text,
            {ann.TEMPLATE: "duration"})
    _l3endpoints(b)
    _l4endpoints(b)
    _simple(b, "gadget_file_mode", "formatters.file_mode.target", Kind.UINT32, fmt.file_mode,
            None)
    _simple(b, "gadget_file_flags", "formatters.file_flags.target", Kind.UINT32,
            fmt.open_flags, None)
    _ids(b, "gadget_uid", "user", env)
    _ids(b, "gadget_gid", "group", env)
    _user_stacks(b)
    return b.plan()
