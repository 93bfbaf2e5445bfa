"""top_file: drains the kernel's per-file counters once per interval into one array batch.

The BPF program aggregates in the hash map ``stats`` (key ``file_id``, value ``file_stat``);
every ``map-fetch-interval`` this source takes and deletes every entry with one
``BPF_MAP_LOOKUP_AND_DELETE_BATCH`` walk into numpy buffers (no per-entry syscalls), so each
report holds the counts of its interval. Rows are sorted and cut to ``max-rows``; the key
bytes become payload 0 and the value bytes payload 1 of each record, as upstream's map
iterators send them. ``file`` is the absolute path, built in the kernel (``bpf/gadget_path.h``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from pipeline.batch import Batch
from pipeline.gadget import EBPF_PREFIX, GadgetSpec
from pipeline.schema import NUMPY_DTYPE, Field, Kind
from pipeline.severity import Severity
from pipeline.sources.base import Emit, Log, SourceError, load_in_thread
from pipeline.sources.tracer import (
    COMPILE_LOCK,
    TracerSource,
    check_environment,
    free_bpf,
    import_bcc,
)

if TYPE_CHECKING:
    from bcc import BPF

MAP = b"stats"
MAP_ENTRIES = 10240
_ATTACH_FAIL = "to tracepoint"
_SORT_ALIASES = {"rbytes": "rbytes_raw", "wbytes": "wbytes_raw", "t": "t_raw",
                 "pid": "proc.pid", "comm": "proc.comm", "tid": "proc.tid"}


def parse_sort(spec: str, fields: Mapping[str, Field]) -> list[tuple[Field, bool]]:
    """``-reads,file`` -> [(reads, descending), (file, ascending)]; SourceError names a bad
    field."""
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        desc = part.startswith("-")
        name = part.lstrip("+-")
        f = fields.get(_SORT_ALIASES.get(name, name))
        if f is None or not f.has_value or f.base_kind is Kind.BYTES:
            known = ", ".join(sorted(n for n, g in fields.items()
                                     if g.has_value and g.base_kind is not Kind.BYTES))
            raise SourceError(f"{EBPF_PREFIX}sort-by: no sortable field {name!r} (fields: "
                              f"{known})")
        out.append((f, desc))
    return out


class TopFileSource(TracerSource):
    """Interval reports of the ``stats`` map. Reuses the tracer's cflags and its loader."""

    def __init__(self, spec: GadgetSpec, values: Mapping[str, Any]) -> None:
        super().__init__(spec, values)
        self._ds = spec.datasources[0]
        self._fields = {f.full_name: f for f in self._ds.fields}
        self._period = float(values.get(EBPF_PREFIX + "map-fetch-interval") or 1.0)
        self._count = int(values.get(EBPF_PREFIX + "map-fetch-count") or 0)
        self._max = int(values.get(EBPF_PREFIX + "max-rows") or 0)
        self._sort = parse_sort(str(values.get(EBPF_PREFIX + "sort-by") or ""), self._fields)
        self._key_size = self._ds.record_size
        self._value_size = 0
        self._done = asyncio.Event()
        self._ticker: asyncio.Task[None] | None = None

    async def start(self, emit: Emit, log: Log) -> None:
        check_environment()
        if self._period <= 0:
            raise SourceError(f"{EBPF_PREFIX}map-fetch-interval must be more than 0")
        self._emit = emit
        self._log = log
        self._bpf = await load_in_thread(self._load_map, self._free_abandoned)
        self._ticker = asyncio.create_task(self._tick(), name=f"top:{self._spec.name}")

    def _load_map(self) -> BPF:
        bcc = import_bcc()
        try:
            with COMPILE_LOCK:
                bpf = bcc.BPF(src_file=str(self._spec.program).encode(), cflags=self._cflags)
        except Exception as e:  # bcc raises bare Exception for every failure
            msg = str(e)
            if _ATTACH_FAIL in msg:
                raise SourceError(f"gadget {self._spec.name}: a hook is missing on this "
                                  f"kernel: {msg}") from e
            raise SourceError(f"gadget {self._spec.name}: loading {self._spec.program.name} "
                              f"failed: {msg} (clang/verifier output is in the daemon log)"
                              ) from e
        try:
            self._check_map_layout(bpf)
        except Exception:
            free_bpf(bpf)
            raise
        return bpf

    def _check_map_layout(self, bpf: BPF) -> None:
        """gadget.yaml's key/value layouts against the structs clang compiled."""
        table = bpf[MAP]
        self._value_size = ctypes.sizeof(table.Leaf)
        for payload, ctype in ((0, table.Key), (1, table.Leaf)):
            for f in self._ds.fields:
                if f.payload_index != payload or f.parent is not None:
                    continue
                desc = getattr(ctype, f.name, None)
                if desc is None or desc.offset != f.offs or desc.size != f.size:
                    raise SourceError(f"gadget {self._spec.name}: field {f.full_name!r} is at "
                                      f"{getattr(desc, 'offset', '?')}/"
                                      f"{getattr(desc, 'size', '?')} in C but {f.offs}/{f.size}"
                                      " in gadget.yaml")
        if ctypes.sizeof(table.Key) != self._key_size:
            raise SourceError(f"gadget {self._spec.name}: key struct is "
                              f"{ctypes.sizeof(table.Key)} bytes in C, {self._key_size} in "
                              "gadget.yaml")

    def _drain(self) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
        """Every entry of the map, deleted as it is read: (keys, values) as byte rows."""
        from bcc import libbcc

        if self._bpf is None:
            return np.empty((0, self._key_size), np.uint8), np.empty((0, 0), np.uint8)
        fd = self._bpf[MAP].get_fd()
        keys = np.empty((MAP_ENTRIES, self._key_size), dtype=np.uint8)
        values = np.empty((MAP_ENTRIES, self._value_size), dtype=np.uint8)
        token = ctypes.c_uint32(0)
        count = ctypes.c_uint32(0)
        total = 0
        while total < MAP_ENTRIES:
            count.value = MAP_ENTRIES - total
            res = libbcc.lib.bpf_lookup_and_delete_batch(
                fd, ctypes.byref(token) if total else None, ctypes.byref(token),
                ctypes.c_void_p(keys.ctypes.data + total * self._key_size),
                ctypes.c_void_p(values.ctypes.data + total * self._value_size),
                ctypes.byref(count))
            err = ctypes.get_errno()
            total += count.value
            if res != 0:
                if err != errno.ENOENT and -res != errno.ENOENT:
                    raise OSError(err or -res, f"BPF_MAP_LOOKUP_AND_DELETE_BATCH on {MAP.decode()}")
                break  # ENOENT: the walk reached the end
            if count.value == 0:
                break
        return keys[:total], values[:total]

    def _column(self, keys: npt.NDArray[np.uint8], values: npt.NDArray[np.uint8],
                f: Field) -> npt.NDArray[Any]:
        rows = keys if f.payload_index == 0 else values
        block = rows[:, f.offs: f.offs + f.size]
        if f.base_kind is Kind.CSTRING:
            return np.ascontiguousarray(block).view(f"S{f.size}").reshape(-1)
        return np.ascontiguousarray(block).view(NUMPY_DTYPE[f.base_kind]).reshape(-1)

    def _report(self, keys: npt.NDArray[np.uint8], values: npt.NDArray[np.uint8]) -> Batch:
        if len(keys) and self._sort:
            # lexsort sorts by its last key first; descending numbers sort by their negation.
            cols = []
            for f, desc in reversed(self._sort):
                col = self._column(keys, values, f)
                if desc:
                    # Dense ranks (ties stay ties for the next key), negated.
                    col = -np.unique(col, return_inverse=True)[1].reshape(-1)
                cols.append(col)
            order = np.lexsort(cols)
            keys, values = keys[order], values[order]
        if self._max:
            keys, values = keys[: self._max], values[: self._max]
        return Batch(self._ds, np.ascontiguousarray(keys),
                     ([v.tobytes() for v in values],))

    async def _tick(self) -> None:
        reports = 0
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self._period
        while not self._stopping:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += self._period
            try:
                keys, values = await asyncio.to_thread(self._drain)
            except OSError as e:
                self._log(Severity.ERROR, f"draining the counters failed: {e}")
                break
            batch = self._report(keys, values)
            if self._emit is not None and len(batch):
                await self._emit(batch)
            reports += 1
            if self._count and reports >= self._count:
                break
        self._done.set()

    async def wait(self) -> None:
        await self._done.wait()

    def lost(self) -> int:
        return 0  # counted in place: nothing is queued that could be dropped

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._ticker
        bpf, self._bpf = self._bpf, None
        if bpf is not None:
            free_bpf(bpf)
        self._done.set()


def make_source(spec: GadgetSpec, values: Mapping[str, Any]) -> TopFileSource:
    return TopFileSource(spec, values)
