#!/usr/bin/env python3
"""Records the field lists upstream's daemon announces for our ten gadgets, as test data.

Starts upstream's ``ig daemon`` (built by ``scripts/setup upstream``, with ig images of the ten
gadgets), asks it ``GetGadgetInfo`` for each gadget, and writes one JSON file per gadget to
``tests/data/upstream/<gadget>.json``: per data source, every field's full name, kind, flags,
tags and annotations (and the gadget's params). tests/e2e/upstream_fields.py compares our
daemon's ``GetGadgetInfo`` with these files.

Usage (root; from the repository root):

    .venv/bin/python scripts/upstream_fields.py [--out DIR] [GADGET...]

Offsets, sizes, indexes and payload indexes are layout, not contract: they are left out, and a
field's parent is recorded by full name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(ROOT))

from api.client import GadgetClient  # noqa: E402
from pipeline._gen import gadget_service_pb2 as pb  # noqa: E402
from tests.peers.upstream import UPSTREAM_GADGETS, IgDaemon, upstream_paths  # noqa: E402

OUT = ROOT / "tests" / "data" / "upstream"
HOST_PARAMS = {"operator.LocalManager.host": "true"}
"""What ``gadgetctl --host`` sends: trace the host, not only containers."""

FIELD_FLAGS = {1: "Empty", 2: "Container", 4: "Hidden", 8: "HasParent", 16: "StaticMember",
               32: "Unreferenced"}
KIND_ARRAY = 0x10000000

# The ig build leaves out the ustack operator (its blank import pulls a module the Go module
# proxy refuses; see scripts/lib/upstream.sh). Upstream's daemon runs it, and it adds three
# hidden string subfields to every user-stack struct (pkg/operators/ustack/ustack.go, addField):
# they are added here from that source, marked as such.
USTACK_TAG = "type:gadget_user_stack"
USTACK_SUBFIELDS = ("addresses", "buildid", "symbols")


def kind_name(kind: int) -> str:
    base = kind & ~KIND_ARRAY
    name = pb.Kind.Name(base) if base in pb.Kind.values() else f"Kind{base}"
    return f"{name}[]" if kind & KIND_ARRAY else name


def flag_names(flags: int) -> list[str]:
    names = [name for bit, name in FIELD_FLAGS.items() if flags & bit]
    rest = flags & ~sum(FIELD_FLAGS)
    if rest:
        names.append(f"0x{rest:x}")
    return names


def field_entry(f: pb.Field, by_index: dict[int, pb.Field]) -> dict[str, Any]:
    parent = by_index[f.parent].fullName if f.flags & 8 and f.parent in by_index else None
    return {
        "fullName": f.fullName,
        "name": f.name,
        "kind": kind_name(f.kind),
        "kindValue": f.kind,
        "flags": f.flags,
        "flagNames": flag_names(f.flags),
        "parent": parent,
        "order": f.order,
        "tags": list(f.tags),
        "annotations": dict(sorted(f.annotations.items())),
    }


def ustack_supplement(fields: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ustack operator's subfields for each user-stack struct that lacks them."""
    names = {f["fullName"] for f in fields}
    extra = []
    for f in fields:
        if USTACK_TAG not in f["tags"]:
            continue
        for sub in USTACK_SUBFIELDS:
            full = f"{f['fullName']}.{sub}"
            if full in names:
                continue
            flags = 4 | 8  # Hidden, HasParent (AddSubField)
            extra.append({
                "fullName": full, "name": sub, "kind": "String", "kindValue": pb.String,
                "flags": flags, "flagNames": flag_names(flags), "parent": f["fullName"],
                "order": 0, "tags": [f"name:{sub}", "operator:ustack"], "annotations": {},
                "recordedFrom": "source: pkg/operators/ustack/ustack.go (operator not in the "
                                "ig build)",
            })
    return extra


def param_entry(p: pb.Param) -> dict[str, Any]:
    return {
        "prefix": p.prefix, "key": p.key, "alias": p.alias, "title": p.title,
        "description": p.description, "defaultValue": p.defaultValue, "typeHint": p.typeHint,
        "valueHint": p.valueHint, "possibleValues": list(p.possibleValues),
        "isMandatory": p.isMandatory, "tags": list(p.tags),
    }


def record(gadget: str, info: pb.GadgetInfo, commit: str) -> dict[str, Any]:
    sources = []
    for ds in info.dataSources:
        by_index = {f.index: f for f in ds.fields}
        fields = [field_entry(f, by_index) for f in ds.fields]
        fields += ustack_supplement(fields)
        sources.append({
            "name": ds.name,
            "type": ds.type,
            "tags": list(ds.tags),
            "annotations": dict(sorted(ds.annotations.items())),
            "fields": fields,
        })
    return {
        "gadget": gadget,
        "source": {
            "upstreamCommit": commit,
            "how": "GetGadgetInfo from upstream's `ig daemon` built by `scripts/setup upstream`, "
                   f"image {gadget}:latest built from the upstream tree's gadgets/{gadget}, "
                   f"params {HOST_PARAMS}; regenerate with scripts/upstream_fields.py",
        },
        "dataSources": sources,
        # Upstream announces params in map order, which changes from run to run.
        "params": sorted((param_entry(p) for p in info.params),
                         key=lambda p: (p["prefix"], p["key"])),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gadgets", nargs="*", default=list(UPSTREAM_GADGETS))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    paths = upstream_paths()
    args.out.mkdir(parents=True, exist_ok=True)
    with IgDaemon(paths) as ig, GadgetClient(ig.address) as client:
        for gadget in args.gadgets:
            info = client.info(gadget, HOST_PARAMS)
            data = record(gadget, info, paths.commit)
            path = args.out / f"{gadget}.json"
            path.write_text(json.dumps(data, indent=1) + "\n")
            n = sum(len(ds["fields"]) for ds in data["dataSources"])
            print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: "
                  f"{len(data['dataSources'])} data source(s), {n} fields")
    return 0


if __name__ == "__main__":
    sys.exit(main())
