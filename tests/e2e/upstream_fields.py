"""Our ``GetGadgetInfo`` against the field lists upstream's daemon announces for the same gadget
(tests/data/upstream/<gadget>.json, recorded by scripts/upstream_fields.py from ``ig daemon``).

``upstream_field_diff(gadget, ours)`` says, per data source, which field full names only
upstream announces, which only we do, and, for names both announce, where the kind, the
output-relevant flags or the output annotations differ. An empty diff (``not diff``) means
upstream clients print the same columns and JSON keys for both daemons; ``diff.report()`` is
the readable form for an assertion message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline._gen import gadget_service_pb2 as pb
from tests.daemon import DaemonProcess

DATA = Path(__file__).resolve().parents[1] / "data" / "upstream"

FLAG_NAMES = {1: "Empty", 2: "Container", 4: "Hidden", 8: "HasParent", 16: "StaticMember",
              32: "Unreferenced"}
COMPARED_FLAGS = 1 | 4 | 8 | 32
"""Empty, Hidden, HasParent, Unreferenced change what a client prints. Container and
StaticMember say only where the bytes live (a static struct block or a payload of its own),
which is our layout's business: docs/gadget-service.md §4.3."""
OUTPUT_ANNOTATION_PREFIXES = ("columns.", "json.")
"""Field annotations that change gadgetctl's output (`-o columns`, `-o json`)."""
OUTPUT_DS_ANNOTATION_PREFIXES = ("cli.",)
"""Data-source annotations that change it (e.g. ``cli.clear-screen-before``)."""
KIND_ARRAY = 0x10000000


def kind_name(kind: int) -> str:
    base = kind & ~KIND_ARRAY
    name = pb.Kind.Name(base) if base in pb.Kind.values() else f"Kind{base}"
    return f"{name}[]" if kind & KIND_ARRAY else name


def flag_names(flags: int) -> list[str]:
    return [name for bit, name in FLAG_NAMES.items() if flags & bit]


def load_upstream(gadget: str) -> dict[str, Any]:
    """The recorded upstream GetGadgetInfo of ``gadget`` (see scripts/upstream_fields.py)."""
    path = DATA / f"{gadget}.json"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


@dataclass(frozen=True)
class FieldInfo:
    """One announced field, reduced to what the comparison looks at."""

    kind: str
    flags: int
    annotations: dict[str, str]

    @classmethod
    def from_upstream(cls, f: dict[str, Any]) -> FieldInfo:
        return cls(f["kind"], f["flags"], dict(f["annotations"]))

    @classmethod
    def from_ours(cls, f: pb.Field) -> FieldInfo:
        return cls(kind_name(f.kind), f.flags, dict(f.annotations))


def _output_annotations(a: dict[str, str], prefixes: tuple[str, ...]) -> dict[str, str]:
    return {k: v for k, v in a.items() if k.startswith(prefixes)}


@dataclass
class SourceDiff:
    """The differences in one data source present on both sides."""

    only_upstream: list[str] = field(default_factory=list)
    only_ours: list[str] = field(default_factory=list)
    kinds: dict[str, tuple[str, str]] = field(default_factory=dict)
    """full name -> (upstream kind, our kind)"""
    flags: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)
    """full name -> (upstream's compared flags, ours)"""
    annotations: dict[str, dict[str, tuple[str | None, str | None]]] = field(
        default_factory=dict)
    """full name -> annotation -> (upstream value, ours); None = absent"""
    source_annotations: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    source_type: tuple[int, int] | None = None
    """(upstream's DataSource.type, ours) when they differ (1 single record, 2 array)."""
    common: list[str] = field(default_factory=list)
    """Full names both announce (whether or not they differ)."""

    def __bool__(self) -> bool:
        return bool(self.only_upstream or self.only_ours or self.kinds or self.flags or
                    self.annotations or self.source_annotations or self.source_type)


@dataclass
class FieldDiff:
    """Our GetGadgetInfo against upstream's, for one gadget."""

    gadget: str
    sources_only_upstream: list[str] = field(default_factory=list)
    sources_only_ours: list[str] = field(default_factory=list)
    sources: dict[str, SourceDiff] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.sources_only_upstream or self.sources_only_ours or
                    any(self.sources.values()))

    def report(self) -> str:
        """Every difference, one per line (empty when there is none)."""
        out: list[str] = []
        g = self.gadget
        out += [f"{g}: data source {n!r} only upstream" for n in self.sources_only_upstream]
        out += [f"{g}: data source {n!r} only ours" for n in self.sources_only_ours]
        for ds, d in self.sources.items():
            p = f"{g}/{ds}"
            if d.source_type:
                out.append(f"{p}: data source type upstream {d.source_type[0]}, "
                           f"ours {d.source_type[1]}")
            if d.only_upstream:
                out.append(f"{p}: only upstream ({len(d.only_upstream)}): "
                           f"{', '.join(d.only_upstream)}")
            if d.only_ours:
                out.append(f"{p}: only ours ({len(d.only_ours)}): {', '.join(d.only_ours)}")
            out += [f"{p}: {n}: kind upstream {u}, ours {o}" for n, (u, o) in d.kinds.items()]
            out += [f"{p}: {n}: flags upstream {'|'.join(u) or '-'}, ours {'|'.join(o) or '-'}"
                    for n, (u, o) in d.flags.items()]
            for n, anns in d.annotations.items():
                out += [f"{p}: {n}: annotation {k}: upstream {u!r}, ours {o!r}"
                        for k, (u, o) in anns.items()]
            out += [f"{p}: data source annotation {k}: upstream {u!r}, ours {o!r}"
                    for k, (u, o) in d.source_annotations.items()]
        return "\n".join(out)


def _compare_annotations(up: dict[str, str], ours: dict[str, str],
                         prefixes: tuple[str, ...]) -> dict[str, tuple[str | None, str | None]]:
    u = _output_annotations(up, prefixes)
    o = _output_annotations(ours, prefixes)
    return {k: (u.get(k), o.get(k)) for k in sorted(u.keys() | o.keys()) if u.get(k) != o.get(k)}


def upstream_field_diff(gadget: str, ours: pb.GadgetInfo | DaemonProcess) -> FieldDiff:
    """Compares our announced fields for ``gadget`` (a GadgetInfo, or a running daemon to ask
    GetGadgetInfo) with upstream's recorded ones."""
    if isinstance(ours, DaemonProcess):
        with ours.client() as c:
            ours = c.info(gadget)
    upstream = load_upstream(gadget)
    up_sources = {ds["name"]: ds for ds in upstream["dataSources"]}
    our_sources = {ds.name: ds for ds in ours.dataSources}
    diff = FieldDiff(gadget,
                     sorted(up_sources.keys() - our_sources.keys()),
                     sorted(our_sources.keys() - up_sources.keys()))
    for name in [n for n in up_sources if n in our_sources]:
        up_ds, our_ds = up_sources[name], our_sources[name]
        up_fields = {f["fullName"]: FieldInfo.from_upstream(f) for f in up_ds["fields"]}
        our_fields = {f.fullName: FieldInfo.from_ours(f) for f in our_ds.fields}
        d = SourceDiff(
            only_upstream=[n for n in up_fields if n not in our_fields],
            only_ours=[n for n in our_fields if n not in up_fields],
            common=[n for n in up_fields if n in our_fields],
            source_annotations=_compare_annotations(
                up_ds["annotations"], dict(our_ds.annotations), OUTPUT_DS_ANNOTATION_PREFIXES),
            source_type=(None if up_ds["type"] == our_ds.type else (up_ds["type"], our_ds.type)))
        for n in d.common:
            u, o = up_fields[n], our_fields[n]
            if u.kind != o.kind:
                d.kinds[n] = (u.kind, o.kind)
            if u.flags & COMPARED_FLAGS != o.flags & COMPARED_FLAGS:
                d.flags[n] = (flag_names(u.flags & COMPARED_FLAGS),
                              flag_names(o.flags & COMPARED_FLAGS))
            anns = _compare_annotations(u.annotations, o.annotations, OUTPUT_ANNOTATION_PREFIXES)
            if anns:
                d.annotations[n] = anns
        diff.sources[name] = d
    return diff
