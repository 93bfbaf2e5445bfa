"""The ``jsonl`` sink: one JSON object per record and line, to stdout or a rotated file.

Records are encoded per batch (pipeline.sinks.jsonvec, a few numpy passes per batch) and each
batch is encoded and written with one ``write`` in a worker thread, so neither the encoding nor
a slow disk or a full stdout pipe holds up the event loop (and with it the gRPC streams).
Runs that name the same path share one writer (a daemon-wide table owned by the sink type), so
their lines never interleave mid-line and size-based rotation sees every byte.

Params (prefix ``operator.jsonl.``): ``path`` (``-`` for stdout), ``max-bytes`` (rotate when
the file would grow past it; 0 never), ``backups`` (rotated files kept: ``path.1`` newest).

The queue in front of the sink (``queue-capacity``) holds 131072 records by default, as every
sink's (pipeline/sinks/base.py says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.batch import Batch
from pipeline.params import ParamSpec
from pipeline.sinks.base import SinkContext, SinkError, SinkTypeBase, register_sink
from pipeline.sinks.encode import JsonEncoder, PerSchema

__all__ = ["JsonlSink", "JsonlSinkType", "RotatingFile"]

_logger = logging.getLogger(__name__)

STDOUT = "-"

WRITE_CHUNK = 256 << 10
"""Bytes handed to one ``write`` call. A batch's lines are megabytes (4096 trace_open records
are 4.9 MB), and appending them to an ext4 file in one call cost the kernel 30 times more than
in pieces of up to 1 MiB on the 2-core test machine (about 9 µs against 0.3 µs of system time
per 1.2 KB record, bench/bench_jsonl.py ``--write``)."""


class RotatingFile:
    """An append-only file rotated by size, shared by every sink that names its path.

    Args:
        path: the file, or ``-`` for the daemon's stdout (never rotated nor closed).
        max_bytes: rotate before a write would take the file past this size (0: never).
        backups: how many rotated files to keep (``path.1`` … ``path.N``); 0 truncates.
    """

    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.users = 0
        self._file: BinaryIO | None = None
        self._size = 0
        self._lock = asyncio.Lock()

    def _open(self) -> BinaryIO:
        if self._file is None:
            if self.path == STDOUT:
                self._file = sys.stdout.buffer
            else:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "ab")  # noqa: SIM115 - closed in close()
                self._size = self._file.tell()
        return self._file

    def _rotate(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for k in range(self.backups - 1, 0, -1):
            src = f"{self.path}.{k}"
            if os.path.exists(src):
                os.replace(src, f"{self.path}.{k + 1}")
        if self.backups > 0:
            os.replace(self.path, f"{self.path}.1")
        else:
            os.unlink(self.path)
        self._size = 0

    def _write_sync(self, data: bytes | bytearray) -> None:
        f = self._open()
        if (self.path != STDOUT and self.max_bytes and self._size
                and self._size + len(data) > self.max_bytes):
            self._rotate()
            f = self._open()
        view = memoryview(data)
        for start in range(0, len(view), WRITE_CHUNK):
            f.write(view[start: start + WRITE_CHUNK])
        f.flush()
        self._size += len(data)

    async def write(self, produce: Callable[[], bytes | bytearray]) -> None:
        """Writes what ``produce`` returns; both run in a worker thread, in call order."""
        async with self._lock:
            await asyncio.to_thread(lambda: self._write_sync(produce()))

    def close(self) -> None:
        if self._file is not None and self.path != STDOUT:
            self._file.close()
        self._file = None


class JsonlSink:
    """Writes a run's records as JSON lines to a shared :class:`RotatingFile`."""

    name = "jsonl"

    def __init__(self, out: RotatingFile, release: Any) -> None:
        self._out = out
        self._release = release
        self._encoders = PerSchema(JsonEncoder)

    async def start(self) -> None:
        return None

    async def write(self, batch: Batch) -> int:
        encoder = self._encoders.get(batch.schema)
        try:
            await self._out.write(lambda: encoder.encode_lines(batch)[0])
        except OSError as e:
            raise SinkError(f"writing {self._out.path}: {e}") from e
        return 0

    async def flush(self, timeout: float) -> bool:
        return True

    async def stop(self, timeout: float) -> None:
        self._release(self._out)


@register_sink("jsonl")
class JsonlSinkType(SinkTypeBase):
    description = "a JSON-lines file or stdout"
    default_retry_timeout = "30s"

    def __init__(self) -> None:
        self._files: dict[str, RotatingFile] = {}

    def own_params(self) -> tuple[ParamSpec, ...]:
        return (
            self.param("path", "File to append JSON lines to; - for the daemon's stdout", STDOUT),
            self.param("max-bytes", "Rotate the file before it grows past this many bytes "
                       "(0: never)", str(100 << 20), "uint64"),
            self.param("backups", "Rotated files to keep (path.1 is the newest)", "5",
                       "uint32"),
        )

    def _acquire(self, path: str, max_bytes: int, backups: int) -> RotatingFile:
        key = path if path == STDOUT else os.path.abspath(path)
        f = self._files.get(key)
        if f is None:
            f = self._files[key] = RotatingFile(key, max_bytes, backups)
        f.users += 1
        return f

    def _release(self, f: RotatingFile) -> None:
        f.users -= 1
        if f.users <= 0:
            f.close()
            self._files.pop(f.path, None)

    def build(self, values: Mapping[str, Any], context: SinkContext) -> JsonlSink:
        own = self.own(values)
        path = str(own.get("path") or STDOUT)
        out = self._acquire(path, int(own.get("max-bytes") or 0), int(own.get("backups") or 0))
        return JsonlSink(out, self._release)

    async def close(self) -> None:
        for f in list(self._files.values()):
            with contextlib.suppress(OSError):
                f.close()
        self._files.clear()
