"""The ring-buffer tracer: compiles a gadget's BPF C with bcc, attaches its hooks, and drains
each data source's ring buffer in whole batches on a timer or a fill-level wake-up."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import re
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.batch import Batch, Rows
from pipeline.containers.selector import ContainerSelector
from pipeline.gadget import BPF_INCLUDE_DIR, RUNTIME_PREFIX, GadgetSpec
from pipeline.heap import trim_heap
from pipeline.schema import DataSourceSchema, FieldFlag
from pipeline.sources.base import Emit, Log, SourceError, load_in_thread
from pipeline.sources.drain_pacer import DrainPacer
from pipeline.sources.ringbuf import RingReader, RingWakeups, read_lost, record_stride

if TYPE_CHECKING:
    from bcc import BPF

_logger = logging.getLogger(__name__)
_ATTACH_FAIL = re.compile(r"to tracepoint b?'?([\w:]+)")
_SAFE_COMM = re.compile(r"^[\w .:/@+-]{1,15}$")
PAGE = 4096
COMPILE_LOCK = threading.Lock()
"""Held around every ``bcc.BPF()`` compile: libbcc's clang/LLVM is not thread-safe, and runs
starting together (a config's instances, a client's run) compile in worker threads at once
(seen: segfaults and spurious 'linux/types.h not found')."""


def free_bpf(bpf: BPF) -> None:
    """Detaches and closes everything of a loaded BPF module, and lets the object go: bcc
    registers every module's ``cleanup`` with :mod:`atexit` and never unregisters it, which
    kept each run's module, tables and ctypes types alive until the daemon exited (measured:
    ~1 MiB of anonymous memory per finished run)."""
    bpf.cleanup()
    atexit.unregister(bpf.cleanup)


def import_bcc() -> Any:
    """The bcc module, or a SourceError that says how to install it."""
    try:
        import bcc
    except ImportError as e:
        raise SourceError("bcc is not importable: install Debian's python3-bpfcc and run "
                          "scripts/setup base (it links bcc into the venv)") from e
    return bcc


def check_environment() -> None:
    """Fails early with the fix when the daemon cannot run BPF at all."""
    import os
    from pathlib import Path

    if os.geteuid() != 0:
        raise SourceError("loading BPF programs needs root (or CAP_BPF+CAP_PERFMON): "
                          "run the daemon with sudo")
    build = Path(f"/lib/modules/{os.uname().release}/build/include")
    if not build.exists():
        raise SourceError(f"kernel headers are missing at {build.parent}: run scripts/setup "
                          "base (installs linux-headers and links them)")
    if not Path("/sys/kernel/tracing/events").exists() and \
            not Path("/sys/kernel/debug/tracing/events").exists():
        raise SourceError("tracefs is not mounted: mount -t tracefs tracefs /sys/kernel/tracing")


def _ring_pages(size: int) -> int:
    pages = max(1, size // PAGE)
    return 1 << (pages - 1).bit_length()  # the kernel wants a power of two


def boot_to_wall_offset_ns() -> int:
    """Wall-clock ns minus CLOCK_BOOTTIME ns, for rewriting BPF timestamps in place."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


class TracerSource:
    """Source for gadgets whose BPF program writes fixed-size records into ring buffers.

    The program declares, per data source ``ds``, a ring named ``events`` (one data source) or
    ``events_<ds>`` and ``GADGET_LAYOUT(ds, struct ...)`` so the layout can be checked against
    gadget.yaml at load time.
    """

    def __init__(self, spec: GadgetSpec, values: Mapping[str, Any]) -> None:
        self._spec = spec
        self._values = values
        self._bpf: BPF | None = None
        self._readers: list[tuple[DataSourceSchema, RingReader]] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._wakeups: RingWakeups | None = None
        self._ts_cols: dict[str, list[int]] = {}
        self._stopping = False
        self._emit: Emit | None = None
        self._interval = float(values.get(RUNTIME_PREFIX + "drain-interval") or 0.01)
        self._pacer = DrainPacer.from_values(self._interval, values)
        self._cflags = self._build_cflags()
        self._ts_offset = 0
        self._lost_base = 0
        self._shed_base = 0

    def _build_cflags(self) -> list[str]:
        from pipeline.sources.btf import gadget_cflags

        ring = _ring_pages(int(self._values.get(RUNTIME_PREFIX + "ringbuf-size") or 8 << 20))
        for ds in self._spec.datasources:
            # A ring that cannot hold one record loses every record: refuse it, with the size
            # that would do.
            size = self.ring_record_size(ds)
            if record_stride(size) > ring * PAGE:
                need = _ring_pages(record_stride(size) + PAGE - 1) * PAGE
                raise SourceError(f"{RUNTIME_PREFIX}ringbuf-size: a ring of {ring * PAGE} bytes "
                                  f"cannot hold one {ds.name!r} record ({size} bytes); "
                                  f"use at least {need}")
        fill = int(self._values.get(RUNTIME_PREFIX + "wakeup-fill") or 25)
        flags = [f"-I{BPF_INCLUDE_DIR}", f"-DGADGET_RING_PAGES={ring}",
                 f"-DGADGET_WAKEUP_BYTES={ring * PAGE * fill // 100}", *gadget_cflags()]
        if self._values.get(RUNTIME_PREFIX + "shed"):
            flags.append("-DGADGET_SHED=1")  # gadget_sample.h: sampling in gadget_reserve
        if ContainerSelector.from_values(self._values).active:
            flags.append("-DGADGET_FILTER_CONTAINERS=1")  # gadget_filter.h: gadget_mntns_filter
        for p in self._spec.params:
            macro = p.extra.get("cflag")
            value = self._values.get(p.full_key)
            if not macro or value is None or value == "":
                continue
            if isinstance(value, bool):
                flags.append(f"-D{macro}={int(value)}")
            elif isinstance(value, int):
                suffix = "ULL" if value > 0x7FFFFFFF else ""
                flags.append(f"-D{macro}={value}{suffix}")
            else:
                if not _SAFE_COMM.match(str(value)):
                    raise SourceError(f"{p.full_key}: {value!r} must be 1-15 characters of "
                                      "letters, digits and . : / @ + - _")
                flags.append(f'-D{macro}="{value}"')
        return flags

    async def start(self, emit: Emit, log: Log) -> None:
        check_environment()
        self._emit = emit
        self._log = log
        self._bpf = await load_in_thread(self._load, self._free_abandoned)
        self._ts_offset = boot_to_wall_offset_ns()
        loop = asyncio.get_running_loop()
        # Not the rings' own fds: once woken, those stay level-readable while any record is
        # pending, and the timed drain would become a busy loop of ~10-record batches.
        self._wakeups = RingWakeups(reader.fileno() for _, reader in self._readers)
        loop.add_reader(self._wakeups.fileno(), self._on_wakeup)
        self._task = asyncio.create_task(self._pump(), name=f"drain:{self._spec.name}")

    def _load(self) -> BPF:
        bcc = import_bcc()
        try:
            with COMPILE_LOCK:
                try:
                    bpf = bcc.BPF(src_file=str(self._spec.program).encode(),
                                  cflags=self._cflags)
                finally:
                    trim_heap()  # clang/LLVM free ~25-30 MB per compile
        except Exception as e:  # bcc raises bare Exception for every failure
            msg = str(e)
            m = _ATTACH_FAIL.search(msg)
            if m:
                raise SourceError(f"gadget {self._spec.name}: hook tracepoint {m[1]} is missing "
                                  "on this kernel") from e
            raise SourceError(f"gadget {self._spec.name}: loading {self._spec.program.name} "
                              f"failed: {msg} (clang/verifier output is in the daemon log)") from e
        try:
            for ds in self._spec.datasources:
                self._check_layout(bpf, ds)
                ring = "events" if len(self._spec.datasources) == 1 else f"events_{ds.name}"
                self._readers.append((ds, RingReader(bpf[ring.encode()].get_fd(),
                                                     self.ring_record_size(ds))))
        except Exception:
            free_bpf(bpf)
            raise
        return bpf

    def _free_abandoned(self, bpf: BPF) -> None:
        """Frees a load whose start was cancelled (see load_in_thread)."""
        for _, reader in self._readers:
            reader.close()
        self._readers.clear()
        free_bpf(bpf)

    def _check_layout(self, bpf: BPF, ds: DataSourceSchema) -> None:
        """Compares gadget.yaml's layout with the struct clang compiled (bcc's ctypes leaf)."""
        import ctypes

        leaf = bpf[f"gadget_layout_{ds.name}".encode()].Leaf
        if ctypes.sizeof(leaf) != ds.record_size:
            raise SourceError(f"gadget {self._spec.name}: struct for {ds.name!r} is "
                              f"{ctypes.sizeof(leaf)} bytes in C but {ds.record_size} in "
                              "gadget.yaml")
        for f in ds.fields:
            if f.flags & FieldFlag.HAS_PARENT or f.payload_index != 0:
                continue
            desc = getattr(leaf, f.name, None)
            if desc is None or desc.offset != f.offs or desc.size != f.size:
                raise SourceError(f"gadget {self._spec.name}: field {f.full_name!r} is at "
                                  f"{getattr(desc, 'offset', '?')}/{getattr(desc, 'size', '?')} "
                                  f"in C but {f.offs}/{f.size} in gadget.yaml")

    def ring_record_size(self, ds: DataSourceSchema) -> int:
        """Bytes of each ring record of ``ds``: its payload 0 (the struct gadget.yaml lays
        out), unless a gadget's source carries more in the record (see :meth:`make_batch`)."""
        return ds.record_size

    def make_batch(self, ds: DataSourceSchema, rows: Rows) -> Batch:
        """The batch of drained ``rows``. A gadget whose data source has further payloads
        (gadget.yaml ``payloads:``) may fill them here; those it leaves out get their defaults
        (zeros, empty: pipeline/operators/derive.py)."""
        return Batch(ds, rows)

    def _timestamp_columns(self, ds: DataSourceSchema) -> list[int]:
        # Computed once per data source: this runs on every drain.
        cols = self._ts_cols.get(ds.name)
        if cols is None:
            cols = self._ts_cols[ds.name] = self._find_timestamp_columns(ds)
        return cols

    @staticmethod
    def _find_timestamp_columns(ds: DataSourceSchema) -> list[int]:
        return [f.offs for f in ds.fields if "type:gadget_timestamp" in f.tags and
                f.payload_index == 0 and not f.flags & FieldFlag.HAS_PARENT]

    def _drain_once(self) -> list[Batch]:
        out = []
        for ds, reader in self._readers:
            while True:
                rows = reader.drain()
                if not len(rows):
                    break
                for offs in self._timestamp_columns(ds):
                    col = rows[:, offs: offs + 8].view("<u8")
                    np.add(col, np.uint64(self._ts_offset), out=col, where=col != 0)
                out.append(self.make_batch(ds, rows))
                if len(rows) < 65536:
                    break
        return out

    def _on_wakeup(self) -> None:
        if self._wakeups is not None:
            self._wakeups.consume()
        self._pacer.woken()
        self._wake.set()

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._emit is not None
        # Waits first: the rings are empty when start() returns (the ready moment), so the
        # first drain is a timer tick or a wake-up after it, as every later one.
        while not self._stopping:
            handle = loop.call_later(self._interval, self._wake.set)
            await self._wake.wait()
            handle.cancel()
            self._wake.clear()  # a wake-up while emitting drains again at once
            if not (self._stopping or self._pacer.due((r for _, r in self._readers),
                                                       loop.time())):
                continue
            for batch in self._drain_once():
                await self._emit(batch)

    async def wait(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)

    def lost(self) -> int:
        if self._bpf is None:
            return self._lost_base
        try:
            return sum(read_lost(self._bpf[b"gadget_lost"], i + 1)
                       for i in range(len(self._readers)))
        except KeyError:
            return 0

    def table(self, name: str) -> Any | None:
        """The loaded program's BPF map ``name`` (None before the load, or without one)."""
        if self._bpf is None:
            return None
        try:
            return self._bpf[name.encode()]
        except KeyError:
            return None

    def set_sample_rate(self, rate: int) -> bool:
        """Keeps 1 record in ``rate`` (1: all) in every ring, from the next reserve on.

        Returns:
            False when the program was not compiled with shedding (``operator.bcc.shed``) or
            does not reserve through gadget_reserve, so nothing is sampled.
        """
        if self._bpf is None:
            return False
        try:
            table = self._bpf[b"gadget_sample"]
        except KeyError:
            return False
        for i in range(len(self._readers)):
            table[table.Key(i)] = table.Leaf(max(1, rate))
        return True

    def shed(self) -> int:
        """Records the BPF side sampled out (load shedding), so far."""
        if self._bpf is None:
            return self._shed_base
        try:
            return sum(read_lost(self._bpf[b"gadget_shed"], i + 1)
                       for i in range(len(self._readers)))
        except KeyError:
            return 0

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        bpf, self._bpf = self._bpf, None
        if bpf is None:
            return
        try:
            # Detach first so nothing new arrives, then hand on what the rings still hold.
            for tp in list(bpf.tracepoint_fds):
                with contextlib.suppress(Exception):
                    bpf.detach_tracepoint(tp)
            if self._emit is not None:
                for batch in self._drain_once():
                    await self._emit(batch)
            with contextlib.suppress(KeyError):
                self._lost_base = sum(read_lost(bpf[b"gadget_lost"], i + 1)
                                      for i in range(len(self._readers)))
            with contextlib.suppress(KeyError):
                self._shed_base = sum(read_lost(bpf[b"gadget_shed"], i + 1)
                                      for i in range(len(self._readers)))
        finally:
            loop = asyncio.get_running_loop()
            if self._wakeups is not None:
                loop.remove_reader(self._wakeups.fileno())
                self._wakeups.close()
                self._wakeups = None
            for _, reader in self._readers:
                reader.close()
            self._readers.clear()
            free_bpf(bpf)  # closes the program fds: nothing stays attached

    def extra_info(self) -> Mapping[str, tuple[str, bytes]]:
        return {
            "ebpf.source": ("text/plain", self._spec.program.read_bytes()),
            "ebpf.cflags": ("text/plain", " ".join(self._cflags).encode()),
        }
