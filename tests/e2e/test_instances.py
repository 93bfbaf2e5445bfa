"""Gadget instances end to end: real daemons (subprocesses), real eBPF, real clients.

Create, restart (SIGTERM and SIGKILL), replay, remove (no BPF program left), bad requests,
slow and fast attachers, resume with ``gadgetpipe-from-seq``, GetGadgetInfo by name and
prefix, the legacy RunBuiltInGadget, three-node fan-out with one peer down, and the upstream-
style Go client attaching.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from api.cli_instances import open_attach
from api.client import GadgetClient
from api.ready import is_ready
from bench.peers import exec_loop_path, goclient_path
from pipeline._gen import gadget_service_pb2 as pb
from pipeline._gen import gadget_service_pb2_grpc as rpc
from tests.daemon import ROOT, DaemonProcess, instance_tracing
from tests.e2e.helpers import bpf_programs_of, info_fields, unique_binary
from tests.specdecode import field_value

pytestmark = pytest.mark.bpf

WARN = 3


# -- helpers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_instances(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config declaring no instances (the embedded default declares one), so a daemon's
    instances and BPF programs are the test's alone."""
    path = tmp_path_factory.mktemp("config") / "empty.yaml"
    path.write_text("instances: []\n")
    return path


@pytest.fixture(scope="module")
def node(no_instances: Path) -> Iterator[DaemonProcess]:
    """A daemon of this module's own, so instances never meet other tests' runs."""
    d = DaemonProcess(config=no_instances)
    d.start()
    try:
        yield d
    finally:
        d.close()


def create(c: GadgetClient, comm: str | None = None, name: str = "", buffer: int = 0,
           params: dict[str, str] | None = None, nodes: tuple[str, ...] = ()
           ) -> pb.GadgetInstance:
    values = dict(params or {})
    if comm is not None:
        values["operator.filter.filter"] = f"proc.comm=={comm}"
    resp = c.instances.CreateGadgetInstance(pb.CreateGadgetInstanceRequest(
        gadgetInstance=pb.GadgetInstance(
            name=name, tags=[""], nodes=list(nodes),
            gadgetConfig=pb.GadgetRunRequest(imageName="trace_exec", paramValues=values,
                                             version=1)),
        eventBufferLength=buffer))
    assert resp.result == 0
    gi: pb.GadgetInstance = resp.gadgetInstance
    return gi


def wait_ready(c: GadgetClient, ref: str, timeout: float = 90.0) -> pb.GadgetInfo:
    """Until the instance traces (its ready event on an attach stream); GetGadgetInfo with
    flag 1 first fails with the instance's error if its start failed."""
    return instance_tracing(c, ref, timeout)


def run_binary(binary: Path, times: int) -> None:
    for _ in range(times):
        subprocess.run([str(binary)], check=True)


@dataclass
class Attached:
    """An attach stream read in a thread: payload seqs and elements, logs, metadata."""

    info: pb.GadgetInfo | None = None
    records: list[tuple[int, pb.DataElement, str]] = field(default_factory=list)
    logs: list[tuple[int, str]] = field(default_factory=list)
    """Log events but the ready one."""
    ready: threading.Event = field(default_factory=threading.Event)
    error: grpc.RpcError | None = None
    ended: threading.Event = field(default_factory=threading.Event)
    base: int = 0
    _stream: Any = None
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, n: int, timeout: float = 60.0) -> None:
        with self._cond:
            self._cond.wait_for(lambda: len(self.records) >= n or self.ended.is_set(), timeout)
        assert len(self.records) >= n, (len(self.records), n, self.logs, self.error)

    def settle(self, quiet: float = 0.7) -> None:
        """Waits until nothing arrived for ``quiet`` seconds. Not a readiness wait (callers
        have waited for the records they expect): a quiet period in which a record that should
        not exist (a duplicate, a replayed one) would show up before the exact assertions."""
        last = -1
        while last != len(self.records) + len(self.logs):
            last = len(self.records) + len(self.logs)
            time.sleep(quiet)

    def cancel(self) -> None:
        self._stream.cancel()
        self.ended.wait(10)

    @property
    def seqs(self) -> list[int]:
        return [s for s, _, _ in self.records]


def attach(c: GadgetClient, instance_id: str, from_seq: int | None = None) -> Attached:
    stream, stub = open_attach(c, instance_id, from_seq)
    out = Attached(_stream=stream)

    def read() -> None:
        try:
            for ev in stream.raw():
                with out._cond:
                    if ev.type == 4:
                        out.info = pb.GadgetInfo.FromString(ev.payload)
                        assert stub.call is not None
                        out.base = stub.call.seq_base()
                    elif ev.type == 0:
                        assert out.info is not None, "payload before GadgetInfo"
                        d = pb.GadgetData.FromString(ev.payload)
                        out.records.append((ev.seq, d.data, d.node))
                    elif is_ready(ev.type >> 16, ev.payload.decode()):
                        out.ready.set()
                    elif ev.type >= 1 << 16:
                        out.logs.append((ev.type >> 16, ev.payload.decode()))
                    else:
                        raise AssertionError(f"unexpected event type {ev.type}")
                    out._cond.notify_all()
        except grpc.RpcError as e:
            out.error = e
        finally:
            out.ended.set()
            with out._cond:
                out._cond.notify_all()

    threading.Thread(target=read, daemon=True).start()
    return out


def comms(a: Attached) -> set[bytes]:
    assert a.info is not None
    f = info_fields(a.info, "exec")["proc.comm"]
    return {field_value(f, el) for _, el, _ in a.records}


def instance_file(state_dir: Path, instance_id: str) -> Path:
    return state_dir / "gadgets" / f"{instance_id}.gadget"


def wait_no_bpf(pid: int, timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    progs = bpf_programs_of(pid)
    while progs and time.monotonic() < deadline:
        time.sleep(0.2)
        progs = bpf_programs_of(pid)
    return progs


# -- create, restart, replay, remove -------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_instance_survives_a_daemon_restart_replays_and_is_removed_without_a_trace(
        tmp_path: Path, sig: signal.Signals, no_instances: Path) -> None:
    state = tmp_path / "state"
    binary = unique_binary(tmp_path)
    comm = binary.name[:15]
    d = DaemonProcess(state_dir=state, config=no_instances).start()
    try:
        with d.client() as c:
            gi = create(c, comm, name="survivor")
            info = wait_ready(c, "survivor")
            assert (info.id, info.name) == (gi.id, "survivor")
            run_binary(binary, 3)
            a = attach(c, gi.id)
            a.wait_for(3)
            a.settle()
            a.cancel()
            assert a.seqs == [1, 2, 3]
            assert comms(a) == {comm.encode()}
            assert a.info is not None and (a.info.id, a.info.name) == (gi.id, "survivor")
    finally:
        d.stop(sig)
    assert instance_file(state, gi.id).exists()

    d2 = DaemonProcess(state_dir=state, config=no_instances).start()
    try:
        assert d2.proc is not None
        pid = d2.proc.pid
        with d2.client() as c:
            [back] = c.instances.ListGadgetInstances(pb.ListGadgetInstancesRequest()
                                                     ).gadgetInstances
            assert (back.id, back.name, back.gadgetConfig.imageName) == \
                (gi.id, "survivor", "trace_exec")
            wait_ready(c, gi.id[:10])
            [back] = c.instances.ListGadgetInstances(pb.ListGadgetInstancesRequest()
                                                     ).gadgetInstances
            assert back.state.status == pb.StatusRunning
            # The buffer is in memory: after a restart it holds what happened since.
            run_binary(binary, 2)
            a = attach(c, gi.id)
            a.wait_for(2)
            a.settle()
            assert a.seqs == [1, 2]
            assert len(bpf_programs_of(pid)) >= 4
            resp = c.instances.RemoveGadgetInstance(pb.GadgetInstanceId(id=gi.id))
            assert (resp.result, resp.message) == (0, "")
            a.ended.wait(10)
            assert a.ended.is_set() and a.error is None  # removal ends attach streams with OK
            assert wait_no_bpf(pid) == []
            assert not instance_file(state, gi.id).exists()
            assert not c.instances.ListGadgetInstances(pb.ListGadgetInstancesRequest()
                                                       ).gadgetInstances
    finally:
        d2.close()


# -- bad requests -------------------------------------------------------------------------------

ID = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(("instance", "buffer", "code", "text"), [
    ({"id": "not-hex"}, 0, grpc.StatusCode.INVALID_ARGUMENT, "invalid gadget instance id: not-hex"),
    ({"id": ID + "0"}, 0, grpc.StatusCode.INVALID_ARGUMENT, "invalid gadget instance id"),
    ({"name": "UPPER"}, 0, grpc.StatusCode.INVALID_ARGUMENT,
     "invalid gadget instance name: UPPER"),
    ({"name": "x" * 33}, 0, grpc.StatusCode.INVALID_ARGUMENT, "invalid gadget instance name"),
    ({"name": "a/b"}, 0, grpc.StatusCode.INVALID_ARGUMENT, "invalid gadget instance name: a/b"),
    ({"image": "no_such_gadget"}, 0, grpc.StatusCode.NOT_FOUND, "unknown gadget"),
    ({"version": 2}, 0, grpc.StatusCode.INVALID_ARGUMENT, "expected version to be 1, got 2"),
    ({"params": {"operator.oci.ebpf.pid": "-5"}}, 0, grpc.StatusCode.INVALID_ARGUMENT,
     "operator.oci.ebpf.pid"),
    ({"params": {"operator.oci.ebpf.typo": "1"}}, 0, grpc.StatusCode.INVALID_ARGUMENT,
     "operator.oci.ebpf.typo"),
    ({"params": {"operator.filter.filter": "proc.comm>>"}}, 0,
     grpc.StatusCode.INVALID_ARGUMENT, "operator.filter.filter"),
    ({"nodes": ["elsewhere"]}, 0, grpc.StatusCode.INVALID_ARGUMENT, "unknown node 'elsewhere'"),
    ({}, -1, grpc.StatusCode.INVALID_ARGUMENT, "eventBufferLength"),
    ({"timeout": -1}, 0, grpc.StatusCode.INVALID_ARGUMENT, "timeout"),
])
def test_bad_create_requests_are_refused_with_the_reason_and_nothing_is_kept(
        node: DaemonProcess, instance: dict[str, Any], buffer: int, code: grpc.StatusCode,
        text: str) -> None:
    req = pb.CreateGadgetInstanceRequest(eventBufferLength=buffer, gadgetInstance=pb.GadgetInstance(
        id=instance.get("id", ""), name=instance.get("name", ""), nodes=instance.get("nodes", []),
        gadgetConfig=pb.GadgetRunRequest(imageName=instance.get("image", "trace_exec"),
                                         version=instance.get("version", 1),
                                         timeout=instance.get("timeout", 0),
                                         paramValues=instance.get("params", {}))))
    with node.client() as c:
        with pytest.raises(grpc.RpcError) as e:
            c.instances.CreateGadgetInstance(req)
        assert e.value.code() == code
        assert text in (e.value.details() or "")
        assert not c.instances.ListGadgetInstances(pb.ListGadgetInstancesRequest()
                                                   ).gadgetInstances
    assert not list((node.state_dir / "gadgets").glob("*.gadget"))


def test_duplicates_get_remove_and_errors_follow_the_spec(node: DaemonProcess) -> None:
    with node.client() as c:
        gi = create(c, name="dup", params={"operator.oci.ebpf.comm": "bad;comm"})
        try:
            for dup_id, dup_name, text in (
                    (gi.id, "", f'gadget with id "{gi.id}" already exists'),
                    ("", "dup", 'gadget with name "dup" already exists')):
                with pytest.raises(grpc.RpcError) as e:
                    c.instances.CreateGadgetInstance(pb.CreateGadgetInstanceRequest(
                        gadgetInstance=pb.GadgetInstance(
                            id=dup_id, name=dup_name, gadgetConfig=pb.GadgetRunRequest(
                                imageName="trace_exec", version=1))))
                assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
                assert e.value.details() == text
            # A start failure is the instance's state, not a Create failure
            # (docs/gadget-service.md §6.1).
            with pytest.raises(grpc.RpcError) as e:
                wait_ready(c, "dup")
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "operator.oci.ebpf.comm" in (e.value.details() or "")
            [listed] = c.instances.ListGadgetInstances(pb.ListGadgetInstancesRequest()
                                                       ).gadgetInstances
            assert listed.state.status == pb.StatusError
            assert "operator.oci.ebpf.comm" in listed.state.message
            got = c.instances.GetGadgetInstance(pb.GadgetInstanceId(id=gi.id))
            assert (got.name, got.state.status) == ("dup", pb.StatusError)
            with pytest.raises(grpc.RpcError) as e:
                list(attach_raw(c, gi.id))
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        finally:
            assert c.instances.RemoveGadgetInstance(pb.GadgetInstanceId(id=gi.id)).result == 0
        with pytest.raises(grpc.RpcError) as e:
            c.instances.GetGadgetInstance(pb.GadgetInstanceId(id=ID))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and ID in (e.value.details() or "")
        with pytest.raises(grpc.RpcError) as e:
            c.instances.GetGadgetInstance(pb.GadgetInstanceId(id="short"))
        assert "invalid gadget instance id: short" in (e.value.details() or "")
        # Remove of an unknown id is OK status with result 1 naming the id
        # (docs/gadget-service.md §6.2).
        resp = c.instances.RemoveGadgetInstance(pb.GadgetInstanceId(id=ID))
        assert resp.result == 1 and ID in resp.message
        with pytest.raises(grpc.RpcError) as e:
            c.instances.RemoveGadgetInstance(pb.GadgetInstanceId(id="short"))
        assert "invalid gadget instance id: short" in (e.value.details() or "")
        with pytest.raises(grpc.RpcError) as e:
            list(attach_raw(c, ID))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert e.value.details() == f"gadget {ID} not found"
        with pytest.raises(grpc.RpcError) as e:
            list(attach_raw(c, ID, version=2))
        assert e.value.details() == "expected version to be 1, got 2"


def attach_raw(c: GadgetClient, instance_id: str, version: int = 1) -> Iterator[pb.GadgetEvent]:
    req = pb.GadgetControlRequest(attachRequest=pb.GadgetAttachRequest(id=instance_id,
                                                                       version=version))
    return iter(c.gadgets.RunGadget(iter([req]), timeout=30))


# -- attachers ----------------------------------------------------------------------------------


def test_slow_attacher_loses_only_its_own_events_and_is_told(node: DaemonProcess,
                                                              tmp_path: Path) -> None:
    binary = unique_binary(tmp_path)
    total = 4000
    with node.client() as c:
        # A queue shorter than the run (the default holds far more than 4000 packets).
        gi = create(c, binary.name[:15], name="slowfast",
                    params={"operator.grpc.attach-queue": "256"})
        try:
            wait_ready(c, gi.id)
            fast = attach(c, gi.id)
            # The slow client has a connection of its own, with no BDP probing, so HTTP/2 flow
            # control stops the daemon's writes soon after it stops reading.
            slow_chan = grpc.insecure_channel(node.address, options=[
                ("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 64 << 20)])
            stub_class: Any = rpc.GadgetManagerStub
            slow_stub = stub_class(slow_chan)
            slow_call = slow_stub.RunGadget(iter([pb.GadgetControlRequest(
                attachRequest=pb.GadgetAttachRequest(id=gi.id, version=1))]))
            first = next(iter(slow_call))
            assert first.type == 4
            t0 = time.monotonic()
            subprocess.run([str(exec_loop_path()), "-p", str(binary), str(total), "2000"],
                           check=True, capture_output=True)
            fast.wait_for(total, timeout=120)
            elapsed = time.monotonic() - t0
            fast.settle()
            assert fast.seqs == list(range(1, total + 1))  # nothing lost, no gap
            assert not [m for s, m in fast.logs if s <= WARN]

            # Now read the slow one: what it got, plus the gaps, plus what it was told.
            got: list[int] = []
            told = 0
            deadline = time.monotonic() + 30
            for ev in slow_call:
                if ev.type == 0:
                    got.append(ev.seq)
                elif ev.type >> 16 == WARN:
                    text = ev.payload.decode()
                    assert "dropped" in text
                    told += int(text.split("too slow: ")[1].split(" ")[0])
                if len(got) + told >= total or time.monotonic() > deadline:
                    break
            slow_call.cancel()
            slow_chan.close()
            assert told > 0, "the slow client was never told"
            assert len(got) + told == total
            assert got == sorted(got) and len(set(got)) == len(got)
            gaps = sum(b - a - 1 for a, b in itertools.pairwise(got))
            assert gaps + (total - got[-1]) + (got[0] - 1) == told
            print(f"\nattach: {total} live records to the fast client in {elapsed:.2f}s; "
                  f"slow client got {len(got)}, lost {told}")
            fast.cancel()
        finally:
            c.instances.RemoveGadgetInstance(pb.GadgetInstanceId(id=gi.id))


def test_resume_with_from_seq_replays_without_duplicates(node: DaemonProcess,
                                                         tmp_path: Path) -> None:
    binary = unique_binary(tmp_path)
    with node.client() as c:
        gi = create(c, binary.name[:15], name="resumer", buffer=4)
        try:
            wait_ready(c, gi.id)
            run_binary(binary, 3)
            a = attach(c, gi.id)
            a.wait_for(3)
            a.settle()
            a.cancel()
            assert a.seqs == [1, 2, 3] and a.base == 0
            last_instance_seq = a.seqs[-1] + a.base
            run_binary(binary, 2)  # instance seqs 4 and 5; the buffer now holds 2..5

            b = attach(c, gi.id, from_seq=last_instance_seq + 1)
            b.wait_for(2)
            b.settle()
            b.cancel()
            assert b.seqs == [4, 5] and not b.logs

            old = attach(c, gi.id, from_seq=1)
            old.wait_for(4)
            old.settle()
            old.cancel()
            assert old.seqs == [2, 3, 4, 5]
            assert old.logs == [(WARN, "1 events from seq 1 on are no longer buffered "
                                       "(the buffer holds 4)")]

            ahead = attach(c, gi.id, from_seq=1000)
            ahead.wait_for(4)
            ahead.settle()
            ahead.cancel()
            assert ahead.seqs == [2, 3, 4, 5]
            [(severity, text)] = ahead.logs
            assert severity == WARN and "ahead of this instance" in text

            plain = attach(c, gi.id)
            plain.wait_for(4)
            plain.settle()
            plain.cancel()
            assert plain.seqs == [1, 2, 3, 4] and plain.base == 1  # instance seq = seq + base
        finally:
            c.instances.RemoveGadgetInstance(pb.GadgetInstanceId(id=gi.id))


def test_gadget_info_flag1_resolves_id_name_and_prefix(node: DaemonProcess) -> None:
    with node.client() as c:
        gi = create(c, "gp-nothing-here", name="infoby")
        try:
            for ref in (gi.id, "infoby", gi.id[:8]):
                info = wait_ready(c, ref)
                assert (info.id, info.name, info.imageName) == (gi.id, "infoby", "trace_exec")
                assert [d.name for d in info.dataSources] == ["exec"]
                assert info.dataSources[0].type == 1
            with pytest.raises(grpc.RpcError) as e:
                c.info("nosuch", instance=True)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert e.value.details() == "instance nosuch not found"
        finally:
            c.instances.RemoveGadgetInstance(pb.GadgetInstanceId(id=gi.id))


def test_upstream_go_client_attaches_counts_records_and_ends_ok_on_remove(
        node: DaemonProcess, tmp_path: Path) -> None:
    binary = unique_binary(tmp_path)
    with node.client() as c:
        gi = create(c, binary.name[:15], name="gopher")
        try:
            wait_ready(c, gi.id)
            run_binary(binary, 5)
            ours = attach(c, gi.id)
            ours.wait_for(5)
            # -v: the Go client prints log events, the ready one right after the GadgetInfo.
            go = subprocess.Popen([str(goclient_path()), "-addr", node.address, "-attach", gi.id,
                                   "-quiet", "-v"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
            assert go.stderr is not None
            line = go.stderr.readline()
            assert line.startswith("log[4]: gadget tracing"), line
            run_binary(binary, 3)
            ours.wait_for(8)  # published: the Go client's queue has them or they are sent
            ours.cancel()
        finally:
            c.instances.RemoveGadgetInstance(pb.GadgetInstanceId(id=gi.id))
        out, _ = go.communicate(timeout=30)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "OK", summary  # removal ends the attach stream with OK
    assert go.returncode == 0
    assert summary["records"] == 8 and summary["lost"] == 0
    assert (summary["first_seq"], summary["last_seq"]) == (1, 8)
    assert summary["early"] == summary["invalid"] == summary["unknown"] == 0
    assert summary["datasources"] == [{"id": 0, "name": "exec", "type": 1}]


def test_cli_detach_list_attach_and_rm(node: DaemonProcess, tmp_path: Path) -> None:
    binary = unique_binary(tmp_path)
    cli = [sys.executable, "-m", "api.cli"]
    remote = ["--remote-address", node.address]
    done = subprocess.run([*cli, "run", "trace_exec", "--detach", "--name", "clitest",
                           "--tag", "a,b", "-F", f"proc.comm=={binary.name[:15]}", *remote],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    out = done.stdout
    assert out.startswith('installed as "') and "clitest" in out
    assert done.stderr.strip() == "tracing", done.stderr  # Create answered once it traced
    instance_id = out.split('"')[1]
    with node.client() as c:
        wait_ready(c, "clitest")
        got = c.instances.GetGadgetInstance(pb.GadgetInstanceId(id=instance_id))
        assert list(got.tags) == ["a", "b"]
    listing = subprocess.run([*cli, "instances", "list", *remote], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    assert instance_id[:12] in listing and "clitest" in listing and "Running" in listing
    run_binary(binary, 2)
    att = subprocess.Popen([*cli, "attach", "clitest", "-o", "json", *remote], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [att.stdout.readline() for _ in range(2)] if att.stdout else []
    att.send_signal(signal.SIGINT)
    _, err = att.communicate(timeout=30)
    assert att.returncode == 0, err
    assert [json.loads(line)["proc"]["comm"] for line in lines] == [binary.name[:15]] * 2
    assert "--from-seq 3" in err
    rm = subprocess.run([*cli, "instances", "rm", instance_id[:10], *remote], cwd=ROOT,
                        capture_output=True, text=True, check=True).stdout
    assert rm.strip() == instance_id


# -- legacy -------------------------------------------------------------------------------------


class Legacy:
    """A RunBuiltInGadget call read in a thread; :meth:`stop` sends the stop request."""

    def __init__(self, c: GadgetClient, req: pb.BuiltInGadgetRunRequest) -> None:
        self._stop = threading.Event()
        self._done = threading.Event()
        self.events: list[pb.GadgetEvent] = []
        self.error: grpc.RpcError | None = None
        self._cond = threading.Condition()

        def requests() -> Iterator[pb.BuiltInGadgetControlRequest]:
            yield pb.BuiltInGadgetControlRequest(runRequest=req)
            self._stop.wait()
            yield pb.BuiltInGadgetControlRequest(stopRequest=pb.BuiltInGadgetStopRequest())
            self._done.wait(60)  # keep the send side open: half-close would mean stop too

        self._call = c.builtin.RunBuiltInGadget(requests(), timeout=180)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for ev in self._call:
                with self._cond:
                    self.events.append(ev)
                    self._cond.notify_all()
        except grpc.RpcError as e:
            self.error = e
        finally:
            self._done.set()
            with self._cond:
                self._cond.notify_all()

    def records(self) -> list[dict[str, Any]]:
        with self._cond:
            return [json.loads(e.payload) for e in self.events if e.type == 0]

    def logs(self) -> list[str]:
        return [e.payload.decode() for e in self.events if e.type >= 1 << 16]

    def wait(self, pred: Any, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred(self.records()) and not self._done.is_set():
            assert time.monotonic() < deadline, (len(self.records()), self.logs())
            with self._cond:
                self._cond.wait(0.2)

    def wait_logs(self, pred: Any, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred(self.logs()) and not self._done.is_set():
            assert time.monotonic() < deadline, self.logs()
            with self._cond:
                self._cond.wait(0.2)

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self._done.wait(timeout)
        self._thread.join(5)
        if self.error is not None:
            raise self.error


def test_legacy_trace_exec_sends_job_id_json_records_and_a_result(node: DaemonProcess,
                                                                  tmp_path: Path) -> None:
    binary = unique_binary(tmp_path)
    comm = binary.name[:15]
    with node.client() as c:
        run = Legacy(c, pb.BuiltInGadgetRunRequest(
            gadgetCategory="trace", gadgetName="exec", logLevel=4,
            params={"ignore-failed": "true", "operator.filter.filter": f"proc.comm=={comm}",
                    "operator.LocalManager.host": "true", "columns-width": "1"}))
        run.wait_logs(lambda logs: any(is_ready(4, m) for m in logs))
        for _ in range(3):
            subprocess.run([str(binary), "one", "two"], check=True)
        run.wait(lambda r: len(r) >= 3)
        run.stop()
    events, records = run.events, run.records()
    assert events[0].type == 3 and uuid.UUID(events[0].payload.decode())
    assert all(e.type != 4 for e in events)  # no GadgetInfo on the legacy API
    assert {r["proc"]["comm"] for r in records} == {comm}
    # file: empty without paths=true, as upstream's
    assert all(r["file"] == "" and r["args"] == f"{binary}\u00a0one\u00a0two"
               for r in records)
    seqs = [e.seq for e in events if e.type == 0]
    assert seqs == list(range(1, len(seqs) + 1))
    assert "ignoring unknown parameter 'columns-width'" in run.logs()
    [result] = [e for e in events if e.type == 1]
    summary = json.loads(result.payload)
    assert summary == {"node": summary["node"], "records": len(records), "error": ""}
    assert {r["node"] for r in records} == {summary["node"]}
    assert events[-1].type == 1


def test_legacy_run_logs_the_clients_params_with_secrets_redacted(node: DaemonProcess,
                                                                    tmp_path: Path) -> None:
    """Sink settings can carry credentials (an OTLP header): a secret one reads <redacted>,
    never its value, to the client and in the daemon log; the params are logged at debug level
    as the client sent them."""
    binary = unique_binary(tmp_path)
    comm = binary.name[:15]
    secret = f"s3cr3t-{uuid.uuid4().hex[:8]}"
    with node.client() as c:
        run = Legacy(c, pb.BuiltInGadgetRunRequest(
            gadgetCategory="trace", gadgetName="exec", logLevel=5,
            params={"operator.filter.filter": f"proc.comm=={comm}",
                    "operator.otel-logs.headers": f"authorization=Bearer {secret}"}))
        run.wait_logs(lambda logs: any(is_ready(4, m) for m in logs))
        subprocess.run([str(binary)], check=True)
        run.wait(lambda r: len(r) >= 1)
        run.stop()
    logs = run.logs()
    assert f"param operator.filter.filter: proc.comm=={comm}" in logs
    assert "param operator.otel-logs.headers: <redacted>" in logs, logs
    assert not [m for m in logs if secret in m], logs
    # Only what the client sent: not the resolved defaults (daemon-wide sink settings).
    assert not [m for m in logs if m.startswith("param operator.kafka.")], logs
    assert secret not in node.log()
    # The ready event came before the first record.
    kinds = [e.type for e in run.events if e.type == 0 or is_ready(e.type >> 16,
                                                                    e.payload.decode())]
    assert kinds[0] == 4 << 16 and 0 in kinds


def test_legacy_unknown_gadget_and_first_message(node: DaemonProcess) -> None:
    with node.client() as c:
        run = Legacy(c, pb.BuiltInGadgetRunRequest(gadgetCategory="trace",
                                                   gadgetName="nosuch"))
        with pytest.raises(grpc.RpcError) as e:
            run.stop()
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "gadget not found: trace/nosuch" in (e.value.details() or "")
        bad = c.builtin.RunBuiltInGadget(iter([pb.BuiltInGadgetControlRequest(
            stopRequest=pb.BuiltInGadgetStopRequest())]))
        with pytest.raises(grpc.RpcError) as e:
            list(bad)
        assert e.value.details() == "expected first control message to be gadget run request"


# -- several nodes ------------------------------------------------------------------------------

_LAUNCH = """
import asyncio, json, logging, sys
from pathlib import Path
from api.daemon import Daemon, DaemonSettings
cfg = json.loads(sys.argv[1])
logging.basicConfig(level=logging.DEBUG,
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
settings = DaemonSettings(listen=(cfg["listen"],), state_dir=Path(cfg["state_dir"]),
                          metrics_listen=None, node=cfg["node"], nodes=cfg["nodes"])
asyncio.run(Daemon(settings).run_until_signalled())
"""


class NodeDaemon(DaemonProcess):
    """A daemon with a node name and peers (DaemonSettings has no CLI flag for peers)."""

    def __init__(self, name: str, nodes: dict[str, str] | None = None) -> None:
        super().__init__()
        self.name = name
        self.nodes = nodes or {}

    def start(self, timeout: float = 60.0) -> NodeDaemon:
        cfg = {"listen": self.address, "state_dir": str(self.state_dir), "node": self.name,
               "nodes": self.nodes}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, json.dumps(cfg)], cwd=ROOT,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if self.socket.exists():
                try:
                    GadgetClient(self.address, connect_timeout=1).close()
                    return self
                except Exception:
                    pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"daemon did not listen within {timeout}s:\n{self.log()}")


@pytest.fixture(scope="module")
def three_nodes() -> Iterator[tuple[NodeDaemon, NodeDaemon, NodeDaemon]]:
    b = NodeDaemon("node-b").start()
    c = NodeDaemon("node-c").start()
    a = NodeDaemon("node-a", {"node-b": b.address, "node-c": c.address,
                              "node-d": "unix:///nonexistent/gadgetpipe-down.sock"}).start()
    try:
        yield a, b, c
    finally:
        for d in (a, b, c):
            d.close()


def test_legacy_fan_out_merges_three_nodes_and_names_the_one_down(
        three_nodes: tuple[NodeDaemon, NodeDaemon, NodeDaemon], tmp_path: Path) -> None:
    a, _, _ = three_nodes
    sentinel = unique_binary(tmp_path, "gps")
    load = unique_binary(tmp_path, "gpl")
    total = 300
    nodes = {"node-a", "node-b", "node-c"}
    with a.client() as c:
        run = Legacy(c, pb.BuiltInGadgetRunRequest(
            gadgetCategory="trace", gadgetName="exec", fanOut=True, logLevel=4,
            params={"operator.filter.filter": f"proc.comm~^({sentinel.name}|{load.name})$"}))
        # One ready event once every node traces (node-d cannot be reached: it does not count).
        run.wait_logs(lambda logs: any(is_ready(4, m) for m in logs))
        subprocess.run([str(sentinel)], check=True)
        run.wait(lambda rs: {r["node"] for r in rs} == nodes)
        t0 = time.monotonic()
        subprocess.run([str(exec_loop_path()), "-p", str(load), str(total)], check=True,
                       capture_output=True)
        run.wait(lambda rs: sum(r["proc"]["comm"] == load.name[:15] for r in rs) >= 3 * total)
        elapsed = time.monotonic() - t0
        run.stop()
    events, records = run.events, run.records()
    by_node: dict[str, int] = {}
    for r in records:
        if r["proc"]["comm"] == load.name[:15]:
            by_node[r["node"]] = by_node.get(r["node"], 0) + 1
    assert by_node == {n: total for n in nodes}
    assert any("node-d" in m and "unavailable" in m for m in run.logs()), run.logs()
    seqs = [e.seq for e in events if e.type == 0]
    assert seqs == list(range(1, len(seqs) + 1))
    results = {json.loads(e.payload)["node"]: json.loads(e.payload)
               for e in events if e.type == 1}
    assert set(results) == {*nodes, "node-d"}
    assert results["node-d"]["error"] and not results["node-b"]["error"]
    assert sum(results[n]["records"] for n in nodes) == len(records)
    print(f"\nlegacy fan-out: {3 * total} records from 3 nodes in {elapsed:.2f}s "
          f"({3 * total / elapsed:.0f}/s merged)")


def test_multi_node_instance_merges_peers_tags_nodes_and_removes_everywhere(
        three_nodes: tuple[NodeDaemon, NodeDaemon, NodeDaemon], tmp_path: Path) -> None:
    a, b, c3 = three_nodes
    binary = unique_binary(tmp_path)
    with a.client() as c:
        gi = create(c, binary.name[:15], name="everywhere",
                    nodes=("node-a", "node-b", "node-c", "node-d"))
        try:
            wait_ready(c, gi.id)
            # Tracing on node-a means tracing on every peer that is up: the peers' attach
            # streams brought their ready events.
            for peer in (b, c3):
                with peer.client() as pc:
                    wait_ready(pc, gi.id)  # created there with the same id
            run_binary(binary, 2)
            att = attach(c, gi.id)
            att.wait_for(6)
            att.settle()
            assert sorted(n for _, _, n in att.records) == \
                ["node-a", "node-a", "node-b", "node-b", "node-c", "node-c"]
            assert att.seqs == list(range(1, 7))
            assert comms(att) == {binary.name[:15].encode()}
            assert any("node-d" in m for s, m in att.logs if s == WARN), att.logs
            [listed] = c.instances.ListGadgetInstances(pb.ListGadgetInstancesRequest()
                                                       ).gadgetInstances
            assert listed.state.status == pb.StatusRunning
            assert "node node-d" in listed.state.message
            att.cancel()
        finally:
            resp = c.instances.RemoveGadgetInstance(pb.GadgetInstanceId(id=gi.id))
        assert resp.result == 0
        assert "node-d" in resp.message  # could not be reached to remove it there
    for peer in (b, c3):
        with peer.client() as pc:
            assert not pc.instances.ListGadgetInstances(pb.ListGadgetInstancesRequest()
                                                        ).gadgetInstances
