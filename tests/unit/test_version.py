"""One version string: pyproject.toml's, wherever gadgetpipe reports one (GetInfo's
serverVersion and the daemon log's resource are checked against a daemon in
tests/e2e/test_daemon_logs.py)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from prometheus_client import CollectorRegistry

from api.selfmetrics import SelfMetricsCollector
from pipeline.ledger import Ledger
from pipeline.sinks.base import SinkContext
from pipeline.sinks.otlp_logs import resource_attributes
from pipeline.version import VERSION

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_the_version_is_pyprojects() -> None:
    assert VERSION == PYPROJECT


def test_the_cli_reports_it() -> None:
    r = subprocess.run([sys.executable, "-m", "api.cli", "--version"], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert (r.returncode, r.stdout) == (0, f"gadgetpipe {PYPROJECT}\n")


def test_the_build_info_metric_and_otlp_resource_report_it() -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SelfMetricsCollector(Ledger()))
    assert registry.get_sample_value("gadgetpipe_build_info", {"version": PYPROJECT}) == 1.0
    ctx = SinkContext("trace_exec", "run-1", "run-1", "node", (), Ledger())
    assert resource_attributes(ctx)["service.version"] == PYPROJECT
