"""trace_open end to end: open, openat and openat2 of unique paths, success and ENOENT."""

from __future__ import annotations

import ctypes
import datetime as dt
import errno
import grp
import os
import pwd
import struct
import threading
import time
import uuid
from pathlib import Path

import pytest

from pipeline._gen import gadget_service_pb2 as pb
from tests.daemon import DaemonProcess
from tests.e2e.gadget_run import Record, collect
from tests.e2e.upstream_fields import upstream_field_diff

pytestmark = pytest.mark.bpf

SYS_OPENAT2 = 437  # x86_64
AT_FDCWD = -100


def openat2(path: Path, flags: int, mode: int) -> int:
    """openat2(2) through syscall(2): Python has no wrapper. Returns the fd; raises OSError."""
    libc = ctypes.CDLL(None, use_errno=True)
    how = struct.pack("<QQQ", flags, mode, 0)  # struct open_how {flags, mode, resolve}
    fd = libc.syscall(SYS_OPENAT2, AT_FDCWD, str(path).encode(), how, len(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return int(fd)


def by_name(records: list[Record], path: Path) -> list[Record]:
    return [r for r in records if r["fname"] == str(path).encode()]


def test_open_reports_path_flags_mode_fd_and_errors(daemon: DaemonProcess,
                                                    tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:12]
    created = tmp_path / f"gp-open-{tag}"
    via_openat2 = tmp_path / f"gp-openat2-{tag}"
    missing = tmp_path / f"gp-missing-{tag}"
    fds: list[int] = []
    tids: set[int] = set()

    def trigger() -> None:
        tids.add(threading.get_native_id())
        fd = os.open(created, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)  # openat
        fds.append(fd)
        os.close(fd)
        fd = openat2(via_openat2, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        with pytest.raises(FileNotFoundError):
            os.open(missing, os.O_RDONLY)

    def done(rs: list[Record]) -> bool:
        return all(by_name(rs, p) for p in (created, via_openat2, missing))

    _, records = collect(daemon, "trace_open", {"operator.oci.ebpf.pid": str(os.getpid())},
                         trigger, done)
    assert done(records), f"missing records; got {[r['fname'] for r in records][:20]}"

    ok = by_name(records, created)[0]
    assert ok["error_raw"] == 0
    assert ok["fd"] in fds
    assert ok["flags_raw"] & 0o3 == os.O_WRONLY
    assert ok["flags_raw"] & os.O_CREAT and ok["flags_raw"] & os.O_CLOEXEC
    assert ok["mode_raw"] == 0o640
    assert ok["proc.pid"] == os.getpid()
    assert ok["proc.tid"] in tids
    assert ok["proc.comm"]  # the test thread's name as the kernel keeps it
    assert abs(ok["timestamp_raw"] / 1e9 - time.time()) < 60, "timestamp is not wall-clock"

    two = by_name(records, via_openat2)[0]
    assert two["error_raw"] == 0 and two["fd"] >= 3
    assert two["flags_raw"] & 0o3 == os.O_RDWR and two["mode_raw"] == 0o600

    bad = by_name(records, missing)[0]
    assert bad["error_raw"] == errno.ENOENT == 2
    assert bad["fd"] == 0
    assert bad["flags_raw"] & 0o3 == os.O_RDONLY


def test_failed_param_keeps_only_failures(daemon: DaemonProcess, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:12]
    present = tmp_path / f"gp-present-{tag}"
    present.write_bytes(b"x")
    missing = tmp_path / f"gp-missing-{tag}"

    def trigger() -> None:
        os.close(os.open(present, os.O_RDONLY))
        with pytest.raises(FileNotFoundError):
            os.open(missing, os.O_RDONLY)

    _, records = collect(daemon, "trace_open", {"operator.oci.ebpf.pid": str(os.getpid()),
                                                "operator.oci.ebpf.failed": "true"},
                         trigger, lambda rs: len(by_name(rs, missing)) >= 3)
    assert len(by_name(records, missing)) >= 3
    assert not by_name(records, present), "a successful open passed failed=true"
    assert all(r["error_raw"] != 0 for r in records)


def test_readable_fields_carry_upstreams_texts(daemon: DaemonProcess, tmp_path: Path) -> None:
    """The derived fields of a real workload: errno name, flags and mode text, user and group
    names, the timestamp as text; ustack zeros and fpath empty without paths."""
    tag = uuid.uuid4().hex[:12]
    created = tmp_path / f"gp-open-{tag}"
    missing = tmp_path / f"gp-missing-{tag}"

    def trigger() -> None:
        os.close(os.open(created, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640))
        with pytest.raises(FileNotFoundError):
            os.open(missing, os.O_RDONLY | os.O_DIRECTORY)

    def done(rs: list[Record]) -> bool:
        return bool(by_name(rs, created) and by_name(rs, missing))

    info, records = collect(daemon, "trace_open", {"operator.oci.ebpf.pid": str(os.getpid())},
                            trigger, done)
    assert done(records)
    ok, bad = by_name(records, created)[0], by_name(records, missing)[0]
    assert ok["error"] == b"" and bad["error"] == b"ENOENT"
    assert ok["flags"] == b"O_WRONLY|O_CREAT|O_CLOEXEC"
    assert bad["flags"] == b"O_RDONLY|O_DIRECTORY|O_CLOEXEC"  # Python adds O_CLOEXEC
    assert ok["mode"] == b"-rw-r-----" and bad["mode"] == b"----------"
    assert ok["proc.creds.user"] == pwd.getpwuid(os.getuid()).pw_name.encode() == b"root"
    assert ok["proc.creds.group"] == grp.getgrgid(os.getgid()).gr_name.encode()
    when = dt.datetime.fromisoformat(ok["timestamp"].decode()[:26] + "+00:00")
    assert abs(when.timestamp() - ok["timestamp_raw"] / 1e9) < 1e-3
    assert ok["timestamp"].endswith(b"Z") and len(ok["timestamp"]) == 30  # UTC on this host
    assert ok["fpath"] == b"" and ok["ustack.inode"] == 0 and ok["ustack.symbols"] == b""
    fields = {f.fullName: f for f in info.dataSources[0].fields}
    assert fields["error"].kind == pb.String and fields["error_raw"].flags & 4  # raw hidden


def test_paths_resolve_the_opened_file(daemon: DaemonProcess, tmp_path: Path) -> None:
    """paths=true: fpath is where the fd points, symlinks and relative names resolved."""
    tag = uuid.uuid4().hex[:12]
    target = tmp_path / f"gp-target-{tag}"
    target.write_bytes(b"x")
    link = tmp_path / f"gp-link-{tag}"
    link.symlink_to(target)
    relative = f"gp-rel-{tag}"
    (tmp_path / relative).write_bytes(b"y")

    def trigger() -> None:
        os.close(os.open(link, os.O_RDONLY))
        fd = os.open(relative, os.O_RDONLY, dir_fd=os.open(tmp_path, os.O_RDONLY))
        os.close(fd)

    def done(rs: list[Record]) -> bool:
        return bool(by_name(rs, link) and [r for r in rs if r["fname"] == relative.encode()])

    _, records = collect(daemon, "trace_open", {"operator.oci.ebpf.pid": str(os.getpid()),
                                                "operator.oci.ebpf.paths": "true"},
                         trigger, done)
    assert done(records)
    assert by_name(records, link)[0]["fpath"] == str(target.resolve()).encode()
    rel = next(r for r in records if r["fname"] == relative.encode())
    assert rel["fpath"] == str((tmp_path / relative).resolve()).encode()
    dirs = [r for r in records if r["fname"] == str(tmp_path).encode()]
    assert dirs and dirs[0]["fpath"] == str(tmp_path.resolve()).encode()


def test_a_client_that_selects_raw_fields_gets_payload_0_only(daemon: DaemonProcess,
                                                              tmp_path: Path) -> None:
    """operator.fields.fields naming raw fields only: nothing else is announced or sent (the
    derived payloads are dropped before anyone computes them)."""
    target = tmp_path / f"gp-raw-{uuid.uuid4().hex[:12]}"
    target.write_bytes(b"x")
    elements: list[pb.DataElement] = []
    with daemon.client() as c:
        stream = c.run("trace_open", {"operator.oci.ebpf.pid": str(os.getpid()),
                                      "operator.fields.fields": "fname,error_raw,proc.pid"},
                       timeout_s=15)
        info: pb.GadgetInfo | None = None
        stop = threading.Event()

        def trigger() -> None:
            while not stop.is_set():
                os.close(os.open(target, os.O_RDONLY))
                stop.wait(0.1)

        t = threading.Thread(target=trigger, daemon=True)
        t.start()
        try:
            for ev in stream.raw():
                if ev.type == 4:
                    info = pb.GadgetInfo.FromString(ev.payload)
                elif ev.type == 0:
                    elements.append(pb.GadgetData.FromString(ev.payload).data)
                    if len(elements) >= 3:
                        break
        finally:
            stop.set()
            t.join()
            stream.stop()
            list(stream.raw())
    assert info is not None and elements
    fields = info.dataSources[0].fields
    assert {f.fullName for f in fields if f.flags & 16 or f.payloadIndex} == {
        "fname", "error_raw", "proc", "proc.pid"}
    assert all(f.payloadIndex == 0 for f in fields)
    assert all(len(el.payload) == 1 and len(el.payload[0]) == 344 for el in elements)


def test_announces_every_field_upstream_does(daemon: DaemonProcess) -> None:
    diff = upstream_field_diff("trace_open", daemon)
    assert not diff.sources_only_upstream and not diff.sources_only_ours, diff.report()
    d = diff.sources["open"]
    # k8s.* and runtime.* come from the container enrichment (pipeline/operators/enrich.py).
    missing = [n for n in d.only_upstream if not n.startswith(("k8s", "runtime"))]
    assert not missing and not d.only_ours, diff.report()
    assert not d.kinds and not d.flags and not d.annotations, diff.report()
