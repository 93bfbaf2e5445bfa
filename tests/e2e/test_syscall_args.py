"""trace_open reads a syscall's arguments at sys_exit from the task's saved registers where the
kernel allows it (bpf/gadget_syscall.h), and keeps them from sys_enter in a map elsewhere: both
ways are compiled here, from the gadget's own program and cflags, and must see the same opens
the same way (path, flags, mode, fd, errno) for open(2)'s three syscalls."""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pipeline.accessors import column, cstrings
from pipeline.batch import Batch
from pipeline.gadget import EBPF_PREFIX, RUNTIME_PREFIX
from pipeline.params import resolve
from pipeline.sources.catalog import Catalog
from pipeline.sources.ringbuf import RingReader
from pipeline.sources.tracer import COMPILE_LOCK, TracerSource, import_bcc

pytestmark = pytest.mark.bpf

AT_EXIT = "-DGADGET_SYSCALL_ARGS_AT_EXIT=1"
SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}


@contextmanager
def loaded(at_exit: bool) -> Iterator[tuple[Any, RingReader, Any]]:
    """trace_open's program for this process's opens only, with or without the arguments
    read at exit; yields (bcc module, ring reader, data source)."""
    spec = Catalog().resolve("trace_open")
    values = resolve(spec.params, {EBPF_PREFIX + "pid": str(os.getpid())},
                     (EBPF_PREFIX, RUNTIME_PREFIX))
    source = spec.source_factory()(spec, values)
    assert isinstance(source, TracerSource)
    cflags = list(source._cflags)
    if not at_exit:
        cflags = [f for f in cflags if f != AT_EXIT]
    elif AT_EXIT not in cflags:
        pytest.fail("this kernel cannot give sys_exit the arguments (needs Linux 5.15 and "
                    "x86_64 or arm64): the test of that way cannot run here")
    bcc = import_bcc()
    with COMPILE_LOCK:
        b = bcc.BPF(src_file=str(spec.program).encode(), cflags=cflags)
    try:
        ds = spec.datasources[0]
        yield b, RingReader(b[b"events"].get_fd(), ds.record_size), ds
    finally:
        b.cleanup()


def openat2(path: Path, flags: int, mode: int) -> int:
    """openat2(2) through syscall(2); returns the fd or -errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    how = (ctypes.c_uint64 * 3)(flags, mode, 0)
    fd = int(libc.syscall(SYS_OPENAT2[platform.machine()], -100, str(path).encode(),
                          ctypes.byref(how), ctypes.sizeof(how)))
    return fd if fd >= 0 else -ctypes.get_errno()


def workload(tmp: Path) -> dict[str, tuple[int, int, int, int]]:
    """Opens that the program must see: path -> (flags, mode, fd or 0, errno or 0)."""
    out: dict[str, tuple[int, int, int, int]] = {}
    created = tmp / "created"
    fd = os.open(created, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)  # openat
    out[str(created)] = (os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640, fd, 0)
    os.close(fd)
    two = tmp / "via-openat2"
    fd = openat2(two, os.O_RDWR | os.O_CREAT, 0o600)
    assert fd >= 0, f"openat2: errno {-fd}"
    out[str(two)] = (os.O_RDWR | os.O_CREAT, 0o600, fd, 0)
    os.close(fd)
    missing = tmp / "missing"
    with pytest.raises(FileNotFoundError):
        os.open(missing, os.O_RDONLY)
    out[str(missing)] = (os.O_RDONLY, 0, 0, 2)
    return out


def seen(reader: RingReader, ds: Any) -> dict[str, tuple[int, int, int, int]]:
    batch = Batch(ds, reader.drain())
    cols = [column(batch, ds.field(n)).tolist() for n in ("flags_raw", "mode_raw", "fd",
                                                          "error_raw")]
    return {name: (f, m, fd, err) for name, f, m, fd, err in zip(
        cstrings(batch, ds.field("fname")), *cols, strict=True)}


@pytest.mark.parametrize("at_exit", [True, False], ids=["args-at-exit", "args-from-entry"])
def test_both_ways_see_every_open_the_same(at_exit: bool, tmp_path: Path) -> None:
    with loaded(at_exit) as (b, reader, ds):
        names = {n.decode() for n in b.funcs}
        assert all("sys_exit_open" in n for n in names if "exit" in n)
        assert any("sys_enter_" in n for n in names) is not at_exit  # one program per call
        want = workload(tmp_path)
        got = seen(reader, ds)
    for path, (flags, mode, fd, err) in want.items():
        assert path in got, f"{path} not traced; saw {sorted(got)}"
        g_flags, g_mode, g_fd, g_err = got[path]
        # Python adds O_CLOEXEC to every open (PEP 446), the C library may add O_LARGEFILE.
        extra = os.O_CLOEXEC | 0o100000
        assert g_flags & ~extra == flags & ~extra, path
        assert (g_mode, g_fd, g_err) == (mode, fd, err), path
