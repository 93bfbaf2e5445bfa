"""The daemon's own log reaches a real OpenTelemetry Collector when asked to (``serve
--otel-logs-endpoint``, ``daemon.otelLogs``), through the OpenTelemetry SDK; and every place
that reports gadgetpipe's version reports pyproject.toml's."""

from __future__ import annotations

import signal
import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline._gen import gadget_service_pb2 as pb
from tests.daemon import DaemonProcess
from tests.peers.otelcol import LogRecord, OtelCollector

pytestmark = pytest.mark.peer

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def collector() -> Iterator[OtelCollector]:
    with OtelCollector() as c:
        yield c


def _daemon_records(records: list[LogRecord], node: str) -> list[LogRecord]:
    return [r for r in records if r["resource"].get("host.name") == node]


def test_the_daemon_log_goes_to_the_collector_from_start_to_stop(
        collector: OtelCollector) -> None:
    node = socket.gethostname()
    with DaemonProcess("--otel-logs-endpoint", collector.grpc_endpoint) as daemon:
        records = collector.wait_for(lambda rs: any(
            str(r["body"]).startswith("gadgetpipe serving on") for r in rs))
        with daemon.client() as c:
            info = c.builtin.GetInfo(pb.InfoRequest(version="1.0"))
        assert info.serverVersion == PYPROJECT_VERSION
        serving = next(r for r in records if str(r["body"]).startswith("gadgetpipe serving on"))
        assert str(daemon.address) in serving["body"]
        assert serving["resource"] == {"service.name": "gadgetpipe",
                                       "service.version": PYPROJECT_VERSION, "host.name": node}
        assert (serving["scope_name"], serving["scope_version"]) == ("api.daemon",
                                                                   PYPROJECT_VERSION)
        assert (serving["severity_number"], serving["severity_text"]) == (9, "INFO")
        assert serving["attributes"]["code.function.name"] == "run_until_signalled"
        assert serving["attributes"]["code.file.path"].endswith("api/daemon.py")
        assert serving["time_unix_nano"] > 0
        # The exporter's own logging is never exported (it would feed on itself).
        assert not [r for r in records if r["scope_name"].startswith(("opentelemetry", "grpc"))]
        assert daemon.stop() == 0
    # Stopping exports what was still queued: the daemon's last words arrive.
    collector.wait_for(lambda rs: any(r["body"] == "stopping" for r in _daemon_records(rs, node)))


def test_the_config_file_sets_the_endpoint_and_level(collector: OtelCollector,
                                                       tmp_path: Path) -> None:
    node = "logs-node"
    config = tmp_path / "config.yaml"
    daemon_section = (f"daemon:\n  node: {node}\n  otelLogs:\n    endpoint: "
                      f"http://{collector.grpc_endpoint}\n    level: warning\n")
    config.write_text(daemon_section + "instances: []\n")
    with DaemonProcess(config=config) as daemon:
        # A reload that changes the daemon section warns that it waits for the next start.
        config.write_text(daemon_section + "  eventsBufferLength: 1000\ninstances: []\n")
        daemon.send_signal(signal.SIGHUP)
        records = collector.wait_for(lambda rs: any(
            "the daemon section changed" in str(r["body"]) for r in _daemon_records(rs, node)))
        assert daemon.stop() == 0
    ours = _daemon_records(records, node)
    warned = next(r for r in ours if "the daemon section changed" in str(r["body"]))
    assert (warned["severity_number"], warned["severity_text"]) == (13, "WARNING")
    assert warned["scope_name"] == "api.reconcile"
    # The info lines before it (serving, reloading) stayed out: the level is warning.
    assert [r for r in ours if r["severity_number"] < 13] == []
