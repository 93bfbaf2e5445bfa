"""A gadget's announced fields against upstream's recorded list (tests/data/upstream/), for the
per-gadget tests: no upstream field missing, none of our own, same kinds and output flags, and
the gadget's own settings (gadget.yaml ``fields:``) equal to upstream's."""

from __future__ import annotations

from collections.abc import Iterable

from tests.daemon import DaemonProcess
from tests.e2e.upstream_fields import upstream_field_diff

CONTAINER_FIELDS = ("k8s", "runtime")
"""Filled by container enrichment (pipeline/operators/enrich.py), on every gadget alike: the
per-gadget tests leave them to the enrichment tests."""


def assert_upstream_fields(daemon: DaemonProcess, gadget: str, configured: Iterable[str]) -> None:
    """Fails naming every difference but those of the container objects; ``configured`` are
    the fields whose annotations the gadget sets, which must equal upstream's exactly."""
    diff = upstream_field_diff(gadget, daemon)
    report = diff.report()
    assert not diff.sources_only_upstream and not diff.sources_only_ours, report
    for name, d in diff.sources.items():
        missing = [n for n in d.only_upstream
                   if n.split(".", 1)[0] not in CONTAINER_FIELDS]
        assert not missing, f"{gadget}/{name}: upstream's fields we lack: {missing}"
        assert not d.only_ours, f"{gadget}/{name}: fields upstream lacks: {d.only_ours}"
        assert not d.kinds, f"{gadget}/{name}: kinds differ: {d.kinds}"
        assert not d.flags, f"{gadget}/{name}: flags differ: {d.flags}"
        assert d.source_type is None and not d.source_annotations, report
        names = set(configured)
        assert names <= set(d.common), f"{gadget}/{name}: not announced: {names - set(d.common)}"
        ours = {n: a for n, a in d.annotations.items() if n in names}
        assert not ours, f"{gadget}/{name}: annotations differ from upstream's: {ours}"
