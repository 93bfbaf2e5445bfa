"""snapshot_process: runs the BPF task iterator once and emits every process as one batch.

bcc 0.26 compiles ``BPF_ITER(task)`` programs and loads them as tracing programs with the
``BPF_TRACE_ITER`` attach type, but its Python API has no iterator calls; the link and the
iterator fd come from libbpf's ``bpf_link_create`` / ``bpf_iter_create``, which libbcc exports.
Reading the iterator fd runs the program over every task and returns what it wrote with
``bpf_seq_write``: fixed-size records, read here as one numpy block.

Like upstream, the run stays open after the snapshot until it is stopped or times out.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.batch import Batch, Fixed, FormColumn
from pipeline.gadget import GadgetSpec
from pipeline.severity import Severity
from pipeline.sources.base import Emit, Log, SourceError, load_in_thread
from pipeline.sources.tracer import (
    COMPILE_LOCK,
    TracerSource,
    boot_to_wall_offset_ns,
    check_environment,
    free_bpf,
    import_bcc,
)

if TYPE_CHECKING:
    from bcc import BPF

BPF_TRACE_ITER = 28  # enum bpf_attach_type; bcc 0.26 names it only as a program type
PROGRAM = b"bpf_iter__task"
READ_CHUNK = 1 << 20
START_TIME_SIZE = 8  # struct process_entry's start_time after the gadget_process


def _libbpf_calls() -> tuple[Any, Any]:
    """libbpf's bpf_link_create and bpf_iter_create, as exported by libbcc."""
    from bcc import libbcc

    lib = libbcc.lib
    link_create = lib.bpf_link_create
    link_create.restype = ctypes.c_int
    link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    iter_create = lib.bpf_iter_create
    iter_create.restype = ctypes.c_int
    iter_create.argtypes = [ctypes.c_int]
    return link_create, iter_create


class SnapshotSource(TracerSource):
    """One snapshot of the task list per run. Reuses the tracer's cflags and layout check."""

    def __init__(self, spec: GadgetSpec, values: Mapping[str, Any]) -> None:
        super().__init__(spec, values)
        self._ds = spec.datasources[0]
        self._link_fd = -1
        self._done = asyncio.Event()
        self._snap: asyncio.Task[None] | None = None

    async def start(self, emit: Emit, log: Log) -> None:
        check_environment()
        self._emit = emit
        self._log = log
        self._bpf = await load_in_thread(self._load, self._free_abandoned)
        self._snap = asyncio.create_task(self._snapshot(), name=f"snapshot:{self._spec.name}")

    def _free_abandoned(self, bpf: BPF) -> None:
        if self._link_fd >= 0:
            os.close(self._link_fd)
            self._link_fd = -1
        free_bpf(bpf)

    def _load(self) -> BPF:
        bcc = import_bcc()
        try:
            with COMPILE_LOCK:
                bpf = bcc.BPF(src_file=str(self._spec.program).encode(), cflags=self._cflags)
        except Exception as e:  # bcc raises bare Exception for every failure
            raise SourceError(f"gadget {self._spec.name}: loading {self._spec.program.name} "
                              f"failed: {e} (clang output is in the daemon log)") from e
        try:
            self._check_layout(bpf, self._ds)
            try:
                fn = bpf.load_func(PROGRAM, bcc.BPF.TRACING, attach_type=BPF_TRACE_ITER)
            except Exception as e:
                raise SourceError(f"gadget {self._spec.name}: hook BPF iterator iter/task "
                                  f"cannot be loaded on this kernel: {e}") from e
            link_create, _ = _libbpf_calls()
            fd = link_create(fn.fd, 0, BPF_TRACE_ITER, None)
            if fd < 0:
                raise SourceError(f"gadget {self._spec.name}: hook BPF iterator iter/task "
                                  f"cannot be attached: {os.strerror(-fd)}")
            self._link_fd = fd
        except Exception:
            free_bpf(bpf)
            raise
        return bpf

    def _read_all(self) -> bytes:
        """Runs the iterator once: a new iterator fd per snapshot, read to its end."""
        _, iter_create = _libbpf_calls()
        fd = iter_create(self._link_fd)
        if fd < 0:
            raise SourceError(f"gadget {self._spec.name}: bpf_iter_create failed: "
                              f"{os.strerror(-fd)}")
        chunks = []
        try:
            while True:
                chunk = os.read(fd, READ_CHUNK)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(fd)
        return b"".join(chunks)

    async def _snapshot(self) -> None:
        try:
            data = await asyncio.to_thread(self._read_all)
        except (OSError, SourceError) as e:
            self._log(Severity.ERROR, f"snapshot failed: {e}")
            self._done.set()
            return
        size = self._ds.record_size + START_TIME_SIZE  # struct process_entry
        if len(data) % size:
            self._log(Severity.ERROR, f"snapshot: {len(data)} bytes is not a whole number of "
                      f"{size}-byte records; the BPF struct and gadget.yaml disagree")
            self._done.set()
            return
        entries = np.frombuffer(data, dtype=np.uint8).reshape(-1, size)
        rows = entries[:, : self._ds.record_size].copy()
        # Our own payload beside upstream's record: the start, boot ns -> wall-clock ns.
        start = entries[:, self._ds.record_size:].copy().view("<u8")
        np.add(start, np.uint64(boot_to_wall_offset_ns()), out=start, where=start != 0)
        start_time = FormColumn(Fixed(start.view(np.uint8).reshape(-1, START_TIME_SIZE)))
        if self._emit is not None:
            await self._emit(Batch(self._ds, rows, (start_time,)))

    async def wait(self) -> None:
        # A snapshot run ends only when stopped or timed out, as upstream's does.
        await self._done.wait()

    def lost(self) -> int:
        return 0  # the seq_file holds every record; nothing can be dropped in the kernel

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._snap is not None:
            if not self._snap.done():
                self._snap.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._snap
        bpf, self._bpf = self._bpf, None
        if self._link_fd >= 0:
            os.close(self._link_fd)
            self._link_fd = -1
        if bpf is not None:
            free_bpf(bpf)
        self._done.set()


def make_source(spec: GadgetSpec, values: Mapping[str, Any]) -> SnapshotSource:
    return SnapshotSource(spec, values)
