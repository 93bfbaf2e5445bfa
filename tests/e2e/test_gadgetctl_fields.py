"""Our announced fields against upstream's (tests/data/upstream/, recorded from ``ig daemon``).

The full comparison is ``upstream_field_diff`` (tests/e2e/upstream_fields.py): the tests of
upstream's fields assert it is empty per gadget. Here: every gadget's data sources exist on
both sides with the same type, and the fields both announce agree in kind, so what matches
today keeps matching. A fixed-size ``CString`` and upstream's ``String`` count as one text kind
here (both reach a client as text); ``upstream_field_diff`` keeps them apart.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess
from tests.e2e.upstream_fields import DATA, load_upstream, upstream_field_diff
from tests.peers.upstream import UPSTREAM_GADGETS

TEXT_KINDS = {"String", "CString"}


def test_every_gadget_has_an_upstream_field_list() -> None:
    assert sorted(p.stem for p in DATA.glob("*.json")) == sorted(UPSTREAM_GADGETS)
    for gadget in UPSTREAM_GADGETS:
        data = load_upstream(gadget)
        assert data["gadget"] == gadget
        assert data["dataSources"] and all(ds["fields"] for ds in data["dataSources"])


@pytest.mark.parametrize("gadget", UPSTREAM_GADGETS)
def test_fields_both_announce_have_the_same_kind(daemon: DaemonProcess, gadget: str) -> None:
    diff = upstream_field_diff(gadget, daemon)
    assert not diff.sources_only_upstream and not diff.sources_only_ours, diff.report()
    for name, ds in diff.sources.items():
        assert ds.source_type is None, f"{gadget}/{name}: {diff.report()}"
        assert ds.common, f"{gadget}/{name}: no field in common with upstream"
        kinds = {n: k for n, k in ds.kinds.items() if not set(k) <= TEXT_KINDS}
        assert not kinds, f"{gadget}/{name}: kinds differ from upstream's: {kinds}"


def test_the_diff_sees_a_difference() -> None:
    # The comparison itself: a GadgetInfo built from upstream's own list matches it, and one
    # field renamed, retyped, hidden or re-annotated shows up as exactly that.
    from pipeline._gen import gadget_service_pb2 as pb

    up = load_upstream("trace_open")
    ds = up["dataSources"][0]
    fields = []
    for i, f in enumerate(ds["fields"]):
        fields.append(pb.Field(name=f["name"], fullName=f["fullName"], index=i,
                               flags=f["flags"], kind=f["kindValue"], tags=f["tags"],
                               annotations=f["annotations"]))
    info = pb.GadgetInfo(dataSources=[pb.DataSource(name=ds["name"], type=ds["type"],
                                                    fields=fields,
                                                    annotations=ds["annotations"])])
    assert not upstream_field_diff("trace_open", info), \
        upstream_field_diff("trace_open", info).report()
    by_name = {f.fullName: f for f in info.dataSources[0].fields}
    by_name["fname"].fullName = "filename"
    by_name["fd"].kind = pb.Int64
    by_name["error"].flags |= 4
    by_name["proc.comm"].annotations["columns.width"] = "99"
    d = upstream_field_diff("trace_open", info).sources["open"]
    assert d.only_upstream == ["fname"] and d.only_ours == ["filename"]
    assert d.kinds == {"fd": ("Uint32", "Int64")}
    assert d.flags == {"error": ([], ["Hidden"])}
    assert d.annotations == {"proc.comm": {"columns.width": ("16", "99")}}


@pytest.mark.bpf
@pytest.mark.upstream
def test_recorded_lists_are_what_ig_daemon_announces(tmp_path: Path) -> None:
    # The test data must be upstream's real answer: regenerate it from the ig daemon the
    # set-up built and compare (scripts/upstream_fields.py rewrites the files when this fails
    # after an upstream update).
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "scripts" / "upstream_fields.py"
    spec = importlib.util.spec_from_file_location("upstream_fields_script", script)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path)]) == 0
    for gadget in UPSTREAM_GADGETS:
        fresh = json.loads((tmp_path / f"{gadget}.json").read_text())
        recorded = load_upstream(gadget)
        if fresh["source"]["upstreamCommit"] != recorded["source"]["upstreamCommit"]:
            pytest.fail(f"the set-up built upstream {fresh['source']['upstreamCommit']}, the "
                        f"test data is from {recorded['source']['upstreamCommit']}: run "
                        f"scripts/upstream_fields.py")
        assert fresh == recorded, f"{gadget}: tests/data/upstream/{gadget}.json is stale"
