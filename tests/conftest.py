from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.daemon import DaemonProcess
from tests.peers.upstream import ENABLE_HINT, missing_reason

REQUIRE_UPSTREAM_ENV = "GADGETPIPE_REQUIRE_UPSTREAM"
"""Set to 1 (CI does) to make missing upstream binaries fail the upstream tests, not skip them."""
_UPSTREAM_SKIPPED = pytest.StashKey[tuple[int, str]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "upstream: drives upstream Inspektor Gadget's gadgetctl or ig daemon, built by "
        "`scripts/setup upstream` from an upstream source tree")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The one skip the suite allows: a machine with no upstream source cannot build upstream's
    # client. Everything else runs, and the summary below says what did not and how to enable it.
    # CI (CI=true) must run them: its machine has the upstream source.
    if os.environ.get(REQUIRE_UPSTREAM_ENV) == "1" or os.environ.get("CI") == "true":
        return
    why = missing_reason()
    if why is None:
        return
    marked = [item for item in items if item.get_closest_marker("upstream") is not None]
    if not marked:
        return
    skip = pytest.mark.skip(reason=f"upstream clients not built: {why}")
    for item in marked:
        item.add_marker(skip)
    config.stash[_UPSTREAM_SKIPPED] = (len(marked), why)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    skipped = config.stash.get(_UPSTREAM_SKIPPED, None)
    if skipped is None:
        return
    count, why = skipped
    terminalreporter.section("upstream clients", yellow=True, bold=True)
    terminalreporter.write_line(
        f"{count} upstream-client tests (upstream gadgetctl / ig daemon) did NOT run: {why}.")
    terminalreporter.write_line(f"To run them, {ENABLE_HINT}, then run the suite again.")


@pytest.fixture(scope="session")
def daemon() -> Iterator[DaemonProcess]:
    """One daemon for the tests that only talk to it (each uses its own runs)."""
    d = DaemonProcess()
    d.start()
    try:
        yield d
    finally:
        d.close()
