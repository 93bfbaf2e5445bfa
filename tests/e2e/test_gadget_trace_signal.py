"""trace_signal end to end: SIGUSR1 to a child (sender, target, number), the kill-only mode
with a failing kill, and the signal param."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from collections.abc import Iterator

import grpc
import pytest

from tests.daemon import DaemonProcess
from tests.e2e.gadget_run import Record, collect
from tests.e2e.upstream_fields import upstream_field_diff

pytestmark = pytest.mark.bpf


@pytest.fixture()
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Children the trigger starts; all reaped at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def to(records: list[Record], pid: int, sig: int) -> list[Record]:
    return [r for r in records if r["tpid"] == pid and r["sig_raw"] == sig]


def test_sigusr1_to_a_child_names_sender_target_and_signal(
        daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]) -> None:
    def trigger() -> None:
        child = subprocess.Popen(["sleep", "30"])
        children.append(child)
        os.kill(child.pid, signal.SIGUSR1)
        assert child.wait(5) == -signal.SIGUSR1

    def done(rs: list[Record]) -> bool:
        return any(to(rs, c.pid, signal.SIGUSR1) for c in list(children))

    _, records = collect(daemon, "trace_signal", {"operator.oci.ebpf.pid": str(os.getpid())},
                         trigger, done)
    hits = [r for c in children for r in to(records, c.pid, signal.SIGUSR1)]
    assert hits, f"no SIGUSR1 record among {len(records)}"
    r = hits[0]
    assert r["sig_raw"] == int(signal.SIGUSR1) == 10
    assert r["sig"] == b"SIGUSR1"  # derived, as upstream names it
    assert r["proc.pid"] == os.getpid()
    assert r["error_raw"] == 0 and r["error"] == b""
    assert r["proc.creds.user"] == b"root" and r["proc.creds.group"] == b"root"


def test_kill_only_reports_the_failing_call_with_its_errno(daemon: DaemonProcess) -> None:
    with open("/proc/sys/kernel/pid_max") as f:
        nobody = int(f.read()) + 1  # above pid_max: no such process, ever

    def trigger() -> None:
        with pytest.raises(ProcessLookupError):
            os.kill(nobody, signal.SIGUSR2)

    _, records = collect(daemon, "trace_signal",
                         {"operator.oci.ebpf.pid": str(os.getpid()),
                          "operator.oci.ebpf.kill-only": "true",
                          "operator.oci.ebpf.failed": "true"},
                         trigger, lambda rs: bool(to(rs, nobody, signal.SIGUSR2)))
    hits = to(records, nobody, signal.SIGUSR2)
    assert hits, "the failed kill was not reported"
    assert hits[0]["error_raw"] == errno.ESRCH == 3
    assert hits[0]["error"] == b"ESRCH" and hits[0]["sig"] == b"SIGUSR2"
    assert hits[0]["proc.pid"] == os.getpid()
    assert all(r["error_raw"] != 0 for r in records)


def test_signal_param_keeps_only_that_signal(
        daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]) -> None:
    def trigger() -> None:
        child = subprocess.Popen(["sleep", "30"])
        children.append(child)
        os.kill(child.pid, signal.SIGCONT)  # not asked for
        os.kill(child.pid, signal.SIGUSR2)

    _, records = collect(daemon, "trace_signal", {"operator.oci.ebpf.pid": str(os.getpid()),
                                                  "operator.oci.ebpf.signal": "SIGUSR2"},
                         trigger, lambda rs: len(rs) >= 2)
    assert len(records) >= 2
    assert {r["sig_raw"] for r in records} == {signal.SIGUSR2}


def test_unknown_signal_name_is_refused(daemon: DaemonProcess) -> None:
    with daemon.client() as c, pytest.raises(grpc.RpcError) as e:
        list(c.run("trace_signal", {"operator.oci.ebpf.signal": "SIGNOPE"}).raw())
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'SIGNOPE' is not a signal" in (e.value.details() or "")


def test_announces_every_field_upstream_does(daemon: DaemonProcess) -> None:
    diff = upstream_field_diff("trace_signal", daemon)
    assert not diff.sources_only_upstream and not diff.sources_only_ours, diff.report()
    d = diff.sources["signal"]
    # k8s.* and runtime.* come from the container enrichment (pipeline/operators/enrich.py).
    missing = [n for n in d.only_upstream if not n.startswith(("k8s", "runtime"))]
    assert not missing and not d.only_ours, diff.report()
    assert not d.kinds and not d.flags and not d.annotations, diff.report()
