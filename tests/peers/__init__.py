"""Real external peers (Kafka, OpenTelemetry Collector, Prometheus) as subprocesses for tests.

Each peer class lives in its own module (``tests.peers.kafka.KafkaBroker``,
``tests.peers.otelcol.OtelCollector``, ``tests.peers.prometheus.PrometheusServer``) and shares
the process handling defined here. They depend on nothing but the binaries that
``scripts/setup peers`` installs, found through ``$GADGETPIPE_CACHE/peers.env`` or, when that
file is absent, the same default locations the set-up script uses.

A peer that cannot start raises :class:`PeerStartError` with the tail of its log: a missing
peer is a failed test, never a skipped one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

__all__ = ["PeerPaths", "PeerProcess", "PeerStartError", "peer_paths", "require_executable"]

# Set to 1 to keep peers' temp dirs (configs, data, logs) after stop() for a post-mortem.
KEEP_DIRS_ENV = "GADGETPIPE_KEEP_PEER_DIRS"


class PeerStartError(RuntimeError):
    """A peer did not start (missing binary, bad config, crash, readiness timeout)."""


def gp_cache() -> Path:
    return Path(os.environ.get("GADGETPIPE_CACHE", "/var/cache/gadgetpipe"))


@dataclass(frozen=True)
class PeerPaths:
    """Where the peers' binaries are. Each may not exist: the peer's start() says so."""

    kafka_lib: Path
    java: str
    otelcol: Path
    prometheus: str
    promtool: str


def _read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return values
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            values[key.strip()] = value.strip()
    return values


def _newest_otelcol(cache: Path) -> Path:
    # Without peers.env the manifest hash is unknown here; the newest build is the set-up
    # script's latest (it deletes older ones anyway).
    builds = sorted((cache / "otelcol").glob("*/otelcol-gp"), key=lambda p: p.stat().st_mtime)
    return builds[-1] if builds else cache / "otelcol" / "<manifest-hash>" / "otelcol-gp"


def peer_paths() -> PeerPaths:
    """Binary locations: ``GADGETPIPE_<KEY>`` env vars, then peers.env, then defaults."""
    cache = gp_cache()
    env_file = _read_env_file(cache / "peers.env")

    def pick(key: str, default: str | Path) -> str:
        return os.environ.get(f"GADGETPIPE_{key}") or env_file.get(key) or str(default)

    return PeerPaths(
        kafka_lib=Path(pick("KAFKA_LIB", cache / "kafka" / "lib")),
        java=pick("JAVA_BIN", shutil.which("java") or "java"),
        otelcol=Path(pick("OTELCOL_BIN", _newest_otelcol(cache))),
        prometheus=pick("PROMETHEUS_BIN", shutil.which("prometheus") or "/usr/bin/prometheus"),
        promtool=pick("PROMTOOL_BIN", shutil.which("promtool") or "/usr/bin/promtool"),
    )


def require_executable(path: str | Path, what: str) -> str:
    """``path`` resolved to an executable, or a PeerStartError telling how to get it."""
    found = shutil.which(str(path))
    if found is None:
        raise PeerStartError(f"{what} not found at {path}: run `scripts/setup peers`")
    return found


def tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a (possibly large, possibly missing) log file."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read()
    except FileNotFoundError:
        return f"(no {path.name})"
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


class _Reaper:
    """What must be cleaned up even if nobody calls stop(); shared with a weakref finalizer,
    which also runs at interpreter exit, so an aborted test run leaves no broker behind."""

    def __init__(self, workdir: Path) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir: Path | None = workdir

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def remove_dir(self) -> None:
        if self.workdir is not None and not os.environ.get(KEEP_DIRS_ENV):
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = None

    def __call__(self) -> None:
        self.kill()
        self.remove_dir()


class PeerProcess:
    """A peer run as one subprocess in a private temp dir, with its output in one log file.

    Subclasses write their config in ``_prepare()`` (first start only), give the command in
    ``_command()`` and a readiness probe in ``_ready()``.

    Lifecycle: ``start()`` (also ``with peer:``), ``stop()`` (SIGTERM, wait, remove the temp
    dir; ``stop(keep_data=True)`` keeps it for a later ``start()``), ``kill()`` (SIGKILL,
    keeps the dir), ``restart()`` (same dir, same ports). Calls block; from async code whose
    event loop must keep running meanwhile (a producer riding out an outage), use
    ``await asyncio.to_thread(peer.restart)``.
    """

    kind: ClassVar[str] = "peer"

    def __init__(self, *, start_timeout: float, stop_timeout: float) -> None:
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.workdir = Path(tempfile.mkdtemp(prefix=f"gp-{self.kind}-"))
        self.log_path = self.workdir / f"{self.kind}.log"
        #: Seconds the last successful start() took (launch to ready).
        self.last_start_seconds: float | None = None
        self._reaper = _Reaper(self.workdir)
        self._finalizer = weakref.finalize(self, self._reaper)
        self._prepared = False
        self._closed = False
        self._launch_offset = 0

    # --- subclass hooks -------------------------------------------------------------------

    def _prepare(self) -> None:
        """Writes configs, formats storage: once, before the first launch."""

    def _command(self) -> Sequence[str]:
        raise NotImplementedError

    def _env(self) -> Mapping[str, str] | None:
        return None

    def _ready(self) -> bool:
        raise NotImplementedError

    # --- state ----------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        proc = self._reaper.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def log_since_launch(self) -> str:
        """The log written by the current (or last) incarnation of the process."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._launch_offset)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        """Launches the peer and returns once it serves; PeerStartError if it does not.

        On failure the process is killed and the temp dir removed, whichever start it was.
        """
        if self._closed:
            raise RuntimeError(f"{self.kind} was stopped for good; create a new one")
        if self.running:
            raise RuntimeError(f"{self.kind} is already running (pid {self.pid})")
        t0 = time.monotonic()
        try:
            if not self._prepared:
                self._prepare()
                self._prepared = True
            self._launch()
            self._wait_ready(t0 + self.start_timeout)
        except BaseException:
            # Nobody calls stop() after a failed `with peer:`, and a half-started peer is
            # worth nothing, so clean up completely.
            self._reaper.kill()
            self._close()
            raise
        self.last_start_seconds = time.monotonic() - t0
        return self

    def _launch(self) -> None:
        with self.log_path.open("ab") as log:
            self._launch_offset = log.tell()
            # Own session: a Ctrl-C meant for pytest must not kill the peer before the
            # test's teardown has stopped it in order.
            self._reaper.proc = subprocess.Popen(
                list(self._command()), cwd=self.workdir, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, env=self._env(), start_new_session=True)

    def _wait_ready(self, deadline: float) -> None:
        proc = self._reaper.proc
        assert proc is not None
        while True:
            rc = proc.poll()
            if rc is not None:
                raise PeerStartError(self._failure(f"exited with code {rc} while starting"))
            if self._ready():
                return
            if time.monotonic() > deadline:
                raise PeerStartError(
                    self._failure(f"not ready within {self.start_timeout:.0f} s"))
            time.sleep(0.05)

    def _failure(self, what: str) -> str:
        keep = (f"kept {self.workdir}" if os.environ.get(KEEP_DIRS_ENV)
                else f"set {KEEP_DIRS_ENV}=1 to keep {self.workdir}")
        return (f"{self.kind} {what}\ncommand: {' '.join(self._command())}\n({keep})\n"
                f"--- last lines of {self.log_path.name} ---\n{self.log_tail()}")

    def stop(self, keep_data: bool = False) -> None:
        """SIGTERM, wait up to ``stop_timeout`` (then SIGKILL); removes the temp dir unless
        ``keep_data``. Safe to call again, and after kill()."""
        proc = self._reaper.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not keep_data:
            self._close()

    def _close(self) -> None:
        self._reaper.remove_dir()
        self._closed = True
        self._finalizer.detach()

    def kill(self) -> None:
        """SIGKILL (a crash, as far as the peer's data can tell); the temp dir stays."""
        self._reaper.kill()

    def restart(self) -> None:
        """Graceful stop if running, then start on the same dir and ports."""
        if self.running:
            self.stop(keep_data=True)
        self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
