"""trace_capabilities: the ring-buffer tracer, plus what upstream derives from raw fields.

The strings ``cap``, ``syscall`` and ``kstack`` are static CString fields of the record that the
BPF program leaves alone; they are written here per batch with numpy (table lookups, one
symbolisation per distinct stack), so records keep one payload and the fast wire path.
``audit`` and ``insetid`` are inferred from the stack, because the ``capability:cap_capable``
tracepoint does not carry cap_capable()'s ``opts``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.batch import Batch
from pipeline.gadget import EBPF_PREFIX, GadgetSpec
from pipeline.schema import Field
from pipeline.sources.base import Emit, Log
from pipeline.sources.tracer import TracerSource

# include/uapi/linux/capability.h, by number.
CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK",
    "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG",
    "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)
# Where Debian's linux-libc-dev puts the syscall numbers of this architecture.
UNISTD_HEADERS = ("/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
                  "/usr/include/asm/unistd_64.h")
_NR = re.compile(r"^#define __NR_(\w+)\s+(\d+)\s*$", re.M)
# Wrappers of cap_capable() that pass CAP_OPT_NOAUDIT / CAP_OPT_INSETID (include/linux/security.h
# callers in kernel/capability.c); their frames name the option.
_NOAUDIT = b"noaudit"
_INSETID = (b"ns_capable_setid",)
MAX_FRAMES = 32


def syscall_names(headers: tuple[str, ...] = UNISTD_HEADERS) -> dict[int, str]:
    """Syscall number -> ``SYS_<NAME>``, from the first readable unistd header (else empty)."""
    for h in headers:
        try:
            text = Path(h).read_text()
        except OSError:
            continue
        return {int(nr): f"SYS_{name.upper()}" for name, nr in _NR.findall(text)}
    return {}


def _table(names: Mapping[int, str], width: int) -> npt.NDArray[np.uint8]:
    """Row i = the NUL-padded name of i; the last row is empty (for unknown values)."""
    size = max(names, default=-1) + 2
    out = np.zeros((size, width), dtype=np.uint8)
    for i, name in names.items():
        b = name.encode()[: width - 1]
        out[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    return out


def _lookup(table: npt.NDArray[np.uint8], values: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    idx = values.astype(np.uint64)
    idx = np.where(idx < table.shape[0] - 1, idx, table.shape[0] - 1).astype(np.intp)
    return table[idx]


class CapabilitiesSource(TracerSource):
    """TracerSource whose batches get their derived fields before they are emitted."""

    def __init__(self, spec: GadgetSpec, values: Mapping[str, Any]) -> None:
        super().__init__(spec, values)
        ds = spec.datasource("capabilities")
        self._f: dict[str, Field] = {f.full_name: f for f in ds.fields}
        self._caps = _table(dict(enumerate(CAPABILITIES)), self._f["cap"].size)
        self._syscalls = _table(syscall_names(), self._f["syscall"].size)
        self._audit_only = bool(values.get(EBPF_PREFIX + "audit-only"))
        self._stacks: dict[int, tuple[int, int, bytes]] = {}
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

    def _span(self, rows: npt.NDArray[np.uint8], name: str) -> npt.NDArray[np.uint8]:
        f = self._f[name]
        return rows[:, f.offs: f.offs + f.size]

    def derive(self, batch: Batch) -> Batch:
        rows = batch.rows
        if not len(rows):
            return batch
        self._span(rows, "cap")[:] = _lookup(self._caps, self._col(rows, "cap_raw", "<u4"))
        self._span(rows, "syscall")[:] = _lookup(self._syscalls,
                                                 self._col(rows, "syscall_raw", "<u8"))
        stack_ids = self._col(rows, "kstack_raw", "<u4")
        audit = self._col(rows, "audit", "<i4")
        insetid = self._col(rows, "insetid", "<i4")
        kstack = self._span(rows, "kstack")
        kstack[:] = 0
        for sid in np.unique(stack_ids).tolist():
            if sid == 0xFFFFFFFF:
                continue  # not collected: audit and insetid stay -1
            a, s, text = self._stack(sid, kstack.shape[1])
            mask = stack_ids == sid
            audit[mask] = a
            insetid[mask] = s
            kstack[mask, : len(text)] = np.frombuffer(text, dtype=np.uint8)
        if self._audit_only:
            keep = audit != 0
            if not keep.all():
                return batch.select(keep)
        return batch

    def _stack(self, sid: int, width: int) -> tuple[int, int, bytes]:
        """(audit, insetid, symbolised stack) of stack ``sid``, once per id: ids are stable,
        the kernel never reuses a taken bucket for another stack without BPF_F_REUSE_STACKID."""
        hit = self._stacks.get(sid)
        if hit is not None:
            return hit
        from bcc import BPF

        names: list[bytes] = []
        if self._stack_table is not None:
            try:
                for addr in self._stack_table.walk(sid):
                    names.append(BPF.ksym(addr))
                    if len(names) >= MAX_FRAMES:
                        break
            except KeyError:
                names = []
        if not names:
            return -1, -1, b""
        audit = 0 if any(_NOAUDIT in n for n in names) else 1
        insetid = 1 if any(n in _INSETID for n in names) else 0
        text = b"; ".join(names)[: width - 1]
        self._stacks[sid] = (audit, insetid, text)
        return audit, insetid, text


def make_source(spec: GadgetSpec, values: Mapping[str, Any]) -> CapabilitiesSource:
    return CapabilitiesSource(spec, values)
