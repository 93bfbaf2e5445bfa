"""trace_capabilities: the ring-buffer tracer, plus what the BPF side cannot do.

Per batch, with numpy over the batch's columns and one stack-map walk per distinct stack of
the run (stack ids are stable: the kernel never reuses a taken bucket for another stack
without BPF_F_REUSE_STACKID):

- ``audit`` and ``insetid`` are inferred from the kernel stack, because the
  ``capability:cap_capable`` tracepoint does not carry cap_capable()'s ``opts``;
- the private ``__kstack`` and, with ``collect-ustack``, ``__ustack`` (the members right after
  ``ustack``) get the stacks' addresses, which the derived ``kstack`` and ``ustack.*``
  (:func:`kstack_text`, :func:`ustack_addresses`, :func:`ustack_symbols`, declared in
  gadget.yaml) format only when a consumer reads them.

``cap``, ``cap_effective`` and ``syscall`` are derived from their raw fields by the generic
rules (pipeline/derive: enums and ``gadget_syscall``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.accessors import column
from pipeline.batch import Batch, Coded
from pipeline.gadget import EBPF_PREFIX, GadgetSpec
from pipeline.schema import Field
from pipeline.sources.base import Emit, Log, SourceError
from pipeline.sources.tracer import TracerSource

KSTACK_FRAMES = USTACK_FRAMES = 32
"""Frames kept in the private ``__kstack``/``__ustack`` (program.bpf.c's GADGET_*STACK_FRAMES)."""
_KSTACK_BYTES = KSTACK_FRAMES * 8
_USTACK_BYTES = USTACK_FRAMES * 8
_NO_STACK = 0xFFFFFFFF
_NO_ADDRESSES = np.zeros(_KSTACK_BYTES, dtype=np.uint8)
# Wrappers of cap_capable() that pass CAP_OPT_NOAUDIT / CAP_OPT_INSETID (include/linux/security.h
# callers in kernel/capability.c); their frames name the option.
_NOAUDIT = b"noaudit"
_INSETID = (b"ns_capable_setid",)


def _private(batch: Batch) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Every record's private ``__ustack`` and ``__kstack`` bytes, which follow ``ustack``."""
    u = batch.schema.field("ustack")
    start = u.offs + u.size
    return (batch.rows[:, start: start + _USTACK_BYTES],
            batch.rows[:, start + _USTACK_BYTES: start + _USTACK_BYTES + _KSTACK_BYTES])


def _frames(stack: bytes) -> list[int]:
    """A stack's addresses up to its first empty slot."""
    out = []
    for a in np.frombuffer(stack, dtype="<u8").tolist():
        if not a:
            break
        out.append(a)
    return out


def _kernel_symbols(stack: bytes) -> bytes:
    """One kernel stack as upstream's ebpf operator prints it: each frame's symbol and "; ",
    innermost first."""
    from bcc import BPF

    return b"".join(BPF.ksym(a) + b"; " for a in _frames(stack))


def _by_key(key: npt.NDArray[Any], block: npt.NDArray[np.uint8],
            fmt: Callable[[int, bytes], bytes]) -> Coded:
    """``fmt(key, row)`` of one row per distinct ``key``: a stack id names its addresses within
    a run, so rows are grouped by the id (a sort of integers), not by their 256 bytes."""
    if len(key) == 0:
        return Coded([], np.zeros(0, dtype=np.intp))
    uniq, first, codes = np.unique(key, return_index=True, return_inverse=True)
    return Coded([fmt(k, block[i].tobytes()) for k, i in zip(uniq.tolist(), first.tolist(),
                                                             strict=True)],
                 codes.reshape(-1))


def kstack_text(batch: Batch, memo: dict[str, Any]) -> Coded:
    """Derived ``kstack``: each distinct stack of the batch symbolised once."""
    ids = column(batch, batch.schema.field("kstack_raw"))
    return _by_key(ids, _private(batch)[1], lambda _, stack: _kernel_symbols(stack))


def _ustack_key(batch: Batch) -> npt.NDArray[np.uint64]:
    """(process, user stack id) as one integer: the stack table is per run, and a process's
    mappings name the addresses."""
    tgid = column(batch, batch.schema.field("ustack.tgid_level0")).astype(np.uint64)
    sid = column(batch, batch.schema.field("ustack.stack_id")).astype(np.uint64)
    return (tgid << np.uint64(32)) | sid


def ustack_addresses(batch: Batch, memo: dict[str, Any]) -> Coded:
    """Derived ``ustack.addresses``: ``0x%016x; `` per frame, as upstream's ustack operator
    (empty when the stack was not collected)."""
    return _by_key(_ustack_key(batch), _private(batch)[0],
                   lambda _, s: "".join(f"0x{a:016x}; " for a in _frames(s)).encode())


def ustack_buildid(batch: Batch, memo: dict[str, Any]) -> Coded:
    """Derived ``ustack.buildid``: always empty, build ids are not collected (README)."""
    return Coded([b""], np.zeros(len(batch), dtype=np.intp))


def ustack_symbols(batch: Batch, memo: dict[str, Any]) -> Coded:
    """Derived ``ustack.symbols``: each distinct (process, stack) of the batch symbolised once
    from the process's mappings (bcc's symbol cache for its pid, made and freed per call), a
    frame it cannot name as ``0x%x``, each followed by "; " as upstream's ustack operator."""
    caches: dict[int, Any] = {}

    def symbolise(key: int, stack: bytes) -> bytes:
        pid = key >> 32
        frames = _frames(stack)
        if not frames:
            return b""
        sc = caches.get(pid)
        if sc is None:
            from bcc import SymbolCache

            sc = caches[pid] = SymbolCache(pid)
        out = bytearray()
        for a in frames:
            name = sc.resolve(a, True)[0]
            out += (name if name else f"0x{a:x}".encode()) + b"; "
        return bytes(out)

    try:
        return _by_key(_ustack_key(batch), _private(batch)[0], symbolise)
    finally:
        from bcc import lib

        for pid, sc in caches.items():
            lib.bcc_free_symcache(sc.cache, pid)


class CapabilitiesSource(TracerSource):
    """TracerSource whose batches get ``audit``, ``insetid`` and ``__kstack`` before they are
    emitted."""

    def __init__(self, spec: GadgetSpec, values: Mapping[str, Any]) -> None:
        super().__init__(spec, values)
        ds = spec.datasource("capabilities")
        self._f: dict[str, Field] = {f.full_name: f for f in ds.fields}
        layout = spec.structs.struct(spec.struct_names["capabilities"])
        u = self._f["ustack"]
        if getattr(layout, "__ustack").offset != u.offs + u.size or \
                getattr(layout, "__kstack").offset != u.offs + u.size + _USTACK_BYTES:
            raise SourceError("trace_capabilities: __ustack and __kstack must follow ustack "
                              f"({_USTACK_BYTES} and {_KSTACK_BYTES} bytes, gadget.yaml)")
        self._audit_only = bool(values.get(EBPF_PREFIX + "audit-only"))
        self._collect_ustack = bool(values.get(EBPF_PREFIX + "collect-ustack"))
        # Per run, since ids are per stack table: kernel stack id -> (audit, insetid,
        # addresses), user stack id -> addresses.
        self._stacks: dict[int, tuple[int, int, npt.NDArray[np.uint8]]] = {}
        self._ustacks: dict[int, npt.NDArray[np.uint8]] = {}
        self._stack_table: Any = None
        self._ustack_table: Any = None

    async def start(self, emit: Emit, log: Log) -> None:
        async def derived(batch: Batch) -> None:
            batch = self.derive(batch)
            if len(batch):
                await emit(batch)

        await super().start(derived, log)
        # Kept apart from self._bpf, which stop() clears before its last drain.
        self._stack_table = self._bpf[b"kstacks"] if self._bpf is not None else None
        self._ustack_table = self._bpf[b"ustacks"] if self._bpf is not None else None

    def _col(self, rows: npt.NDArray[np.uint8], name: str, dtype: str) -> npt.NDArray[Any]:
        """A writable view of a fixed-width field of every row."""
        f = self._f[name]
        return rows[:, f.offs: f.offs + f.size].view(dtype)[:, 0]

    def derive(self, batch: Batch) -> Batch:
        rows = batch.rows
        if not len(rows):
            return batch
        stack_ids = self._col(rows, "kstack_raw", "<u4")
        audit = self._col(rows, "audit", "<i4")
        insetid = self._col(rows, "insetid", "<i4")
        ustack, kstack = _private(batch)
        self._fill_ustacks(rows, ustack)
        # One lookup per distinct stack id, then every row takes its id's entry (a gather,
        # O(records)); an id that was not collected keeps audit and insetid at -1.
        uniq, inv = np.unique(stack_ids, return_inverse=True)
        found = [self._stack(sid) if sid != _NO_STACK else (-1, -1, _NO_ADDRESSES)
                 for sid in uniq.tolist()]
        audit[:] = np.array([a for a, _, _ in found], dtype="<i4")[inv]
        insetid[:] = np.array([i for _, i, _ in found], dtype="<i4")[inv]
        kstack[:] = np.stack([k for _, _, k in found])[inv]
        if self._audit_only:
            keep = audit != 0
            if not keep.all():
                return batch.select(keep)
        return batch

    def _fill_ustacks(self, rows: npt.NDArray[np.uint8], ustack: npt.NDArray[np.uint8]) -> None:
        """``__ustack`` of every row from the user stack table, once per distinct stack id
        (zeros where the stack was not collected)."""
        ustack[:] = 0
        if not self._collect_ustack or self._ustack_table is None:
            return
        ids = self._col(rows, "ustack.stack_id", "<u4")
        taken = self._col(rows, "ustack.inode", "<u8") != 0
        if not taken.any():
            return
        uniq, inv = np.unique(ids[taken], return_inverse=True)
        ustack[taken] = np.stack([self._ustack(sid) for sid in uniq.tolist()])[inv]

    def _ustack(self, sid: int) -> npt.NDArray[np.uint8]:
        """The addresses of user stack ``sid`` as the __ustack bytes, once per id."""
        addrs = self._ustacks.get(sid)
        if addrs is None:
            try:
                frames = list(self._ustack_table.walk(sid))[:USTACK_FRAMES]
            except KeyError:
                frames = []  # a failed get_stackid() (negative id) or a lost stack
            kept = np.zeros(USTACK_FRAMES, dtype="<u8")
            kept[: len(frames)] = frames
            addrs = self._ustacks[sid] = kept.view(np.uint8)
        return addrs

    def _stack(self, sid: int) -> tuple[int, int, npt.NDArray[np.uint8]]:
        """(audit, insetid, addresses as the __kstack bytes) of stack ``sid``, once per id."""
        hit = self._stacks.get(sid)
        if hit is not None:
            return hit
        from bcc import BPF

        addrs: list[int] = []
        if self._stack_table is not None:
            try:
                addrs = list(self._stack_table.walk(sid))
            except KeyError:
                addrs = []
        if not addrs:
            return -1, -1, _NO_ADDRESSES
        names = [BPF.ksym(a) for a in addrs]
        audit = 0 if any(_NOAUDIT in n for n in names) else 1
        insetid = 1 if any(n in _INSETID for n in names) else 0
        kept = np.zeros(KSTACK_FRAMES, dtype="<u8")
        kept[: min(len(addrs), KSTACK_FRAMES)] = addrs[:KSTACK_FRAMES]
        hit = (audit, insetid, kept.view(np.uint8))
        self._stacks[sid] = hit
        return hit


def make_source(spec: GadgetSpec, values: Mapping[str, Any]) -> CapabilitiesSource:
    return CapabilitiesSource(spec, values)
