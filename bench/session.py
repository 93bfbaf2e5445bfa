"""One benchmark run's state: the profile, the generator binary, the daemon (started on first
use), the table's rows and the summary lines; and the chain measurement most scenarios share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    COMM_PARAM,
    IMAGE,
    PYTHON,
    RUN,
    Generator,
    MemPeak,
    Profile,
    bpf_programs,
    median,
)
from bench.daemon import Daemon, run_client


@dataclass
class Row:
    """One line of the table (medians over repeats)."""

    scenario: str
    generated: float = float("nan")
    received: float = float("nan")
    kernel_lost: float = float("nan")
    ledger_dropped: float = float("nan")
    seq_gaps: float = float("nan")
    events_per_s: float = float("nan")
    cpu_s_per_m: float = float("nan")
    rss_anon_mb: float = float("nan")
    rss_file_mb: float = float("nan")
    note: str = ""


@dataclass
class Bench:
    profile: Profile
    tmp: Path
    goclient: Path
    gen_binary: Path
    comm: str
    rows: list[Row] = field(default_factory=list)
    lines: dict[str, str] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    daemon: Daemon | None = None
    floor: float = float("nan")
    zero: dict[str, float] | None = None
    zero_by_procs: dict[int, dict[str, float]] = field(default_factory=dict)

    def row(self, scenario: str, runs: list[dict[str, Any]], note: str = "") -> Row:
        def med(key: str) -> float:
            return median([float(r[key]) for r in runs if key in r])

        r = Row(scenario, med("generated"), med("received"), med("kernel_lost"),
                med("ledger_dropped"), med("seq_gaps"), med("events_per_s"),
                med("cpu_s_per_m"), med("rss_anon_mb"), med("rss_file_mb"), note)
        self.rows.append(r)
        self.raw[scenario] = runs
        return r

    def need_daemon(self) -> Daemon:
        if self.daemon is None:
            self.daemon = Daemon(self.tmp)
        return self.daemon

    def chain_run(self, count: int, rate: int, batched: bool,
                  extra: tuple[str, ...] = (), procs: int = 1) -> dict[str, Any]:
        """The daemon and one client, the Go client per record or the grpcio client batched,
        with ``count`` opens at ``rate`` (0: unthrottled) from ``procs`` generators; ``extra``
        params go to the Go client's run."""
        d = self.need_daemon()
        gen = Generator(self.gen_binary, count, rate, procs)
        before_progs = bpf_programs(d.pid)
        m0 = d.metrics()
        mem = MemPeak(d.pid)
        if batched:
            cmd = [PYTHON, RUN, "_pyclient", d.address, str(count), f"{COMM_PARAM}={self.comm}",
                   "operator.grpc.batch-max=1024"]
        else:
            cmd = [str(self.goclient), "-addr", d.address, "-image", IMAGE, "-quiet",
                   "-param", f"{COMM_PARAM}={self.comm}", "-stop-after", str(count)]
            for kv in extra:
                cmd += ["-param", kv]
        summary, g, cpu = run_client(cmd, gen, d, before_progs, count)
        peak = mem.stop()
        m1 = d.metrics()
        received = int(summary["records"])
        return {"generated": count, "received": received,
                "kernel_lost": m1["kernel_lost"] - m0["kernel_lost"],
                "ledger_dropped": m1["grpc_dropped"] - m0["grpc_dropped"],
                "seq_gaps": summary["lost"], "lost": count - received,
                "events_per_s": summary["records_per_s"], "gen_rate": g["rate"],
                "cpu_s_per_m": cpu / max(received, 1) * 1e6,
                "sink_dropped": m1["sink_dropped"] - m0["sink_dropped"],
                "sink_delivered": m1["sink_delivered"] - m0["sink_delivered"], **peak}
