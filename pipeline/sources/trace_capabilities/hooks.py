"""trace_capabilities: the ring-buffer tracer, plus what the BPF side cannot do.

Per batch, with numpy over the batch's columns and one stack-map walk per distinct stack of
the run (stack ids are stable: the kernel never reuses a taken bucket for another stack
without BPF_F_REUSE_STACKID):

- ``audit`` and ``insetid`` are inferred from the kernel stack, because the
  ``capability:cap_capable`` tracepoint does not carry cap_capable()'s ``opts``;
- the private ``__kstack`` (the last member of the record) gets the stack's addresses, which
  the derived ``kstack`` (:func:`kstack_text`, declared in gadget.yaml) symbolises only when a
  consumer reads it.

``cap``, ``cap_effective`` and ``syscall`` are derived from their raw fields by the generic
rules (pipeline/derive: enums and ``gadget_syscall``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.batch import Batch, Coded
from pipeline.derive.formatters import by_unique_rows
from pipeline.gadget import EBPF_PREFIX, GadgetSpec
from pipeline.schema import Field
from pipeline.sources.base import Emit, Log, SourceError
from pipeline.sources.tracer import TracerSource

KSTACK_FRAMES = 32
"""Frames kept in the private ``__kstack`` (program.bpf.c's GADGET_KSTACK_FRAMES)."""
_KSTACK_BYTES = KSTACK_FRAMES * 8
_NO_STACK = 0xFFFFFFFF
# Wrappers of cap_capable() that pass CAP_OPT_NOAUDIT / CAP_OPT_INSETID (include/linux/security.h
# callers in kernel/capability.c); their frames name the option.
_NOAUDIT = b"noaudit"
_INSETID = (b"ns_capable_setid",)


def _kstack_block(batch: Batch) -> npt.NDArray[np.uint8]:
    """Every record's private ``__kstack`` bytes: the record's last KSTACK_FRAMES words."""
    size = batch.schema.record_size
    return batch.rows[:, size - _KSTACK_BYTES: size]


def _symbolise(stack: bytes) -> bytes:
    """One stack as upstream's ebpf operator prints it: each frame's symbol and "; ", innermost
    first, up to the first empty slot."""
    from bcc import BPF

    addrs = np.frombuffer(stack, dtype="<u8")
    out = bytearray()
    for a in addrs.tolist():
        if not a:
            break
        out += BPF.ksym(a) + b"; "
    return bytes(out)


def kstack_text(batch: Batch, memo: dict[str, Any]) -> Coded:
    """Derived ``kstack``: each distinct stack of the batch symbolised once."""
    return by_unique_rows(np.ascontiguousarray(_kstack_block(batch)), _symbolise)


class CapabilitiesSource(TracerSource):
    """TracerSource whose batches get ``audit``, ``insetid`` and ``__kstack`` before they are
    emitted."""

    def __init__(self, spec: GadgetSpec, values: Mapping[str, Any]) -> None:
        super().__init__(spec, values)
        ds = spec.datasource("capabilities")
        self._f: dict[str, Field] = {f.full_name: f for f in ds.fields}
        last = getattr(spec.structs.struct(spec.struct_names["capabilities"]), "__kstack")
        if last.offset + last.size != ds.record_size or last.size != _KSTACK_BYTES:
            raise SourceError("trace_capabilities: __kstack must be the record's last "
                              f"{_KSTACK_BYTES} bytes (gadget.yaml)")
        self._audit_only = bool(values.get(EBPF_PREFIX + "audit-only"))
        # stack id -> (audit, insetid, addresses): per run, since ids are per stack map.
        self._stacks: dict[int, tuple[int, int, npt.NDArray[np.uint8]]] = {}
        self._stack_table: Any = None

    async def start(self, emit: Emit, log: Log) -> None:
        async def derived(batch: Batch) -> None:
            batch = self.derive(batch)
            if len(batch):
                await emit(batch)

        await super().start(derived, log)
        # Kept apart from self._bpf, which stop() clears before its last drain.
        self._stack_table = self._bpf["kstacks"] if self._bpf is not None else None

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
        kstack = _kstack_block(batch)
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
