"""Validated documents -> declarations: each instance's params as the request will carry them,
and where in the file each param was written.

An instance section's ``params`` (flat or nested), ``filter``, ``fields``, ``sinks`` and the
sinks' own sections (``metrics``) all become flat prefixed params; a param set twice (``filter``
and ``params: {operator.filter.filter: …}``) is a problem at the second place. Sink settings are
named as the sink types declare them (:meth:`pipeline.sinks.base.SinkTypeBase.settings`); this
module knows no sink by name.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from config.results import DeclaredInstance, Issue, KeyPath, format_path, suggest
from config.schema import DaemonSection, InstanceSection, InstanceSpecManifest
from config.yaml_doc import Document
from pipeline._gen import gadget_service_pb2 as pb
from pipeline.operators import fields as fields_op
from pipeline.operators import filter as filter_op
from pipeline.params import ParamSpec
from pipeline.sinks.base import KEY_ENABLE, list_separator

__all__ = ["Declaration", "LoadState", "SinkSettings", "from_manifest", "from_section",
           "request_of", "setting"]

SinkSettings = Mapping[str, Mapping[str, ParamSpec]]
"""Sink type -> its params by setting name."""


@dataclass
class Declaration:
    """An instance between validation and its request.

    Args:
        origin: where each param was written (its key path in ``doc``).
        upstream: declared by an upstream instance manifest.
    """

    doc: Document
    base: KeyPath
    name: str
    gadget: str
    gadget_path: KeyPath
    id: str | None
    tags: list[str]
    nodes: list[str]
    timeout_s: float
    event_buffer_length: int
    params: dict[str, str]
    origin: dict[str, KeyPath]
    upstream: bool


@dataclass
class LoadState:
    """Everything one load has found so far: problems, warnings, documents, declarations."""

    issues: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    docs: list[Document] = field(default_factory=list)
    decls: list[Declaration] = field(default_factory=list)
    daemon: DaemonSection | None = None
    daemon_doc: Document | None = None
    sink_settings: SinkSettings | None = None
    sections: Mapping[str, str] = field(default_factory=dict)
    """Instance-level YAML keys that stand for a sink (``metrics`` -> ``prometheus``)."""
    secret_keys: frozenset[str] = frozenset()

    def report(self, doc: Document, path: KeyPath, message: str, key: bool = False) -> None:
        line, col = doc.where(path, key)
        self.issues.append(Issue(doc.file, line, col, format_path(path), message))

    def warn(self, doc: Document, path: KeyPath, message: str, key: bool = False) -> None:
        line, col = doc.where(path, key)
        self.warnings.append(Issue(doc.file, line, col, format_path(path), message))


def setting(settings: Mapping[str, ParamSpec], name: str) -> ParamSpec | None:
    """A sink's param named by its setting (``topic``) or its key (``kafka-topic``)."""
    spec = settings.get(name)
    if spec is None:
        spec = next((p for p in settings.values() if p.key == name), None)
    return spec


def _flatten(value: Mapping[str, Any], path: KeyPath,
             prefix: str = "") -> Iterator[tuple[str, Any, KeyPath]]:
    """Nested param mappings -> (dotted key, value, path of the value)."""
    for k, v in value.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            yield from _flatten(v, (*path, k), key)
        else:
            yield key, v, (*path, k)


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def from_section(state: LoadState, doc: Document, base: KeyPath, inst: InstanceSection,
                 sinks: SinkSettings) -> Declaration:
    """The declaration of a gadgetpipe instance section; problems go to ``state``."""
    params: dict[str, str] = {}
    origin: dict[str, KeyPath] = {}

    def put(key: str, text: str, path: KeyPath) -> None:
        if key in params:
            state.report(doc, path, f"sets {key!r} again (first set at "
                         f"{format_path(origin[key])})", key=True)
            return
        params[key] = text
        origin[key] = path

    for key, value, path in _flatten(inst.params, (*base, "params")):
        if isinstance(value, list) and not all(_is_scalar(v) for v in value):
            bad = next(i for i, v in enumerate(value) if not _is_scalar(v))
            state.report(doc, (*path, bad), "a list value may hold only scalars (it is "
                         "joined with ',')")
            continue
        put(key, doc.text(path, value), path)
    if inst.filter is not None:
        put(filter_op.PARAM, doc.text((*base, "filter"), inst.filter), (*base, "filter"))
    if inst.fields is not None:
        put(fields_op.PARAM, inst.fields, (*base, "fields"))
    sections: list[tuple[str, KeyPath, Mapping[str, Any]]] = []
    for sink, given in inst.sinks.items():
        sections.append((sink, (*base, "sinks", sink), given or {}))
    for section, sink in state.sections.items():
        given = getattr(inst, section, None)
        if given is not None:
            sections.append((sink, (*base, section), given))
    for sink, spath, settings in sections:
        known = sinks.get(sink)
        if known is None:
            state.report(doc, spath, f"unknown sink {sink!r}{suggest(sink, sinks)} "
                         f"(sinks: {', '.join(sorted(sinks))})", key=True)
            continue
        enable = known[KEY_ENABLE]
        if not any(setting(known, k) is enable for k in settings):
            put(enable.full_key, "true", spath)
        for k, v in settings.items():
            spec = setting(known, k)
            if spec is None:
                state.report(doc, (*spath, k), f"unknown {sink} setting {k!r}"
                             f"{suggest(k, known)} (known: {', '.join(sorted(known))})",
                             key=True)
                continue
            put(spec.full_key, doc.text((*spath, k), v, list_separator(spec)), (*spath, k))
    return Declaration(doc, base, inst.name, inst.gadget, (*base, "gadget"), inst.id,
                       list(inst.tags), list(inst.nodes), inst.timeout,
                       inst.event_buffer_length, params, origin, upstream=False)


def from_manifest(doc: Document, m: InstanceSpecManifest) -> Declaration:
    """The declaration of an upstream instance manifest (its params used as written)."""
    params: dict[str, str] = {}
    origin: dict[str, KeyPath] = {}
    for key, value in m.param_values.items():
        path: KeyPath = ("paramValues", key)
        params[key] = doc.text(path, value)
        origin[key] = path
    return Declaration(doc, (), m.name, m.image, ("image",), m.id, list(m.tags), list(m.nodes),
                       0.0, 0, params, origin, upstream=True)


def request_of(d: Declaration) -> DeclaredInstance:
    """The ``CreateGadgetInstanceRequest`` a declaration stands for, and where it was made."""
    gi = pb.GadgetInstance(
        name=d.name, tags=d.tags, nodes=d.nodes,
        gadgetConfig=pb.GadgetRunRequest(imageName=d.gadget, paramValues=d.params,
                                         version=1, timeout=round(d.timeout_s * 1e9)))
    if d.id:
        gi.id = d.id
    req = pb.CreateGadgetInstanceRequest(gadgetInstance=gi,
                                         eventBufferLength=d.event_buffer_length)
    line, col = d.doc.where(d.base)
    return DeclaredInstance(d.name, req, d.doc.file, line, col, format_path(d.base),
                            d.upstream)
