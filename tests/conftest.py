from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.daemon import DaemonProcess


@pytest.fixture(scope="session")
def daemon() -> Iterator[DaemonProcess]:
    """One daemon for the tests that only talk to it (each uses its own runs)."""
    d = DaemonProcess()
    d.start()
    try:
        yield d
    finally:
        d.close()
