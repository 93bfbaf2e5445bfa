"""Runs the real daemon as a subprocess for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from api.client import GadgetClient
from pipeline._gen import gadget_service_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


class DaemonProcess:
    """``gadgetpipe serve`` on a private unix socket and state dir.

    Args:
        args: extra ``serve`` arguments.
        state_dir: reuse a state dir (restart tests); a fresh one otherwise.
    """

    def __init__(self, *args: str, state_dir: Path | None = None,
                 config: Path | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="gp-daemon-")
        tmp = Path(self._tmp.name)
        self.socket = tmp / "gp.sock"
        self.address = f"unix://{self.socket}"
        self.state_dir = state_dir or tmp / "state"
        self.log_path = tmp / "daemon.log"
        self._args = list(args)
        self._config = config
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> DaemonProcess:
        cmd = [sys.executable, "-m", "api.cli", "serve", "--listen", self.address,
               "--state-dir", str(self.state_dir), "--log-level", "debug", *self._args]
        config = self._config
        if config is None:
            # Not the embedded default: its trace_exec instance would load BPF programs in
            # every test daemon and blur what a test counts.
            config = Path(self._tmp.name) / "empty.yaml"
            config.write_text("instances: []\n")
        cmd += ["--config", str(config)]
        if "--metrics-listen" not in self._args:
            cmd += ["--metrics-listen", "off"]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
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

    def client(self) -> GadgetClient:
        return GadgetClient(self.address)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def instance_tracing(client: GadgetClient, ref: str, timeout: float = 90.0) -> pb.GadgetInfo:
    """Waits, on the daemon's events, until instance ``ref`` (id, name or id prefix) traces:
    GetGadgetInfo with flag 1 (the daemon answers once the instance started, or with its
    error), then an attach stream until its ready event (api/ready.py). Returns the info."""
    info = client.info(ref, instance=True)
    stream = client.attach(info.id)
    try:
        stream.wait_ready(timeout)
    finally:
        stream.cancel()
    return info
