"""trace_exec from the kernel to a gRPC client, decoded only from the announced field table."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from api.client import RunStream
from pipeline._gen import gadget_service_pb2 as pb
from tests.daemon import DaemonProcess
from tests.e2e.gadget_run import Record, collect
from tests.e2e.helpers import bpf_programs_of, info_fields, keep_running, unique_binary
from tests.e2e.upstream_fields import upstream_field_diff
from tests.specdecode import field_value

pytestmark = pytest.mark.bpf


def records(stream: RunStream, info_holder: dict[str, Any], want: int,
            timeout: float = 30.0) -> list[tuple[int, pb.DataElement]]:
    """Waits until the gadget traces (its ready event), then reads raw events, decoding
    payloads with the spec decoder, until ``want`` records."""
    got: list[tuple[int, pb.DataElement]] = []
    if not stream.ready:
        for ev in stream.wait_ready():
            assert ev.type != 0, "a record before the ready event"
        assert stream.info is not None
        info_holder["info"] = stream.info
        info_holder["types"] = {d.id: d.type for d in stream.info.dataSources}
    deadline = time.monotonic() + timeout
    for ev in stream.raw():
        if ev.type == 4:
            info_holder["info"] = pb.GadgetInfo.FromString(ev.payload)
            info_holder["types"] = {d.id: d.type for d in info_holder["info"].dataSources}
        elif ev.type == 0:
            assert "info" in info_holder, "payload before GadgetInfo"
            if info_holder["types"][ev.dataSourceID] == 2:
                els = list(pb.GadgetDataArray.FromString(ev.payload).dataArray)
            else:
                els = [pb.GadgetData.FromString(ev.payload).data]
            got.extend((ev.seq, el) for el in els)
        elif ev.type == 2:
            raise AssertionError("a type-2 'done' event must never be sent")
        if len(got) >= want or time.monotonic() > deadline:
            break
    return got


def test_exec_reaches_the_client_with_comm_pid_and_file(daemon: DaemonProcess,
                                                         tmp_path: Path) -> None:
    binary = unique_binary(tmp_path)
    comm = binary.name[:15]
    holder: dict[str, Any] = {}
    with daemon.client() as c:
        stream = c.run("trace_exec", {"operator.filter.filter": f"proc.comm=={comm}"})
        with keep_running([str(binary), "first-arg", "second"]) as pids:
            got = records(stream, holder, 1)
        stream.stop()
        list(stream.raw())  # the server ends the stream with OK after a stop
    assert got, "no exec record arrived"
    fields = info_fields(holder["info"], "exec")
    seq, el = got[0]
    assert seq >= 1
    assert field_value(fields["proc.comm"], el) == comm.encode()
    assert field_value(fields["proc.pid"], el) in pids
    assert field_value(fields["proc.parent.pid"], el) == os.getpid()
    assert field_value(fields["file"], el) == b""  # upstream's: empty unless paths=true
    assert field_value(fields["error_raw"], el) == 0
    assert field_value(fields["args"], el) == \
        f"{binary}\u00a0first-arg\u00a0second".encode()
    assert field_value(fields["args_count"], el) == 3
    ts = field_value(fields["timestamp_raw"], el)
    assert abs(ts / 1e9 - time.time()) < 60, "timestamp is not wall-clock"


def by_args(records: list[Record], first: str) -> list[Record]:
    return [r for r in records if r["args"].split("\u00a0".encode())[0] == first.encode()]


def test_kernel_fields_and_readable_fields_of_a_real_exec(daemon: DaemonProcess,
                                                         tmp_path: Path) -> None:
    """What upstream's program collects beyond the process, and the derived texts, for a
    binary the test runs, with paths=true: cwd, file and executable paths, the parent's
    executable, device, inode and change times as stat() shows them."""
    binary = unique_binary(tmp_path)
    cwd = tmp_path / "work"
    cwd.mkdir()

    def trigger() -> None:
        subprocess.run([str(binary), "with-paths"], cwd=cwd, check=True)

    _, records = collect(daemon, "trace_exec", {"operator.oci.ebpf.pid": "",
                                                "operator.oci.ebpf.comm": binary.name[:15],
                                                "operator.oci.ebpf.paths": "true"},
                         trigger, lambda rs: bool(by_args(rs, str(binary))))
    r = by_args(records, str(binary))[0]
    st = binary.stat()
    parent_exe = Path(sys.executable).resolve()
    assert r["cwd"] == str(cwd.resolve()).encode()
    assert r["exepath"] == r["file"] == str(binary.resolve()).encode()
    assert r["parent_exepath"] == str(parent_exe).encode()
    assert (r["dev_major"], r["dev_minor"]) == (os.major(st.st_dev), os.minor(st.st_dev))
    assert r["inode"] == st.st_ino
    assert r["ctime"] == r["fctime"] == st.st_ctime_ns
    assert r["pctime"] == parent_exe.stat().st_ctime_ns
    assert r["from_rootfs"] is True and r["file_from_rootfs"] is True  # the host's root
    assert not r["upper_layer"] and not r["fupper_layer"] and not r["pupper_layer"]
    assert r["error_raw"] == 0 and r["error"] == b""
    assert r["proc.creds.user"] == b"root" and r["proc.creds.group"] == b"root"
    loginuid = int(Path("/proc/self/loginuid").read_text())
    assert r["loginuid"] == loginuid
    assert r["loginuser"] == (b"root" if loginuid == 0 else f"uid:{loginuid}".encode())
    when = dt.datetime.fromisoformat(r["timestamp"].decode()[:26] + "+00:00")
    assert abs(when.timestamp() - r["timestamp_raw"] / 1e9) < 1e-3


def test_failed_exec_names_its_errno_and_leaves_the_image_fields_unset(
        daemon: DaemonProcess, tmp_path: Path) -> None:
    script = tmp_path / "gp-noexec"
    script.write_text("not an executable format\n")
    script.chmod(0o755)
    missing = tmp_path / "gp-missing"

    def trigger() -> None:
        for path in (script, missing):
            # The exec fails in the forked child, after the fork: it is the child's record.
            with contextlib.suppress(OSError):
                subprocess.run([str(path), "failing"], check=False)

    _, records = collect(daemon, "trace_exec", {"operator.filter.filter":
                                                f"proc.parent.pid=={os.getpid()}",
                                                "operator.oci.ebpf.ignore-failed": "false"},
                         trigger, lambda rs: bool(by_args(rs, str(script)) and
                                                  by_args(rs, str(missing))))
    noexec, nofile = by_args(records, str(script))[0], by_args(records, str(missing))[0]
    assert noexec["error_raw"] == errno.ENOEXEC and noexec["error"] == b"ENOEXEC"
    assert nofile["error_raw"] == errno.ENOENT and nofile["error"] == b"ENOENT"
    for r in (noexec, nofile):
        assert r["ctime"] == r["pctime"] == 0 and not r["from_rootfs"]
        assert r["file"] == r["exepath"] == b""  # paths=false


def test_tty_of_a_process_with_a_controlling_terminal(daemon: DaemonProcess,
                                                      tmp_path: Path) -> None:
    binary = unique_binary(tmp_path)

    def trigger() -> None:
        # script(1) runs the command on a new pseudo terminal, its controlling terminal.
        subprocess.run(["script", "-qec", f"{binary} on-a-tty", "/dev/null"], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    _, records = collect(daemon, "trace_exec", {"operator.oci.ebpf.comm": binary.name[:15]},
                         trigger, lambda rs: bool(by_args(rs, str(binary))))
    r = by_args(records, str(binary))[0]
    assert r["tty_major"] == 136  # Unix98 pseudo terminal slaves (pts driver, minor_start 0)
    assert r["tty_minor"] == r["tty"] >= 0


def test_announces_every_field_upstream_does(daemon: DaemonProcess) -> None:
    diff = upstream_field_diff("trace_exec", daemon)
    assert not diff.sources_only_upstream and not diff.sources_only_ours, diff.report()
    d = diff.sources["exec"]
    # k8s.* and runtime.* come from the container enrichment (pipeline/operators/enrich.py).
    missing = [n for n in d.only_upstream if not n.startswith(("k8s", "runtime"))]
    assert not missing and not d.only_ours, diff.report()
    assert not d.kinds and not d.flags and not d.annotations, diff.report()


def test_filter_on_comm_passes_matching_and_drops_others(daemon: DaemonProcess,
                                                          tmp_path: Path) -> None:
    wanted = unique_binary(tmp_path, "gpa")
    other = unique_binary(tmp_path, "gpb")
    holder: dict[str, Any] = {}
    with daemon.client() as c:
        stream = c.run("trace_exec", {
            "operator.filter.filter": f"proc.comm~^(gpa|gpb),proc.comm=={wanted.name[:15]}"})
        with keep_running([str(other)], [str(wanted)]):
            got = records(stream, holder, 3)
        stream.stop()
        list(stream.raw())
    fields = info_fields(holder["info"], "exec")
    comms = {field_value(fields["proc.comm"], el) for _, el in got}
    assert comms == {wanted.name[:15].encode()}


def test_kernel_side_comm_param_filters_in_bpf(daemon: DaemonProcess, tmp_path: Path) -> None:
    wanted = unique_binary(tmp_path)
    holder: dict[str, Any] = {}
    with daemon.client() as c:
        stream = c.run("trace_exec", {"operator.oci.ebpf.comm": wanted.name[:15],
                                      "operator.grpc.batch-max": "64"})
        with keep_running(["/bin/true"], [str(wanted)]):
            got = records(stream, holder, 2)
        stream.stop()
        list(stream.raw())
    fields = info_fields(holder["info"], "exec")
    assert holder["info"].dataSources[0].type == 2  # batched packets were asked for
    assert {field_value(fields["proc.comm"], el) for _, el in got} == {wanted.name[:15].encode()}


def test_stop_request_ends_the_stream_with_ok_and_no_done_event(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        stream = c.run("trace_exec")
        events = []
        timer = threading.Timer(1.0, stream.stop)
        timer.start()
        events = list(stream.raw())
        timer.join()
    assert events[0].type == 4
    assert all(e.type != 2 for e in events)


def test_timeout_ends_the_run_on_its_own(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        t0 = time.monotonic()
        events = list(c.run("trace_exec", timeout_s=1.0).raw())
        elapsed = time.monotonic() - t0
    assert events and events[0].type == 4
    assert 0.9 < elapsed < 20


def test_vanished_client_frees_the_bpf_programs(daemon: DaemonProcess, tmp_path: Path) -> None:
    assert daemon.proc is not None
    pid = daemon.proc.pid
    before = len(bpf_programs_of(pid))
    binary = unique_binary(tmp_path)
    with daemon.client() as c:
        stream = c.run("trace_exec", {"operator.filter.filter": f"proc.comm=={binary.name[:15]}"})
        with keep_running([str(binary)]):
            assert records(stream, {}, 1)
        assert len(bpf_programs_of(pid)) >= before + 4  # four tracepoints attached
        stream.cancel()  # the client goes away without a stop
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(bpf_programs_of(pid)) > before:
        time.sleep(0.2)
    assert len(bpf_programs_of(pid)) == before


@pytest.mark.parametrize(("image", "params", "version", "code", "text"), [
    ("no_such_gadget", {}, 1, grpc.StatusCode.NOT_FOUND, "unknown gadget 'no_such_gadget'"),
    ("trace_exec", {"operator.oci.ebpf.nosuch": "1"}, 1, grpc.StatusCode.INVALID_ARGUMENT,
     "operator.oci.ebpf.nosuch"),
    ("trace_exec", {"operator.oci.ebpf.pid": "abc"}, 1, grpc.StatusCode.INVALID_ARGUMENT,
     "operator.oci.ebpf.pid"),
    ("trace_exec", {"operator.filter.filter": "proc.comm>>"}, 1,
     grpc.StatusCode.INVALID_ARGUMENT, "operator.filter.filter"),
    ("trace_exec", {"operator.filter.filter": "nofield==1"}, 1,
     grpc.StatusCode.INVALID_ARGUMENT, "no field 'nofield'"),
    ("trace_exec", {}, 2, grpc.StatusCode.INVALID_ARGUMENT, "expected version to be 1, got 2"),
    ("trace_exec", {"operator.kafka.enable": "true", "operator.kafka.encoding": "xml"}, 1,
     grpc.StatusCode.INVALID_ARGUMENT, "operator.kafka.kafka-encoding"),
    ("trace_exec", {"operator.kafka.enbale": "true"}, 1, grpc.StatusCode.INVALID_ARGUMENT,
     "did you mean 'operator.kafka.kafka-enable'"),
])
def test_malformed_requests_get_a_clear_status_and_the_daemon_keeps_serving(
        daemon: DaemonProcess, image: str, params: dict[str, str], version: int,
        code: grpc.StatusCode, text: str) -> None:
    with daemon.client() as c:
        with pytest.raises(grpc.RpcError) as e:
            list(c.run(image, params, version=version).raw())
        assert e.value.code() == code
        assert text in (e.value.details() or "")
        info = c.info("trace_exec")
        assert [d.name for d in info.dataSources] == ["exec"]


def test_first_message_must_be_a_run_request(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        call = c.gadgets.RunGadget(iter([pb.GadgetControlRequest(
            stopRequest=pb.GadgetStopRequest())]))
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert "expected first control message to be gadget run request" in e.value.details()


def test_upstream_image_references_resolve(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        for ref in ("trace_exec", "ghcr.io/inspektor-gadget/gadget/trace_exec:latest",
                    "ghcr.io/inspektor-gadget/gadget/trace_exec:v0.55.0", "trace_exec:main"):
            assert c.info(ref).imageName == ref


def test_gadget_info_extra_info_has_source_fields_graph_and_readme(
        daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        info = c.info("trace_exec", {"operator.filter.filter": "proc.pid>1"}, extra=True)
    data = info.extraInfo.data
    assert b"TRACEPOINT_PROBE" in data["ebpf.source"].content
    assert data["ebpf.source"].contentType == "text/plain"
    assert data["gadgetpipe.fields"].contentType == "application/json"
    assert b'"proc.comm"' in data["gadgetpipe.fields"].content
    assert data["gadgetpipe.graph"].contentType == "text/mermaid"
    assert b"filter" in data["gadgetpipe.graph"].content
    assert data["gadgetpipe.readme"].contentType == "text/markdown"
    assert b"# trace_exec" in data["gadgetpipe.readme"].content
    params = {p.prefix + p.key for p in info.params}
    assert {"operator.oci.ebpf.pid", "operator.oci.ebpf.comm", "operator.filter.filter",
            "operator.grpc.batch-max"} <= params
