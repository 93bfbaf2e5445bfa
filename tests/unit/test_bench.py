"""bench/run is a launcher of the bench package: its CLI parses, and the scenario that needs no
kernel (g, the pipeline's own cost) moves every record through a run into the gRPC stream."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from bench.report import fmt
from bench.synthetic import synthetic_run

ROOT = Path(__file__).resolve().parents[2]


def test_the_launcher_runs_the_package() -> None:
    r = subprocess.run([str(ROOT / "bench" / "run"), "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: bench/run [-h] [--quick] [--only ONLY]")


@pytest.mark.parametrize(("batched", "filt"), [(False, False), (True, False), (False, True)])
def test_the_synthetic_scenario_delivers_every_record(batched: bool, filt: bool) -> None:
    r = asyncio.run(synthetic_run(5000, 1000, batched, filt))
    assert (r["generated"], r["received"], r["ledger_dropped"]) == (5000, 5000, 0)
    assert r["us_per_event"] > 0


def test_missing_numbers_print_as_a_dash() -> None:
    assert (fmt(float("nan")), fmt(1234.5), fmt(0.125, ".2f")) == ("-", "1,234", "0.12")
