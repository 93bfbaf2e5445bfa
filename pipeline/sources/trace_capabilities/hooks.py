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

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.accessors import column
from pipeline.batch import Batch, Coded
from pipeline.derive.formatters import by_unique_rows
from pipeline.gadget import EBPF_PREFIX, GadgetSpec
from pipeline.schema import Field
from pipeline.sources.base import Emit, Log, SourceError
from pipeline.sources.tracer import TracerSource

KSTACK_FRAMES = USTACK_FRAMES = 32
"""Frames kept in the private ``__kstack``/``__ustack`` (program.bpf.c's GADGET_*STACK_FRAMES)."""
_KSTACK_BYTES = KSTACK_FRAMES * 8
_USTACK_BYTES = USTACK_FRAMES * 8
_NO_STACK = 0xFFFFFFFF
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


def kstack_text(batch: Batch, memo: dict[str, Any]) -> Coded:
    """Derived ``kstack``: each distinct stack of the batch symbolised once."""
    return by_unique_rows(np.ascontiguousarray(_private(batch)[1]), _kernel_symbols)


def ustack_addresses(batch: Batch, memo: dict[str, Any]) -> Coded:
    """Derived ``ustack.addresses``: ``0x%016x; `` per frame, as upstream's ustack operator
    (empty when the stack was not collected)."""
    return by_unique_rows(np.ascontiguousarray(_private(batch)[0]),
                          lambda s: "".join(f"0x{a:016x}; " for a in _frames(s)).encode())


def ustack_buildid(batch: Batch, memo: dict[str, Any]) -> Coded:
    """Derived ``ustack.buildid``: always empty, build ids are not collected (README)."""
    return Coded([b""], np.zeros(len(batch), dtype=np.intp))


def ustack_symbols(batch: Batch, memo: dict[str, Any]) -> Coded:
    """Derived ``ustack.symbols``: each distinct (process, stack) of the batch symbolised once
    from the process's mappings (bcc's symbol cache for its pid, made and freed per call), a
    frame it cannot name as ``0x%x``, each followed by "; " as upstream's ustack operator."""
    stacks = _private(batch)[0]
    tgid = column(batch, batch.schema.field("ustack.tgid_level0")).astype("<u4")
    key = np.ascontiguousarray(np.concatenate([tgid.view(np.uint8).reshape(-1, 4), stacks],
                                              axis=1))
    caches: dict[int, Any] = {}

    def symbolise(k: bytes) -> bytes:
        frames = _frames(k[4:])
        if not frames:
            return b""
        pid = int.from_bytes(k[:4], "little")
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
        return by_unique_rows(key, symbolise)
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
        self._stack_table = self._bpf["kstacks"] if self._bpf is not None else None
        self._ustack_table = self._bpf["ustacks"] if self._bpf is not None else None

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
        kstack[:] = 0
        for sid in np.unique(stack_ids).tolist():
            if sid == _NO_STACK:
                continue  # not collected: audit and insetid stay -1
            a, s, addrs = self._stack(sid)
            mask = stack_ids == sid
            audit[mask] = a
            insetid[mask] = s
            kstack[mask] = addrs
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
        for sid in np.unique(ids[taken]).tolist():
            addrs = self._ustacks.get(sid)
            if addrs is None:
                try:
                    frames = list(self._ustack_table.walk(sid))[:USTACK_FRAMES]
                except KeyError:
                    frames = []  # a failed get_stackid() (negative id) or a lost stack
                kept = np.zeros(USTACK_FRAMES, dtype="<u8")
                kept[: len(frames)] = frames
                addrs = self._ustacks[sid] = kept.view(np.uint8)
            ustack[taken & (ids == sid)] = addrs

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
            return -1, -1, np.zeros(_KSTACK_BYTES, dtype=np.uint8)
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
