"""Declarative config end to end: real daemons (subprocesses), real eBPF, the real CLI.

``gadgetpipe apply``: create, re-apply (nothing changes), change one param (only that
instance is replaced), dry run, prune, a bad file (nothing changes), an upstream manifest.
``serve --config``: the declared instances exist when the socket opens and survive a restart
unchanged; SIGHUP reloads them, leaving unchanged instances (and a client attached to one)
alone.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from api.client import GadgetClient, RunStream
from api.reconcile import OWNER_APPLY, OWNER_CONFIG
from pipeline._gen import gadget_service_pb2 as pb
from tests.daemon import ROOT, DaemonProcess
from tests.e2e.helpers import unique_binary

pytestmark = pytest.mark.bpf

EXAMPLES = ROOT / "config" / "examples"


# -- helpers ------------------------------------------------------------------------------------


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon of the test's own with an empty config (no declared instances)."""
    empty = tmp_path / "daemon.yaml"
    empty.write_text("# no instances\n")
    d = DaemonProcess(config=empty)
    d.start()
    try:
        yield d
    finally:
        d.close()


def gp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "api.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def apply(d: DaemonProcess, path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return gp("apply", "-f", str(path), "--remote-address", d.address, *flags)


def instances(c: GadgetClient) -> dict[str, pb.GadgetInstance]:
    resp = c.instances.ListGadgetInstances(pb.ListGadgetInstancesRequest())
    return {gi.name: gi for gi in resp.gadgetInstances}


def wait_ready(c: GadgetClient, ref: str, timeout: float = 90.0) -> pb.GadgetInfo:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return c.info(ref, instance=True)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise


def wait_until(cond: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def config(path: Path, *instances_yaml: str) -> Path:
    path.write_text("instances:\n" + "".join(instances_yaml))
    return path


def inst(name: str, comm: str, extra: str = "") -> str:
    return (f"  - name: {name}\n    gadget: trace_exec\n"
            f"    params:\n      operator.oci.ebpf.comm: {comm}\n{extra}")


def ids(c: GadgetClient) -> dict[str, tuple[str, int]]:
    return {n: (gi.id, gi.timeCreated) for n, gi in instances(c).items()}


# -- apply --------------------------------------------------------------------------------------


def test_apply_reapply_change_dry_run_prune(tmp_path: Path, daemon: DaemonProcess) -> None:
    f = config(tmp_path / "c.yaml", inst("exec-a", "gpa"), inst("exec-b", "gpb"))
    r = apply(daemon, f)
    assert r.returncode == 0, r.stderr
    assert "create   exec-a (trace_exec) ... ok" in r.stdout
    assert "create   exec-b (trace_exec) ... ok" in r.stdout
    with daemon.client() as c:
        for name in ("exec-a", "exec-b"):
            wait_ready(c, name)
        first = ids(c)
        listed = instances(c)
        assert set(first) == {"exec-a", "exec-b"}
        assert OWNER_APPLY in listed["exec-a"].tags
        assert dict(listed["exec-a"].gadgetConfig.paramValues) == {
            "operator.oci.ebpf.comm": "gpa"}
        # A hand-made instance that apply must never prune.
        c.instances.CreateGadgetInstance(pb.CreateGadgetInstanceRequest(
            gadgetInstance=pb.GadgetInstance(name="by-hand", tags=[""], gadgetConfig=(
                pb.GadgetRunRequest(imageName="trace_exec", version=1)))))

        # Applying the same file again changes nothing.
        r = apply(daemon, f)
        assert r.returncode == 0, r.stderr
        assert "0 to create, 0 to replace, 2 unchanged, 0 to remove" in r.stdout
        again = ids(c)
        assert {n: again[n] for n in first} == first

        # One param changes: only that instance is replaced.
        config(f, inst("exec-a", "gpa"), inst("exec-b", "gpb2"))
        r = apply(daemon, f)
        assert r.returncode == 0, r.stderr
        assert ("replace  exec-b (trace_exec) id " + first["exec-b"][0][:12]
                + ": params changed: operator.oci.ebpf.comm ... ok") in r.stdout
        changed = ids(c)
        assert changed["exec-a"] == first["exec-a"]
        assert changed["exec-b"][0] != first["exec-b"][0]
        assert dict(instances(c)["exec-b"].gadgetConfig.paramValues) == {
            "operator.oci.ebpf.comm": "gpb2"}

        # A dry run prints the plan and changes nothing.
        config(f, inst("exec-b", "gpb2"), inst("exec-c", "gpc"))
        r = apply(daemon, f, "--prune", "--dry-run")
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == [
            f"remove   exec-a (trace_exec) id {first['exec-a'][0][:12]}: no longer declared",
            f"keep     exec-b (trace_exec) id {changed['exec-b'][0][:12]}",
            "create   exec-c (trace_exec)",
            "1 to create, 0 to replace, 1 unchanged, 1 to remove (dry run: nothing was done)"]
        assert ids(c) == changed

        # Without --prune nothing is removed; with it, only what apply created.
        r = apply(daemon, f)
        assert r.returncode == 0, r.stderr
        assert set(ids(c)) == {"exec-a", "exec-b", "exec-c", "by-hand"}
        r = apply(daemon, f, "--prune")
        assert r.returncode == 0, r.stderr
        assert "remove   exec-a" in r.stdout
        final = ids(c)
        assert set(final) == {"exec-b", "exec-c", "by-hand"}
        assert final["exec-b"] == changed["exec-b"]


def test_a_bad_file_changes_nothing(tmp_path: Path, daemon: DaemonProcess) -> None:
    f = config(tmp_path / "c.yaml", inst("exec-a", "gpa"))
    assert apply(daemon, f).returncode == 0
    with daemon.client() as c:
        wait_ready(c, "exec-a")
        before = ids(c)
        # A valid change next to an invalid instance: the valid part is not applied either.
        config(f, inst("exec-a", "gpa2"), inst("exec-b", "gpb", "    filter: proc.commm==x\n"),
               "  - name: exec-c\n    gadget: trace_exec\n    params:\n"
               "      operator.oci.ebpf.pidd: 1\n")
        r = apply(daemon, f, "--prune")
        assert r.returncode == 1
        assert r.stdout == ""
        assert r.stderr.splitlines()[:3] == [
            "error: the config is invalid, nothing was done:",
            f"{f}:10:13: instances[1].filter: operator.filter.filter: data source 'exec' has "
            "no field 'proc.commm' (fields: " + r.stderr.split("(fields: ", 1)[1].split(")")[0]
            + "); did you mean 'proc.comm'?",
            f"{f}:14:7: instances[2].params.operator.oci.ebpf.pidd: unknown parameter; did you "
            "mean 'operator.oci.ebpf.pid'?"]
        assert ids(c) == before
        assert dict(instances(c)["exec-a"].gadgetConfig.paramValues) == {
            "operator.oci.ebpf.comm": "gpa"}


def test_upstream_manifest_applies(daemon: DaemonProcess) -> None:
    r = apply(daemon, EXAMPLES / "upstream-manifest.yaml")
    assert r.returncode == 0, r.stderr
    # Upstream's container selection params are gadgetpipe's own: no warning for them.
    assert "operator.LocalManager.host" not in r.stderr
    with daemon.client() as c:
        listed = instances(c)
        assert set(listed) == {"my-gadget-1", "my-gadget-2"}
        one = listed["my-gadget-1"]
        assert list(one.tags)[:2] == ["mytag1", "mytag2"]
        assert one.gadgetConfig.imageName == "trace_exec"
        assert dict(one.gadgetConfig.paramValues) == {
            "operator.LocalManager.host": "true", "operator.filter.filter": "proc.comm~^ba.*$"}
        info = wait_ready(c, "my-gadget-2")
        assert info.name == "my-gadget-2"
        assert listed["my-gadget-2"].gadgetConfig.imageName == \
            "ghcr.io/inspektor-gadget/gadget/trace_exec:latest"
    # Applying it again keeps both.
    r = apply(daemon, EXAMPLES / "upstream-manifest.yaml")
    assert "0 to create, 0 to replace, 2 unchanged, 0 to remove" in r.stdout


# -- serve --config and SIGHUP ------------------------------------------------------------------


@dataclass
class Attached:
    """An attach stream read in a thread: the payload seqs that arrived."""

    stream: RunStream
    seqs: list[int] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


def attach(c: GadgetClient, instance_id: str) -> Attached:
    stream = c.attach(instance_id)
    out = Attached(stream)

    def read() -> None:
        try:
            for ev in stream.raw():
                if ev.type == 0:
                    out.seqs.append(ev.seq)
        except grpc.RpcError as e:
            out.error = e
        finally:
            out.ended.set()

    threading.Thread(target=read, daemon=True).start()
    return out


def test_serve_config_creates_and_sighup_reloads(tmp_path: Path) -> None:
    keep_bin = unique_binary(tmp_path, "gk")
    keep_comm = keep_bin.name[:15]
    f = config(tmp_path / "daemon.yaml", inst("keep", keep_comm), inst("change", "gpc1"),
               inst("drop", "gpd"))
    state = tmp_path / "state"
    d = DaemonProcess(config=f, state_dir=state).start()
    try:
        with d.client() as c:
            # Declared instances exist as soon as the socket answers.
            listed = instances(c)
            assert set(listed) == {"keep", "change", "drop"}
            assert all(OWNER_CONFIG in gi.tags for gi in listed.values())
            first = ids(c)
            wait_ready(c, "keep")

            a = attach(c, first["keep"][0])
            for _ in range(3):
                subprocess.run([str(keep_bin)], check=True)
            wait_until(lambda: len(a.seqs) >= 3, what="3 records before the reload")

            # change gets a new param, drop goes, new comes; keep stays as it is.
            config(f, inst("keep", keep_comm), inst("change", "gpc2"), inst("new", "gpn"))
            d.send_signal(signal.SIGHUP)
            wait_until(lambda: set(ids(c)) == {"keep", "change", "new"}, what="the reload")
            wait_until(lambda: ids(c)["change"][0] != first["change"][0], what="the replace")
            after = ids(c)
            assert after["keep"] == first["keep"]
            assert dict(instances(c)["change"].gadgetConfig.paramValues) == {
                "operator.oci.ebpf.comm": "gpc2"}

            # The attached client never noticed: same stream, seq goes on.
            n = len(a.seqs)
            for _ in range(3):
                subprocess.run([str(keep_bin)], check=True)
            wait_until(lambda: len(a.seqs) >= n + 3, what="3 records after the reload")
            assert not a.ended.is_set(), a.error
            assert a.seqs == list(range(1, len(a.seqs) + 1))

            # An invalid file on SIGHUP changes nothing.
            f.write_text(f.read_text() + "  - name: broken\n    gadget: trace_exek\n")
            d.send_signal(signal.SIGHUP)
            wait_until(lambda: "trace_exek" in d.log(), what="the reload error in the log")
            assert ids(c) == after
            assert "config reload: " in d.log() and "nothing changed" in d.log()
            a.stream.cancel()
    finally:
        d.stop()

    # A restart with the same file and state keeps the instances (same ids).
    config(f, inst("keep", keep_comm), inst("change", "gpc2"), inst("new", "gpn"))
    d = DaemonProcess(config=f, state_dir=state).start()
    try:
        with d.client() as c:
            assert {n: v[0] for n, v in ids(c).items()} == {n: v[0] for n, v in after.items()}
            wait_ready(c, "keep")
    finally:
        d.close()
