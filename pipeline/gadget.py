"""Gadget specs: one folder per gadget under ``pipeline/sources/<name>/``.

A folder holds ``gadget.yaml`` (data sources, struct layouts, params, annotations), the BPF C
in ``program.bpf.c``, a ``README.md``, and optionally ``hooks.py`` when the gadget needs a
source other than the ring-buffer tracer. Nothing outside the folder lists gadgets.

This module reads a folder into a :class:`GadgetSpec`; the catalog that finds the folders and
gives each spec its source lives with the sources (:mod:`pipeline.sources.catalog`), so the
engine knows no source.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import yaml

from pipeline import annotations as ann
from pipeline.derive import (
    DeclaredField,
    DeriveEnv,
    DeriveError,
    DeriveSpec,
    EnumSpec,
    build_plan,
)
from pipeline.layout import LayoutError, StructRegistry
from pipeline.params import ParamSpec
from pipeline.schema import DataSourceSchema, DataSourceType, Field, FieldFlag, Kind
from pipeline.source import Source

SOURCES_DIR = Path(__file__).resolve().parent / "sources"
BPF_INCLUDE_DIR = SOURCES_DIR / "bpf"
IMAGE_REPOSITORY = "ghcr.io/inspektor-gadget/gadget/"
EBPF_PREFIX = "operator.oci.ebpf."
RUNTIME_PREFIX = "operator.bcc."


class GadgetError(ValueError):
    """A gadget cannot be found or its folder is inconsistent."""


class UnknownGadget(GadgetError):
    def __init__(self, image: str, known: Sequence[str]) -> None:
        super().__init__(f"unknown gadget {image!r}; available: {', '.join(known)}")
        self.image = image


COMMON_FILTER_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("pid", EBPF_PREFIX, "Show only events of this process id", "", "uint32",
              tags=("group:Data Filtering",), extra={"cflag": "GADGET_FILTER_PID"}),
    ParamSpec("tid", EBPF_PREFIX, "Show only events of this thread id", "", "uint32",
              tags=("group:Data Filtering",), extra={"cflag": "GADGET_FILTER_TID"}),
    ParamSpec("uid", EBPF_PREFIX, "Show only events of this user id", "", "uint32",
              tags=("group:Data Filtering",), extra={"cflag": "GADGET_FILTER_UID"}),
    ParamSpec("gid", EBPF_PREFIX, "Show only events of this group id", "", "uint32",
              tags=("group:Data Filtering",), extra={"cflag": "GADGET_FILTER_GID"}),
    ParamSpec("comm", EBPF_PREFIX, "Show only events of processes with this command name", "",
              "string", tags=("group:Data Filtering",), extra={"cflag": "GADGET_FILTER_COMM"}),
    ParamSpec("mntns", EBPF_PREFIX, "Show only events of this mount namespace (container)", "",
              "uint64", tags=("group:Data Filtering",), extra={"cflag": "GADGET_FILTER_MNTNS"}),
)

DRAIN_INTERVAL = "10ms"
"""The timed drain of the ring (a ring filling up to ``wakeup-fill`` wakes the reader sooner).
Every drain's batch costs the pipeline ~0.45 ms whatever its size (a derivation and a framing
block per field), so at moderate rates the interval sets the daemon's CPU: measured with a Go
client at 100k (200k) opens/s paced, daemon CPU per record 4.3 (2.4) µs at 2 ms, 2.6 (1.65) at
5 ms, 1.8 (1.25) at 10 ms; a record then waits at most 10 ms in the ring."""

DRAIN_MIN_BYTES = 65536
"""Pending ring bytes that make a batch worth its fixed cost at once (~160 trace_open records):
a tick with less pending lets the records wait, up to ``DRAIN_MAX_WAIT``
(pipeline/sources/drain_pacer.py says why)."""

DRAIN_MAX_WAIT = "50ms"
"""The longest a record of a small backlog waits in the ring before a tick drains it."""

RUNTIME_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("ringbuf-size", RUNTIME_PREFIX, "Bytes of each BPF ring buffer (power of two "
              "pages)", str(8 << 20), "uint32", tags=("advanced", "group:eBPF")),
    ParamSpec("drain-interval", RUNTIME_PREFIX, "How often the ring buffer is drained (and "
              "sooner when the ring fills to wakeup-fill)", DRAIN_INTERVAL, "duration",
              tags=("advanced", "group:eBPF")),
    ParamSpec("drain-min-bytes", RUNTIME_PREFIX, "A tick drains at once when the rings hold "
              "this many bytes; a smaller backlog waits for more, up to drain-max-wait",
              str(DRAIN_MIN_BYTES), "uint32", tags=("advanced", "group:eBPF")),
    ParamSpec("drain-max-wait", RUNTIME_PREFIX, "The longest a record waits in the ring when "
              "fewer than drain-min-bytes are pending (at most drain-interval: every tick "
              "drains)", DRAIN_MAX_WAIT, "duration", tags=("advanced", "group:eBPF")),
    ParamSpec("wakeup-fill", RUNTIME_PREFIX, "Ring fill level (percent) at which the BPF side "
              "wakes the reader early", "25", "uint8", tags=("advanced", "group:eBPF")),
    ParamSpec("shed", RUNTIME_PREFIX, "Load shedding: while a subscriber's queue is above "
              "shed-high, keep only 1 record in N in the kernel (N doubles, up to shed-max; "
              "halves below shed-low); shed records are counted (stage kernel, reason shed)",
              "false", "bool", tags=("advanced", "group:eBPF")),
    ParamSpec("shed-high", RUNTIME_PREFIX, "Queue fill (percent of capacity) above which "
              "shedding samples harder", "75", "uint8", tags=("advanced", "group:eBPF")),
    ParamSpec("shed-low", RUNTIME_PREFIX, "Queue fill (percent of capacity) below which "
              "shedding relaxes", "25", "uint8", tags=("advanced", "group:eBPF")),
    ParamSpec("shed-max", RUNTIME_PREFIX, "Largest N of load shedding (keep 1 record in N)",
              "1024", "uint32", tags=("advanced", "group:eBPF")),
)


class SourceFactory(Protocol):
    """Makes the source of one run from the gadget and the run's resolved params."""

    def __call__(self, spec: GadgetSpec, values: Mapping[str, Any]) -> Source: ...


@dataclass(frozen=True)
class GadgetSpec:
    """Everything known about a gadget before it runs."""

    name: str
    description: str
    folder: Path
    metadata: bytes
    datasources: tuple[DataSourceSchema, ...]
    params: tuple[ParamSpec, ...]
    category: str = ""
    legacy_name: str = ""
    structs: StructRegistry = field(default_factory=StructRegistry, compare=False)
    struct_names: Mapping[str, str] = field(default_factory=dict)
    derive: DeriveSpec = field(default_factory=DeriveSpec, compare=False)
    make_source: SourceFactory | None = field(default=None, compare=False)
    """What makes this gadget's source; the catalog sets it."""

    @property
    def program(self) -> Path:
        return self.folder / "program.bpf.c"

    @property
    def readme(self) -> str:
        p = self.folder / "README.md"
        return p.read_text() if p.exists() else ""

    def datasource(self, name: str) -> DataSourceSchema:
        for ds in self.datasources:
            if ds.name == name:
                return ds
        raise GadgetError(f"gadget {self.name!r} has no data source {name!r}")

    def source_factory(self) -> SourceFactory:
        """What makes this gadget's source (raises GadgetError for a spec no catalog made)."""
        if self.make_source is None:
            raise GadgetError(f"gadget {self.name!r} has no source: load it through a Catalog")
        return self.make_source


def _common_structs() -> StructRegistry:
    data = yaml.safe_load((BPF_INCLUDE_DIR / "common.yaml").read_text())
    return StructRegistry(data.get("typedefs", {}), data.get("structs", {}))


def _param_specs(raw: Mapping[str, Any], folder: str) -> list[ParamSpec]:
    out = []
    for prefix_name, params in (raw or {}).items():
        prefix = {"ebpf": EBPF_PREFIX}.get(prefix_name, prefix_name)
        for key, p in (params or {}).items():
            p = p or {}
            known = {"description", "default", "typeHint", "alias", "title", "possibleValues",
                     "mandatory", "tags", "alternativeKey", "cflag", "oldKeys"}
            unknown = set(p) - known
            if unknown:
                raise GadgetError(f"{folder}/gadget.yaml: param {key!r} has unknown keys "
                                  f"{sorted(unknown)}")
            out.append(ParamSpec(
                key=key, prefix=prefix, description=p.get("description", ""),
                default=str(p.get("default", "")).lower() if isinstance(p.get("default"), bool)
                else str(p.get("default", "")),
                type_hint=p.get("typeHint", "string"), alias=p.get("alias", ""),
                title=p.get("title", ""), possible_values=tuple(p.get("possibleValues", ())),
                mandatory=bool(p.get("mandatory", False)), tags=tuple(p.get("tags", ())),
                alternative_key=p.get("alternativeKey", ""),
                extra={"cflag": p["cflag"]} if "cflag" in p else {},
                # Keys the param had before (same prefix), still accepted; never announced.
                old_keys=tuple(prefix + str(k) for k in p.get("oldKeys", ())),
            ))
    return out


def _annotation_text(value: Any) -> str:
    """Annotation values are strings on the wire; a YAML ``true`` must read "true", as
    upstream writes it (str() would give "True", which nothing recognises)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _placed(path: Path, ds_name: str, fields: list[Field], added: list[Field],
            after: str | None) -> list[Field]:
    """``added`` (a payload's fields, numbered after ``fields``) placed after the field
    named ``after`` and its children, where upstream's struct has them (the field order
    is the default column order), or at the end; indexes and parents renumbered."""
    if after is None:
        return [*fields, *added]
    at = next((i for i, f in enumerate(fields) if f.full_name == after), None)
    if at is None:
        raise GadgetError(f"{path}: data source {ds_name!r}: payload placed after "
                          f"{after!r}, which is not a field")
    end = at + 1
    while end < len(fields) and fields[end].full_name.startswith(after + "."):
        end += 1
    order = [*fields[:end], *added, *fields[end:]]
    renumber = {f.index: i for i, f in enumerate(order)}
    return [replace(f, index=i, parent=None if f.parent is None else renumber[f.parent])
            for i, f in enumerate(order)]


def _field_config(raw: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """gadget.yaml's ``fields:`` of a data source: full name -> annotations as strings."""
    return {name: {k: _annotation_text(v) for k, v in ((conf or {}).get("annotations")
                                                       or {}).items()}
            for name, conf in (raw or {}).items()}


def _apply_annotations(fields: list[Field], config: Mapping[str, Mapping[str, str]],
                       ) -> list[Field]:
    """The gadget's settings over the layout's annotations; Hidden follows the result (as
    upstream sets it after applying a data source's field configuration)."""
    out = []
    for f in fields:
        a = ann.configured(f.annotations, config.get(f.full_name, {}))
        flags = f.flags | FieldFlag.HIDDEN if ann.hidden(a) else f.flags & ~FieldFlag.HIDDEN
        out.append(replace(f, annotations=a, flags=flags))
    return out


_KINDS = {"string": Kind.STRING, "bool": Kind.BOOL, "int8": Kind.INT8, "int16": Kind.INT16,
          "int32": Kind.INT32, "int64": Kind.INT64, "uint8": Kind.UINT8, "uint16": Kind.UINT16,
          "uint32": Kind.UINT32, "uint64": Kind.UINT64, "float32": Kind.FLOAT32,
          "float64": Kind.FLOAT64, "bytes": Kind.BYTES}


def _enums(path: Path, raw: Mapping[str, Any], structs: StructRegistry) -> dict[str, EnumSpec]:
    out = {}
    for name, conf in (raw or {}).items():
        conf = conf or {}
        values = conf.get("values") or []
        pairs = dict(values) if isinstance(values, Mapping) else \
            {n: i for i, n in enumerate(values)}
        try:
            structs.add_enum(name, str(conf.get("type", "u32")))
        except ValueError as e:
            raise GadgetError(f"{path}: {e}") from e
        out[name] = EnumSpec(name, {int(v): str(n) for n, v in pairs.items()})
    return out


HooksLoader = Callable[[], Any]
"""Imports a gadget folder's ``hooks.py`` and returns the module (the catalog's, since the
folders are the sources'; :mod:`pipeline.sources.catalog`), None when the folder has none."""


def _declared(path: Path, ds_name: str, raw: Mapping[str, Any], load_hooks: HooksLoader | None,
              ) -> list[DeclaredField]:
    """A data source's ``derived:`` entries, bound to the functions of the gadget's hooks.py."""
    if not raw:
        return []
    hooks = load_hooks() if load_hooks is not None else None
    if hooks is None:
        raise GadgetError(f"{path}: data source {ds_name!r} declares derived fields but the "
                          "gadget has no hooks.py")
    out = []
    for name, conf in raw.items():
        conf = conf or {}
        fn = getattr(hooks, str(conf.get("from", "")), None)
        if not callable(fn):
            raise GadgetError(f"{path}: derived field {ds_name}.{name}: hooks.py has no "
                              f"function {conf.get('from')!r}")
        kind = _KINDS.get(str(conf.get("kind", "string")))
        if kind is None:
            raise GadgetError(f"{path}: derived field {ds_name}.{name}: unknown kind "
                              f"{conf.get('kind')!r} (one of {', '.join(_KINDS)})")
        order = conf.get("order")
        out.append(DeclaredField(name, kind, fn, None if order is None else int(order),
                                 bool(conf.get("hidden", False))))
    return out


def _key_value_fields(structs: StructRegistry, key: str, value: str) -> tuple[list[Field], int]:
    """Fields of a key struct (payload 0, tagged ``role:key``) then of a value struct
    (payload 1), numbered as one list; the size is the key's (payload 0)."""
    key_fields, key_size = structs.fields(key, 0)
    key_fields = [replace(f, tags=(*f.tags, "role:key")) for f in key_fields]
    value_fields, _ = structs.fields(value, 1)
    shift = len(key_fields)
    value_fields = [replace(f, index=f.index + shift,
                            parent=None if f.parent is None else f.parent + shift)
                    for f in value_fields]
    return [*key_fields, *value_fields], key_size


def load_spec(folder: Path, load_hooks: HooksLoader | None = None) -> GadgetSpec:
    """Reads one gadget folder; raises GadgetError naming the file and the problem.

    Args:
        folder: the gadget's folder.
        load_hooks: gives the folder's ``hooks.py`` module, whose functions compute the
            data sources' ``derived:`` fields.
    """
    path = folder / "gadget.yaml"
    text = path.read_bytes()
    try:
        meta = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise GadgetError(f"{path}: {e}") from e
    structs = _common_structs()
    enums = _enums(path, meta.get("enums") or {}, structs)
    for name, members in (meta.get("structs") or {}).items():
        structs.add_struct(name, members)
    datasources = []
    struct_names = {}
    configs: dict[str, dict[str, dict[str, str]]] = {}
    declared: dict[str, list[DeclaredField]] = {}
    for ds_name, ds in (meta.get("datasources") or {}).items():
        struct = ds.get("struct")
        if not struct:
            raise GadgetError(f"{path}: data source {ds_name!r} names no struct")
        payloads = 1
        if ds.get("key"):
            # Map iterators (top gadgets): payload 0 = key struct, payload 1 = value struct.
            fields, size = _key_value_fields(structs, ds["key"], struct)
            payloads = 2
        else:
            fields, size = structs.fields(struct)
        for entry in ds.get("payloads") or ():
            # Further payloads the source fills (upstream: fields in the struct that this
            # build keeps out of payload 0, the hot path's record), after the struct's.
            line, after = (entry.get("member"), entry.get("after")) \
                if isinstance(entry, Mapping) else (entry, None)
            try:
                added = structs.payload_fields(str(line), payloads, len(fields))
            except LayoutError as e:
                raise GadgetError(f"{path}: data source {ds_name!r} payload {line!r}: {e}") \
                    from e
            fields = _placed(path, ds_name, fields, added, after)
            payloads += 1
        configs[ds_name] = _field_config(ds.get("fields") or {})
        fields = _apply_annotations(fields, configs[ds_name])
        declared[ds_name] = _declared(path, ds_name, ds.get("derived") or {}, load_hooks)
        ann = {k: str(v) for k, v in (ds.get("annotations") or {}).items()}
        ds_type = DataSourceType.ARRAY if ds.get("type") == "array" else DataSourceType.SINGLE
        datasources.append(DataSourceSchema(
            name=ds_name, type=ds_type, fields=tuple(fields), record_size=size,
            payload_count=payloads, tags=tuple(ds.get("tags", ())), annotations=ann))
        struct_names[ds_name] = struct
    spec_derive = DeriveSpec(enums=enums, declared=declared, config=configs)
    for schema in datasources:
        try:
            build_plan(schema, spec_derive, DeriveEnv())  # a gadget's mistakes fail at load
        except DeriveError as e:
            raise GadgetError(f"{path}: {e}") from e
    params = _param_specs(meta.get("params") or {}, folder.name)
    if meta.get("filters", True):
        params = [*COMMON_FILTER_PARAMS, *params]
    params += RUNTIME_PARAMS
    return GadgetSpec(
        name=meta.get("name", folder.name), description=meta.get("description", ""),
        folder=folder, metadata=text, datasources=tuple(datasources), params=tuple(params),
        category=meta.get("category", ""), legacy_name=meta.get("legacyName", ""),
        structs=structs, struct_names=struct_names,
        derive=spec_derive,
    )
