"""A workload per gadget whose record must appear in an upstream client's output.

Each workload carries a unique token (a process name, a file name, a DNS name, a port) that its
record shows both in ``gadgetctl -o json`` (some string field contains it, or a ``port`` field
equals it) and in ``-o columns`` (a column shows it). The trigger repeats in a thread until the
block ends, because tracing attaches some time after the run is announced: the caller waits for
the record itself (``GadgetctlProcess.wait_for_json(workload.json_match)``), never for a time.
The same workloads drive tests/e2e/test_gadgetctl.py and scripts/compare_upstream.py (both
daemons traced at once).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e.gadget_helpers import memory_cgroup, memory_hog

__all__ = ["WORKLOADS", "Workload", "leaves", "running"]

NOBODY = 65534
DNS_ANSWER = "10.1.2.3"


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every leaf of a JSON record."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, value


@dataclass
class Workload:
    """What a gadget's record must carry, and the trigger's state (for assertions)."""

    gadget: str
    token: str
    """Unique text the record shows: in a string field (JSON) and in a column."""
    port: int | None = None
    """For socket gadgets: the token is this port, matched on ``*port`` fields / ``:port``."""
    runs: int = 0
    """Trigger rounds so far."""
    errors: list[BaseException] = field(default_factory=list)

    def json_match(self, record: dict[str, Any]) -> bool:
        for path, value in leaves(record):
            if self.port is not None:
                if path.rsplit(".", 1)[-1].endswith("port") and value == self.port:
                    return True
            elif isinstance(value, str) and self.token in value:
                return True
        return False

    def columns_match(self, line: str) -> bool:
        for word in line.split():
            if self.port is not None:
                if word == self.token or word.endswith(f":{self.token}"):
                    return True
            elif self.token in word:
                return True
        return False

    def check(self) -> None:
        """Fails when the trigger itself failed (a workload that cannot run is a failure)."""
        if self.errors:
            raise AssertionError(f"{self.gadget} workload failed: {self.errors[0]!r}") \
                from self.errors[0]


@contextlib.contextmanager
def _repeat(w: Workload, trigger: Callable[[], None], interval: float = 0.2) -> Iterator[None]:
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                trigger()
            except BaseException as e:  # handed over through Workload.check()
                w.errors.append(e)
                return
            w.runs += 1
            stop.wait(interval)

    t = threading.Thread(target=loop, name=f"workload-{w.gadget}", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(60)
    w.check()


def _token(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"  # <= 15 characters: a whole comm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- one context manager per gadget ------------------------------------------------------------


@contextlib.contextmanager
def _exec() -> Iterator[Workload]:
    """Execs a copy of /bin/true named by the token."""
    with tempfile.TemporaryDirectory(prefix="gp-uw-") as d:
        w = Workload("trace_exec", _token("gpx"))
        binary = Path(d) / w.token
        shutil.copy("/bin/true", binary)
        binary.chmod(0o755)
        def trigger() -> None:
            subprocess.run([str(binary)], check=True)

        with _repeat(w, trigger):
            yield w


@contextlib.contextmanager
def _open() -> Iterator[Workload]:
    """Opens a file named by the token, relative to a private dir (a short ``fname``)."""
    with tempfile.TemporaryDirectory(prefix="gp-uw-") as d:
        w = Workload("trace_open", _token("gpo"))
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)

        def trigger() -> None:
            os.close(os.open(w.token, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd))

        try:
            with _repeat(w, trigger):
                yield w
        finally:
            os.close(dfd)


@contextlib.contextmanager
def _tcp() -> Iterator[Workload]:
    """Connects to a listener on 127.0.0.1:<token>, accepts, closes."""
    port = _free_port()
    w = Workload("trace_tcp", str(port), port=port)
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen()

        def trigger() -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                conn, _ = srv.accept()
                conn.close()

        with _repeat(w, trigger):
            yield w


@contextlib.contextmanager
def _bind() -> Iterator[Workload]:
    """Binds a TCP socket to 127.0.0.1:<token>."""
    port = _free_port()
    w = Workload("trace_bind", str(port), port=port)

    def trigger() -> None:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))

    with _repeat(w, trigger):
        yield w


SIGNAL_SENDER = """
import os, sys
open('/proc/self/comm', 'w').write(sys.argv[1])
os.kill(int(sys.argv[2]), int(sys.argv[3]))
"""


@contextlib.contextmanager
def _signal() -> Iterator[Workload]:
    """A child named by the token sends SIGUSR1 to a fresh sleeping process (which it ends)."""
    w = Workload("trace_signal", _token("gps"))
    targets: list[subprocess.Popen[bytes]] = []

    def trigger() -> None:
        target = subprocess.Popen(["sleep", "300"])
        targets.append(target)
        subprocess.run([sys.executable, "-c", SIGNAL_SENDER, w.token, str(target.pid),
                        str(int(signal.SIGUSR1))], check=True)
        target.wait(10)

    try:
        with _repeat(w, trigger):
            yield w
    finally:
        for t in targets:
            if t.poll() is None:
                t.kill()
            t.wait()


@contextlib.contextmanager
def _oomkill() -> Iterator[Workload]:
    """A child named by the token allocates in a 20 MiB memory cgroup until OOM-killed."""
    w = Workload("trace_oomkill", _token("gpm"))
    with memory_cgroup(20 << 20) as cg:
        def trigger() -> None:
            code = memory_hog(cg.procs, w.token).wait(60)
            if code != -signal.SIGKILL:
                raise AssertionError(f"the memory hog exited with {code}, not by SIGKILL")

        with _repeat(w, trigger):
            yield w


def _dns_query(name: str, ident: int) -> bytes:
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0) + qname + b"\0" + \
        struct.pack(">HH", 1, 1)


def _dns_ask(server: str, name: str, ident: int) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(_dns_query(name, ident), (server, 53))
        return s.recvfrom(4096)[0]


@contextlib.contextmanager
def _dnsmasq(name: str) -> Iterator[str]:
    """A dnsmasq answering ``name`` on port 53 of a random 127/8 address (so it never meets
    another test's dnsmasq on 127.0.0.1:53); yields the address. Fails when dnsmasq is missing
    (scripts/setup installs dnsmasq-base)."""
    exe = shutil.which("dnsmasq")
    assert exe, "dnsmasq is not installed (scripts/setup base installs dnsmasq-base)"
    server = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
    proc = subprocess.Popen(
        [exe, "--no-daemon", "--port=53", f"--listen-address={server}", "--bind-interfaces",
         "--no-resolv", "--no-hosts", f"--address=/{name}/{DNS_ANSWER}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                raise AssertionError(f"dnsmasq exited with {proc.returncode}: {out}")
            with contextlib.suppress(OSError):
                if _dns_ask(server, name, 1)[3] & 0xF == 0:
                    break
            assert time.monotonic() < deadline, "dnsmasq did not answer within 10 s"
            time.sleep(0.1)  # polling a server that is starting, not standing in for an event
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


@contextlib.contextmanager
def _dns() -> Iterator[Workload]:
    """A-queries for a unique name (the token) to a private dnsmasq."""
    w = Workload("trace_dns", f"gpd-{uuid.uuid4().hex[:12]}.test")
    ids = iter(range(0x100, 0x10000))
    with _dnsmasq(w.token) as server, \
            _repeat(w, lambda: _check_answer(_dns_ask(server, w.token, next(ids)))):
        yield w


def _check_answer(resp: bytes) -> None:
    if resp[3] & 0xF != 0:
        raise AssertionError(f"dnsmasq answered with rcode {resp[3] & 0xF}")


CAP_CHILD = """
import os, sys
open('/proc/self/comm', 'w').write(sys.argv[1])
os.setuid(int(sys.argv[3]))
try:
    os.chown(sys.argv[2], 0, 0)   # CAP_CHOWN, refused: nobody does not own the file
except PermissionError:
    pass
"""


@contextlib.contextmanager
def _capabilities() -> Iterator[Workload]:
    """A child named by the token drops to nobody and chowns a root-owned file (refused)."""
    w = Workload("trace_capabilities", _token("gpc"))
    d = Path(tempfile.mkdtemp(prefix="gp-uw-"))
    try:
        d.chmod(0o755)
        target = d / "owned-by-root"
        target.write_text("x")

        def trigger() -> None:
            subprocess.run([sys.executable, "-c", CAP_CHILD, w.token, str(target), str(NOBODY)],
                           check=True)

        with _repeat(w, trigger):
            yield w
    finally:
        shutil.rmtree(d)


@contextlib.contextmanager
def _snapshot() -> Iterator[Workload]:
    """A sleeping copy of sleep named by the token, alive for the whole block."""
    with tempfile.TemporaryDirectory(prefix="gp-uw-") as d:
        w = Workload("snapshot_process", _token("gpp"))
        binary = Path(d) / w.token
        shutil.copy(shutil.which("sleep") or "/bin/sleep", binary)
        proc = subprocess.Popen([str(binary), "600"])
        w.runs = 1
        try:
            yield w
        finally:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _top_file() -> Iterator[Workload]:
    """Writes to /tmp/<token>, over and over (a short path: the FILE column is 30 wide)."""
    w = Workload("top_file", _token("gpf"))
    path = Path("/tmp") / w.token  # not $TMPDIR, which may be long
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)

    def trigger() -> None:
        os.pwrite(fd, b"gadgetpipe\n", 0)

    try:
        with _repeat(w, trigger, interval=0.05):
            yield w
    finally:
        os.close(fd)
        path.unlink()


WORKLOADS: dict[str, Callable[[], contextlib.AbstractContextManager[Workload]]] = {
    "trace_exec": _exec,
    "trace_open": _open,
    "trace_tcp": _tcp,
    "trace_bind": _bind,
    "trace_signal": _signal,
    "trace_oomkill": _oomkill,
    "trace_dns": _dns,
    "trace_capabilities": _capabilities,
    "snapshot_process": _snapshot,
    "top_file": _top_file,
}


def running(gadget: str) -> contextlib.AbstractContextManager[Workload]:
    """The workload of ``gadget``, running until the block ends."""
    return WORKLOADS[gadget]()
