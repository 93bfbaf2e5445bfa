"""top_file: known reads and writes of a unique file, summed over the interval reports."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import DaemonProcess
from tests.e2e.gadget_fields import assert_upstream_fields
from tests.e2e.gadget_helpers import Collected, collect

pytestmark = pytest.mark.bpf

WRITES = (100, 200, 300, 400, 500)
READS = (50, 50, 50)


def _rows(got: Collected, path: Path) -> list[dict[str, Any]]:
    return [r for r in got.records if r["file"] == str(path).encode()]


def test_reads_and_writes_of_a_file_are_counted_per_interval(daemon: DaemonProcess,
                                                              tmp_path: Path) -> None:
    target = tmp_path / f"gptop{uuid.uuid4().hex[:8]}"
    sentinel = tmp_path / "sentinel"
    attached = threading.Event()
    done = threading.Event()
    fds: list[int] = []

    def io() -> None:
        # Write the sentinel until its row shows the counters are live, then the measured I/O.
        s = os.open(sentinel, os.O_WRONLY | os.O_CREAT)
        fds.append(s)
        while not attached.wait(0.05):
            os.write(s, b".")
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        fds.append(fd)
        for n in WRITES:
            os.write(fd, b"x" * n)
        os.lseek(fd, 0, os.SEEK_SET)
        for n in READS:
            os.read(fd, n)
        done.set()

    def until(g: Collected) -> bool:
        if _rows(g, sentinel):
            attached.set()
        rows = _rows(g, target)
        return done.is_set() and sum(r["writes"] for r in rows) >= len(WRITES) and \
            sum(r["reads"] for r in rows) >= len(READS)

    with daemon.client() as c:
        stream = c.run("top_file", {"operator.oci.ebpf.pid": str(os.getpid()),
                                    "operator.oci.ebpf.map-fetch-interval": "200ms"})
        t = threading.Thread(target=io, daemon=True)
        t.start()
        try:
            got = collect(stream, until, timeout=15)
        finally:
            attached.set()
            t.join()
            for fd in fds:
                os.close(fd)
    assert got.info is not None
    ds = got.info.dataSources[0]
    assert ds.type == 2 and ds.annotations["fetch-interval"] == "1s"
    payloads = {f.fullName: f.payloadIndex for f in ds.fields}
    assert payloads["inode"] == 0 and payloads["dev"] == 0 and payloads["reads"] == 1
    rows = _rows(got, target)
    assert rows, "no row for the file"
    assert sum(r["writes"] for r in rows) == len(WRITES)
    assert sum(r["wbytes_raw"] for r in rows) == sum(WRITES)
    assert sum(r["reads"] for r in rows) == len(READS)
    assert sum(r["rbytes_raw"] for r in rows) == sum(READS)
    st = target.stat()
    r = rows[0]
    assert r["inode"] == st.st_ino
    assert os.makedev(r["dev"] >> 20, r["dev"] & 0xFFFFF) == st.st_dev
    assert r["proc.pid"] == os.getpid()
    assert r["t_raw"] == 0  # regular file
    # The path is built in the kernel, so it is absolute even for a file closed before the
    # report (the rows' keys are upstream's: the pid_tgid member is private).
    assert r["file"] == str(target).encode()
    assert "pid_tgid" not in r and "__pid_tgid" not in r and "fd" not in r
    # The readable fields upstream derives: the type's name, the byte counts as go-humanize
    # prints them, the user name.
    assert r["t"] == b"R"
    assert r["proc.creds.user"] == b"root"
    if len(rows) == 1:  # one interval held all the I/O: 1500 and 150 bytes
        assert r["wbytes"] == b"1.5 kB" and r["rbytes"] == b"150 B"
    for row in rows:
        assert row["wbytes"] == _human(row["wbytes_raw"])
        assert row["rbytes"] == _human(row["rbytes_raw"])
    # Each report is one packet: seq counts packets, one per interval with activity.
    seqs = [seq for seq, _ in got.packets]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def _human(n: int) -> bytes:
    """go-humanize's Bytes for the small sizes here: "N B" below 1000, "x.y kB" below 10 kB."""
    return f"{n} B".encode() if n < 1000 else f"{n / 1000:.1f} kB".encode()


def test_announces_upstreams_fields(daemon: DaemonProcess) -> None:
    assert_upstream_fields(daemon, "top_file", ["reads", "writes", "rbytes_raw", "wbytes_raw",
                                                "t", "t_raw", "file", "dev", "inode"])


def test_sort_by_and_max_entries_keep_the_top_row(daemon: DaemonProcess, tmp_path: Path) -> None:
    heavy = tmp_path / f"gpheavy{uuid.uuid4().hex[:6]}"
    light = tmp_path / f"gplight{uuid.uuid4().hex[:6]}"
    stop = threading.Event()

    def io() -> None:
        with open(heavy, "wb", buffering=0) as h, open(light, "wb", buffering=0) as lf:
            while not stop.is_set():
                for _ in range(20):
                    h.write(b"x" * 4096)
                    lf.write(b"y")
                time.sleep(0.02)

    with daemon.client() as c:
        stream = c.run("top_file", {"operator.oci.ebpf.pid": str(os.getpid()),
                                    "operator.oci.ebpf.map-fetch-interval": "200ms",
                                    "operator.oci.ebpf.max-entries": "1",
                                    "operator.oci.ebpf.sort-by": "-wbytes"})
        t = threading.Thread(target=io, daemon=True)
        t.start()
        try:
            got = collect(stream, lambda g: len(_rows(g, heavy)) >= 3, timeout=15)
        finally:
            stop.set()
            t.join()
    assert all(len(recs) <= 1 for _, recs in got.packets)
    assert len(_rows(got, heavy)) >= 3
    assert not _rows(got, light)


def test_paths_come_from_the_kernel_across_mounts_and_after_close(daemon: DaemonProcess,
                                                                   tmp_path: Path) -> None:
    # /dev/shm is its own mount (tmpfs): its path needs the walk to cross to the parent mount.
    # Each file is written and closed at once, so no /proc/<pid>/fd link could name it.
    shm = Path("/dev/shm") / f"gpshm{uuid.uuid4().hex[:8]}"
    deep = tmp_path / "a" / "b" / "c" / f"gpdeep{uuid.uuid4().hex[:8]}"
    deep.parent.mkdir(parents=True)
    stop = threading.Event()

    def io() -> None:
        while not stop.is_set():
            for p in (shm, deep):
                with open(p, "ab", buffering=0) as f:
                    f.write(b"z")
            stop.wait(0.05)

    with daemon.client() as c:
        stream = c.run("top_file", {"operator.oci.ebpf.pid": str(os.getpid()),
                                    "operator.oci.ebpf.map-fetch-interval": "200ms"})
        t = threading.Thread(target=io, daemon=True)
        t.start()
        try:
            got = collect(stream, lambda g: bool(_rows(g, shm)) and bool(_rows(g, deep)),
                          timeout=15)
        finally:
            stop.set()
            t.join()
            shm.unlink(missing_ok=True)
    assert _rows(got, shm), f"no row for {shm}: {[r['file'] for r in got.records]}"
    assert _rows(got, deep), f"no row for {deep}: {[r['file'] for r in got.records]}"
