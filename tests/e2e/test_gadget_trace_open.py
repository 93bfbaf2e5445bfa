"""trace_open end to end: open, openat and openat2 of unique paths, success and ENOENT."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest

from tests.daemon import DaemonProcess
from tests.e2e.gadget_run import Record, collect

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


def test_paths_true_is_refused_with_a_clear_message(daemon: DaemonProcess) -> None:
    with daemon.client() as c, pytest.raises(grpc.RpcError) as e:
        list(c.run("trace_open", {"operator.oci.ebpf.paths": "true"}).raw())
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "paths=true is not supported" in (e.value.details() or "")
