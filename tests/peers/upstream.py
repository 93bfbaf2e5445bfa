"""Upstream Inspektor Gadget as a real peer: its client ``gadgetctl`` and its daemon ``ig daemon``.

``scripts/setup upstream`` builds both from an upstream source tree (``GADGETPIPE_UPSTREAM_SRC``,
default: the mirror in /work/.mirror) into ``$GADGETPIPE_CACHE/upstream/<commit>/``, with ig
gadget images of our ten gadgets in an OCI store there, and lists the paths in
``$GADGETPIPE_CACHE/upstream.env``. Without a source the file says ``UPSTREAM_MISSING=why``: the
tests marked ``upstream`` are then skipped and the session summary says so (tests/conftest.py).

:class:`Gadgetctl` runs the client against any daemon address and reads its output line by line
while it runs, so a test waits for the record it expects, never for a time.
:class:`IgDaemon` runs ``ig daemon`` in its own pid and mount namespace (this VM hides
/proc/1/ns/mnt from it otherwise) with the cache's image store bind-mounted where ig looks.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from tests.peers import PeerProcess, _read_env_file, gp_cache

__all__ = [
    "UPSTREAM_GADGETS",
    "Gadgetctl",
    "GadgetctlProcess",
    "IgDaemon",
    "TLSClient",
    "UpstreamPaths",
    "missing_reason",
    "upstream_paths",
]

UPSTREAM_GADGETS = ("trace_exec", "trace_open", "trace_tcp", "trace_bind", "trace_signal",
                    "trace_oomkill", "trace_dns", "trace_capabilities", "snapshot_process",
                    "top_file")
"""Our ten gadgets, each of which exists upstream under the same name."""

ENABLE_HINT = ("build them with `scripts/setup upstream` from an upstream Inspektor Gadget source: "
               "GADGETPIPE_UPSTREAM_SRC=/path/to/inspektor-gadget (a checkout or a bare git dir) "
               "scripts/setup upstream")


@dataclass(frozen=True)
class UpstreamPaths:
    """What ``scripts/setup upstream`` built."""

    gadgetctl: Path
    ig: Path
    oci_store: Path
    """The ig image store holding our ten gadgets' images (``<gadget>:latest``)."""
    store_mount: Path
    """Where ig looks for its store as root (bind-mounted from ``oci_store`` in its namespace)."""
    commit: str


def _env() -> dict[str, str]:
    return _read_env_file(gp_cache() / "upstream.env")


def missing_reason() -> str | None:
    """Why the upstream-client tests cannot run here, or None when they can."""
    env = _env()
    if not env:
        return f"{gp_cache() / 'upstream.env'} does not exist (the set-up has not run)"
    if env.get("UPSTREAM_MISSING"):
        return env["UPSTREAM_MISSING"]
    for key in ("GADGETCTL_BIN", "IG_BIN"):
        path = Path(env.get(key, ""))
        if not path.is_file() or not os.access(path, os.X_OK):
            return f"{key}={path} from upstream.env is not an executable"
    return None


def upstream_paths() -> UpstreamPaths:
    """The built binaries; an AssertionError naming the cause when there are none (tests that
    need them are deselected by the conftest hook before this can happen)."""
    why = missing_reason()
    if why is not None:
        raise AssertionError(f"upstream binaries unavailable: {why}; {ENABLE_HINT}")
    env = _env()
    return UpstreamPaths(Path(env["GADGETCTL_BIN"]), Path(env["IG_BIN"]),
                         Path(env["IG_OCI_STORE"]), Path(env["IG_STORE_MOUNT"]),
                         env.get("UPSTREAM_COMMIT", "?"))


# -- gadgetctl ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSClient:
    """gadgetctl's client TLS files (upstream's client TLS is mutual only: all three)."""

    cert: Path
    key: Path
    server_ca: Path
    server_name: str | None = None

    def flags(self) -> list[str]:
        out = ["--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key),
               "--tls-server-ca-file", str(self.server_ca)]
        if self.server_name:
            out += ["--tls-server-name", self.server_name]
        return out


class GadgetctlProcess:
    """One running gadgetctl whose stdout lines a thread hands over as they arrive.

    ``wait_for(pred)`` returns the first line (or parsed JSON element) for which ``pred`` holds,
    failing with gadgetctl's output when it exits or the deadline passes first. ``stop()`` sends
    SIGINT, which gadgetctl answers by stopping the run and exiting.
    """

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self.argv = list(argv)
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._stderr, env=dict(env) if env else None,
                                     start_new_session=True)
        self._stderr_text = ""
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="gadgetctl-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._queue.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self._queue.put(None)

    def stderr(self) -> str:
        if self._stderr.closed:
            return self._stderr_text
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")

    def describe(self) -> str:
        tail = "\n".join(self.lines[-30:])
        return (f"command: {' '.join(self.argv)}\nexit: {self.proc.poll()}\n"
                f"--- stdout ({len(self.lines)} lines, last 30) ---\n{tail}\n"
                f"--- stderr ---\n{self.stderr()[-4000:]}")

    def _next_line(self, deadline: float) -> str | None:
        """The next stdout line; None at end of output; TimeoutError past the deadline."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        try:
            line = self._queue.get(timeout=left)
        except queue.Empty:
            raise TimeoutError from None
        if line is not None:
            self.lines.append(line)
        return line

    def wait_for(self, pred: Callable[[str], bool], timeout: float = 30.0,
                 what: str = "the expected line") -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._next_line(deadline)
            except TimeoutError:
                raise AssertionError(f"{what} did not appear within {timeout:.0f} s\n"
                                     f"{self.describe()}") from None
            if line is None:
                self.proc.wait(10)
                raise AssertionError(f"gadgetctl ended before {what} appeared\n"
                                     f"{self.describe()}")
            if pred(line):
                return line

    def wait_for_json(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 30.0,
                      what: str = "the expected record") -> dict[str, Any]:
        """The first JSON record (an object line, or an element of an array line) for which
        ``pred`` holds; lines that are not JSON fail the test (``-o json`` prints only JSON)."""
        found: list[dict[str, Any]] = []

        def check(line: str) -> bool:
            for rec in json_records(line):
                if pred(rec):
                    found.append(rec)
                    return True
            return False

        self.wait_for(check, timeout, what)
        return found[0]

    def records(self) -> Iterator[dict[str, Any]]:
        """Every JSON record read so far."""
        for line in self.lines:
            yield from json_records(line)

    def finish(self, timeout: float = 60.0) -> int:
        """Waits for gadgetctl to exit by itself (reading the rest of its output)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._next_line(deadline) is None:
                    break
            except TimeoutError:
                raise AssertionError(f"gadgetctl did not exit within {timeout:.0f} s\n"
                                     f"{self.describe()}") from None
        return self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGINT (gadgetctl stops the run cleanly), then SIGKILL if it lingers; returns the
        exit code. Safe to call again."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(10)
        while True:  # keep what arrived before the exit
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        if not self._stderr.closed:
            self._stderr_text = self.stderr()
            self._stderr.close()
        return self.proc.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def json_records(line: str) -> list[dict[str, Any]]:
    """The records of one ``-o json`` line: an object, or an array of them (array data
    sources print one array per packet)."""
    line = line.strip()
    if not line:
        return []
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise AssertionError(f"gadgetctl -o json printed a line that is not JSON: {line!r}: "
                             f"{e}") from None
    if isinstance(value, list):
        return [v for v in value if isinstance(v, dict)]
    if isinstance(value, dict):
        return [value]
    raise AssertionError(f"gadgetctl -o json printed neither an object nor an array: {line!r}")


class Gadgetctl:
    """The upstream client, pointed at one daemon address (``unix:///path`` or ``tcp://h:p``)."""

    def __init__(self, address: str, *, tls: TLSClient | None = None,
                 extra: Sequence[str] = (), binary: Path | None = None) -> None:
        self.binary = binary or upstream_paths().gadgetctl
        self.address = address
        self.tls = tls
        self.extra = list(extra)
        # A private HOME: gadgetctl reads ~/.config/inspektor-gadget/config.yaml if it exists.
        self._home = tempfile.TemporaryDirectory(prefix="gp-gadgetctl-")

    def close(self) -> None:
        self._home.cleanup()

    def argv(self, *args: str) -> list[str]:
        out = [str(self.binary), *args, "--remote-address", self.address, *self.extra]
        if self.tls is not None:
            out += self.tls.flags()
        return out

    def env(self) -> dict[str, str]:
        return {**os.environ, "HOME": self._home.name}

    def start(self, *args: str) -> GadgetctlProcess:
        """gadgetctl ARGS running in the background (``run`` / ``attach``)."""
        return GadgetctlProcess(self.argv(*args), self.env())

    def call(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """gadgetctl ARGS to completion (``list``, ``delete``, ``run --detach``)."""
        return subprocess.run(self.argv(*args), env=self.env(), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- ig daemon --------------------------------------------------------------------------------


class IgDaemon(PeerProcess):
    """``ig daemon`` on a private unix socket, in its own pid namespace (so it finds a readable
    init mount namespace: this VM hides /proc/1/ns/mnt) and mount namespace (so the cache's
    image store appears at ig's fixed store path without touching the host's).

    Clients pass ``--host`` (gadgetctl) or ``operator.LocalManager.host=true`` so gadgets trace
    the host rather than containers only.
    """

    kind = "ig-daemon"

    def __init__(self, paths: UpstreamPaths | None = None, *, start_timeout: float = 60.0,
                 stop_timeout: float = 15.0) -> None:
        super().__init__(start_timeout=start_timeout, stop_timeout=stop_timeout)
        self.paths = paths or upstream_paths()
        self.socket = self.workdir / "ig.sock"
        self.address = f"unix://{self.socket}"

    def _command(self) -> Sequence[str]:
        self.paths.store_mount.mkdir(parents=True, exist_ok=True)
        script = ('mount --bind "$1" "$2" && shift 2 && exec "$@"')
        # --kill-child: the daemon dies with unshare, even when unshare is SIGKILLed.
        return ["unshare", "-pf", "--kill-child", "--mount-proc", "--propagation", "private", "--",
                "sh", "-c", script, "sh", str(self.paths.oci_store), str(self.paths.store_mount),
                str(self.paths.ig), "daemon", "--host", self.address, "--disallow-pulling",
                "--tls-insecure", "--verify-image=false"]

    def _ready(self) -> bool:
        if not self.socket.exists():
            return False
        # Imported here: the peers package must not need the project's API to import.
        from api.client import GadgetClient
        try:
            GadgetClient(self.address, connect_timeout=1).close()
        except Exception:
            return False
        return True

    def stop(self, keep_data: bool = False) -> None:
        # The daemon is the child of unshare; signal the whole process group (it is the pid
        # namespace's init, so its end ends every process in the namespace).
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
        super().stop(keep_data)

    def kill(self) -> None:
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        super().kill()
