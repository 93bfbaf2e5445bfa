"""Batch reader of a BPF ring buffer through its memory map.

The kernel maps a ring (stable ABI) as: one read-write page holding the consumer position,
then, read-only, a page holding the producer position followed by the data area mapped twice
back to back, so a run of records that wraps around the end is still contiguous. Each record is
an 8-byte header (u32 length whose bit 31 = still being written and bit 30 = discarded, u32 page
offset) and the record padded to 8 bytes. Fixed-size records therefore sit at a fixed stride and
a whole run of them is one 2-D numpy view: one Python call drains thousands of records.
"""

from __future__ import annotations

import contextlib
import mmap
import re
import struct
from typing import Any

import numpy as np
import numpy.typing as npt

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
LEN_MASK = ~(BUSY_BIT | DISCARD_BIT) & 0xFFFFFFFF
HEADER = 8
_POS = struct.Struct("<Q")


class RingError(RuntimeError):
    """The ring cannot be mapped, or holds records of another size than expected."""


def ring_size_of(map_fd: int) -> int:
    """The data area size of a ring map (its ``max_entries``), read from fdinfo."""
    try:
        with open(f"/proc/self/fdinfo/{map_fd}") as f:
            m = re.search(r"^max_entries:\s*(\d+)", f.read(), re.M)
    except OSError as e:
        raise RingError(f"cannot read fdinfo of map fd {map_fd}: {e}") from e
    if not m:
        raise RingError(f"fd {map_fd} is not a BPF map")
    return int(m[1])


def _round8(n: int) -> int:
    return (n + 7) & ~7


def valid_run(lengths: npt.NDArray[np.uint32]) -> int:
    """How many leading records are complete: the walk stops at the first busy header."""
    busy = np.flatnonzero(lengths & np.uint32(BUSY_BIT))
    return int(busy[0]) if busy.size else int(lengths.size)


class RingReader:
    """Drains one ring buffer in batches.

    Args:
        map_fd: the ring map's fd (bcc: ``bpf["events"].get_fd()``); not closed here.
        record_size: size of every record, or None when records vary in size.
    """

    def __init__(self, map_fd: int, record_size: int | None) -> None:
        self._fd = map_fd
        self.record_size = record_size
        self.size = ring_size_of(map_fd)
        self._mask = self.size - 1
        page = mmap.PAGESIZE
        self._page = page
        try:
            self._cons_map = mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                                       mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            self._data_map = mmap.mmap(map_fd, page + 2 * self.size, mmap.MAP_SHARED,
                                       mmap.PROT_READ, offset=page)
        except OSError as e:
            raise RingError(f"cannot mmap ring fd {map_fd}: {e}") from e
        self._data: npt.NDArray[np.uint8] = np.frombuffer(self._data_map, dtype=np.uint8)
        self._consumer: int = _POS.unpack_from(self._cons_map, 0)[0]
        self._stride = HEADER + _round8(record_size) if record_size else 0
        self.records_read = 0
        self.discarded = 0

    def fileno(self) -> int:
        return self._fd

    @property
    def producer(self) -> int:
        return int(_POS.unpack_from(self._data_map, 0)[0])

    @property
    def pending_bytes(self) -> int:
        return self.producer - int(self._consumer)

    def _advance(self, to: int) -> None:
        self._consumer = to
        _POS.pack_into(self._cons_map, 0, to)  # one aligned 8-byte store

    def drain(self, max_records: int = 65536) -> npt.NDArray[np.uint8]:
        """Every complete fixed-size record available (up to ``max_records``), copied out as
        rows of shape (n, record_size); the ring space is released before returning."""
        if not self.record_size:
            raise RingError("drain() needs fixed-size records; use drain_var()")
        size = self.record_size
        avail = self.producer - self._consumer
        n = min(avail // self._stride, max_records)
        if n <= 0:
            return np.empty((0, size), dtype=np.uint8)
        start = self._page + (self._consumer & self._mask)
        run = self._data[start: start + n * self._stride].reshape(n, self._stride)
        lengths = run[:, 0:4].copy().view("<u4").reshape(-1)
        n = valid_run(lengths)
        if n == 0:
            return np.empty((0, size), dtype=np.uint8)
        lengths = lengths[:n]
        real = lengths & np.uint32(LEN_MASK)
        if np.any(real != size):
            bad = int(real[np.flatnonzero(real != size)[0]])
            raise RingError(f"ring holds a {bad}-byte record, expected {size}: the BPF struct "
                            "and the data source layout disagree")
        keep = (lengths & np.uint32(DISCARD_BIT)) == 0
        rows = run[:n, HEADER: HEADER + size]
        out = np.array(rows, copy=True) if keep.all() else rows[keep].copy()
        self.discarded += int(n - out.shape[0])
        self._advance(self._consumer + n * self._stride)
        self.records_read += out.shape[0]
        return out

    def drain_var(self, max_records: int = 65536) -> list[bytes]:
        """Every complete record available, for rings whose records vary in size."""
        out: list[bytes] = []
        pos = self._consumer
        prod = self.producer
        data = self._data_map
        base = self._page
        while pos < prod and len(out) < max_records:
            off = base + (pos & self._mask)
            hdr = int.from_bytes(data[off: off + 4], "little")
            if hdr & BUSY_BIT:
                break
            length = hdr & LEN_MASK
            if not hdr & DISCARD_BIT:
                out.append(bytes(data[off + HEADER: off + HEADER + length]))
            else:
                self.discarded += 1
            pos += HEADER + _round8(length)
        if pos != self._consumer:
            self._advance(pos)
        self.records_read += len(out)
        return out

    def close(self) -> None:
        """Unmaps; idempotent. The fd belongs to bcc."""
        for name in ("_cons_map", "_data_map"):
            m = getattr(self, name, None)
            if m is not None and not m.closed:
                self._data = np.empty(0, dtype=np.uint8)
                # A view still alive keeps the mapping until its last reference goes.
                with contextlib.suppress(BufferError):
                    m.close()
        self._data = np.empty(0, dtype=np.uint8)


def read_lost(table: Any, ring_index: int = 1) -> int:
    """Sum over CPUs of the ``gadget_lost`` counter of ring ``ring_index`` (1-based)."""
    values = table[table.Key(ring_index - 1)]
    return int(sum(int(v) for v in values))


def is_readable(fd: int) -> bool:
    """Whether epoll/poll would wake a reader now (the BPF side forced a wake-up)."""
    import select

    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


__all__ = ["RingError", "RingReader", "is_readable", "read_lost", "ring_size_of", "valid_run"]
