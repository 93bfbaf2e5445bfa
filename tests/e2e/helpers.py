"""Helpers for end-to-end tests: unique binaries to exec, BPF program accounting, a run's
stream read in a thread."""

from __future__ import annotations

import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from api.client import RunStream
from pipeline._gen import gadget_service_pb2 as pb


def unique_binary(tmp: Path, prefix: str = "gp") -> Path:
    """A copy of /bin/true under a unique name (its comm is the first 15 characters)."""
    path = tmp / f"{prefix}{uuid.uuid4().hex[:10]}"
    shutil.copy("/bin/true", path)
    path.chmod(0o755)
    return path


@contextmanager
def keep_running(*argvs: list[str], interval: float = 0.1) -> Iterator[list[int]]:
    """Runs each command every ``interval`` until the block ends, for tests that need records
    to keep coming (start it once the run traces: its ready event, ``RunStream.wait_ready``);
    yields the list of pids started so far."""
    stop = threading.Event()
    pids: list[int] = []

    def loop() -> None:
        while not stop.is_set():
            for argv in argvs:
                p = subprocess.Popen(argv)
                pids.append(p.pid)
                p.wait()
            stop.wait(interval)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield pids
    finally:
        stop.set()
        t.join()


def bpf_programs_of(pid: int) -> list[int]:
    """Ids of the BPF programs process ``pid`` holds an fd to (from /proc/<pid>/fdinfo)."""
    ids = []
    fdinfo = Path(f"/proc/{pid}/fdinfo")
    for entry in fdinfo.iterdir():
        try:
            text = entry.read_text()
        except OSError:
            continue  # the fd closed meanwhile
        for line in text.splitlines():
            if line.startswith("prog_id:"):
                ids.append(int(line.split()[1]))
    return ids


def info_fields(info: pb.GadgetInfo, ds_name: str) -> dict[str, pb.Field]:
    ds = next(d for d in info.dataSources if d.name == ds_name)
    return {f.fullName: f for f in ds.fields}


class Drain:
    """Reads a run's stream in a thread (a stream nobody reads would only fill its queue)."""

    def __init__(self, stream: RunStream) -> None:
        self.stream = stream
        self.ready = threading.Event()
        """Set when the gadget traces (its ready event)."""
        self.error: BaseException | None = None
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        try:
            for _ in self.stream.raw():
                if self.stream.ready:
                    self.ready.set()
        except BaseException as e:  # reported by stop()
            self.error = e

    def stop(self) -> None:
        self.stream.stop()
        self._t.join(30)
        if self.error is not None:
            raise AssertionError(f"run stream failed: {self.error}")
