"""Readable forms of raw values, computed for a whole column at once.

Each function takes a numpy column and returns a :class:`~pipeline.batch.Coded` column: the
distinct values of the column are found with ``numpy.unique`` and only those are formatted, so
a batch of 10 000 opens that failed with 3 different errnos formats 3 strings. Timestamps, the
one kind whose values are nearly all distinct, are formatted by numpy's datetime conversion.
The texts are upstream Inspektor Gadget's (pkg/operators/formatters, uidgidresolver and the
ebpf operator's enum formatter), so clients see the same strings from both daemons.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.batch import Coded, Fixed
from pipeline.derive.syscalls import SYSCALL_NAMES
from pipeline.derive.tables import ERRNO_NAMES, SIGNAL_NAMES

Column = npt.NDArray[Any]


def distinct(col: Column) -> tuple[list[Any], npt.NDArray[np.intp]]:
    """The distinct values of ``col`` and each record's index into them.

    A batch usually holds one value of a column (one process's flags, mode, user): that case
    is one comparison pass, not the sort ``np.unique`` needs."""
    n = len(col)
    if n and bool((col == col[0]).all()):
        return [col[0].item()], np.zeros(n, dtype=np.intp)
    uniq, codes = np.unique(col, return_inverse=True)
    return uniq.tolist(), codes.reshape(-1)


def by_unique(col: Column, fmt: Callable[[int], bytes]) -> Coded:
    """``fmt`` applied to each distinct value of ``col`` once."""
    if len(col) == 0:
        return Coded([], np.zeros(0, dtype=np.intp))
    values, codes = distinct(col)
    return Coded([fmt(int(v)) for v in values], codes)


def by_unique_rows(block: npt.NDArray[np.uint8], fmt: Callable[[bytes], bytes]) -> Coded:
    """``fmt`` applied to each distinct row of a (n, w) byte block once."""
    if len(block) == 0:
        return Coded([], np.zeros(0, dtype=np.intp))
    uniq, codes = np.unique(block, axis=0, return_inverse=True)
    return Coded([fmt(r.tobytes()) for r in uniq], codes.reshape(-1))


# -- errno, signal, syscall -------------------------------------------------------------------

def errno_name(n: int) -> bytes:
    """``unix.ErrnoName``; empty for 0 (success), ``error#<n>`` for an unknown errno."""
    name = ERRNO_NAMES.get(n)
    if name is not None:
        return name.encode()
    return b"" if n == 0 else f"error#{n}".encode()


def signal_name(n: int) -> bytes:
    """``unix.SignalName``, or ``signal#<n>``."""
    name = SIGNAL_NAMES.get(n)
    return name.encode() if name is not None else f"signal#{n}".encode()


def syscall_name(n: int) -> bytes:
    name = SYSCALL_NAMES.get(n, "unknown")
    return ("SYS_" + name.upper()).encode()


# -- files ------------------------------------------------------------------------------------

_ACCMODE = {0: "O_RDONLY", 1: "O_WRONLY", 2: "O_RDWR"}
_OPEN_FLAGS: tuple[tuple[int, str], ...] = (
    (0o100, "O_CREAT"), (0o200, "O_EXCL"), (0o400, "O_NOCTTY"), (0o1000, "O_TRUNC"),
    (0o2000, "O_APPEND"), (0o4000, "O_NONBLOCK"), (0o10000, "O_DSYNC"), (0o20000, "O_FASYNC"),
    (0o40000, "O_DIRECT"), (0o100000, "O_LARGEFILE"), (0o200000, "O_DIRECTORY"),
    (0o400000, "O_NOFOLLOW"), (0o1000000, "O_NOATIME"), (0o2000000, "O_CLOEXEC"),
)


def open_flags(flags: int) -> bytes:
    """open(2) flags as upstream's ``decodeFlags`` joins them: the access mode, then each set
    flag, ``|``-separated (O_SYNC shows as O_DSYNC plus its own bit, as there)."""
    out = []
    acc = _ACCMODE.get(flags & 3)
    if acc is not None:
        out.append(acc)
    out.extend(name for bit, name in _OPEN_FLAGS if flags & bit == bit)
    return "|".join(out).encode()


_MODE_TYPES = "dalTLDpSugct?"


def file_mode(mode: int) -> bytes:
    """Go's ``fs.FileMode(mode).String()`` of a raw mode: type letters from bits 31..19 (Go's
    own mode bits, not st_mode's), ``-`` when none, then ``rwxrwxrwx`` of the low 9 bits."""
    mode &= 0xFFFFFFFF
    head = "".join(c for i, c in enumerate(_MODE_TYPES) if mode & (1 << (31 - i))) or "-"
    perm = "".join(c if mode & (1 << (8 - i)) else "-" for i, c in enumerate("rwxrwxrwx"))
    return (head + perm).encode()


# -- sizes and durations ----------------------------------------------------------------------

_SI = ("B", "kB", "MB", "GB", "TB", "PB", "EB")


def human_bytes(n: int) -> bytes:
    """go-humanize's ``Bytes``: SI units, one decimal below 10 (``9.5 kB``), none above."""
    if n < 10:
        return f"{n} B".encode()
    e = math.floor(math.log(n) / math.log(1000))
    val = math.floor(n / 1000 ** e * 10 + 0.5) / 10
    fmt = "{:.1f} {}" if val < 10 else "{:.0f} {}"
    return fmt.format(val, _SI[int(e)]).encode()


def go_duration(ns: int) -> str:
    """Go's ``time.Duration.String()``."""
    if ns == 0:
        return "0s"
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_trim(ns / 1e3, 3)}µs"
    if ns < 1_000_000_000:
        return f"{sign}{_trim(ns / 1e6, 6)}ms"
    total_s, frac_ns = divmod(ns, 1_000_000_000)
    hours, rest = divmod(total_s, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs}.{frac_ns:09d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{text}"
    if minutes:
        return f"{sign}{minutes}m{text}"
    return sign + text


def _trim(value: float, digits: int) -> str:
    return f"{value:.{digits}f}".rstrip("0").rstrip(".")


def duration_text(ns: int) -> bytes:
    """Upstream's ``formatDuration``: ns below 1µs, 2 decimals of µs and ms, else Go's text."""
    if ns < 1_000:
        return f"{ns}ns".encode()
    if ns < 1_000_000:
        return f"{ns / 1e3:.2f}µs".encode()
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.2f}ms".encode()
    return go_duration(ns).encode()


# -- time -------------------------------------------------------------------------------------

_SECOND = 1_000_000_000


def _zone(offset: int) -> bytes:
    if offset == 0:
        return b"Z"
    sign = "-" if offset < 0 else "+"
    h, m = divmod(abs(offset) // 60, 60)
    return f"{sign}{h:02d}:{m:02d}".encode()


_THREE_DIGITS = np.frombuffer(b"".join(b"%03d" % k for k in range(1000)),
                              dtype=np.uint8).reshape(1000, 3)
"""``k`` -> its three ASCII digits: a fraction's nine digits are three lookups."""


def _seconds(secs: npt.NDArray[np.int64]) -> tuple[list[int], npt.NDArray[np.intp]]:
    """Distinct seconds and each record's index into them. A drained batch is in time order
    (one ring, one CPU's order at most a little off), so its distinct seconds are where the
    value changes; a sort is needed only when the batch is not ordered."""
    if bool((secs[1:] >= secs[:-1]).all()):
        change = np.flatnonzero(secs[1:] != secs[:-1]) + 1
        inv = np.zeros(len(secs), dtype=np.intp)
        inv[change] = 1
        np.cumsum(inv, out=inv)
        return secs[np.concatenate(([0], change))].tolist(), inv
    uniq, inv = np.unique(secs, return_inverse=True)
    return uniq.tolist(), inv.reshape(-1)


_FEW = 16
"""Batches this small are formatted record by record: the numpy passes cost ~40 µs whatever
the batch's size, plain formatting ~2 µs a record (a trickle of events on every drain)."""


@functools.lru_cache(maxsize=256)
def _second_text(sec: int) -> tuple[bytes, bytes]:
    """A second's date and time of day (19 bytes) and its zone, in the local zone."""
    lt = time.localtime(sec)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", lt).encode().rjust(19, b"0"),
            _zone(lt.tm_gmtoff))


def _few_timestamps(ns: Column) -> Fixed | list[bytes]:
    texts = []
    zones = set()
    for v in ns.astype(np.int64).tolist():
        sec, frac = divmod(v, _SECOND)
        head, zone = _second_text(sec)
        texts.append(b"%s.%09d%s" % (head, frac, zone))
        zones.add(zone)
    if len(zones) > 1:
        return texts  # the zone's offset changed between them (DST), as timestamps() says
    width = len(texts[0])
    return Fixed(np.frombuffer(b"".join(texts), dtype=np.uint8).reshape(len(texts), width))


def timestamps(ns: Column) -> Fixed | list[bytes]:
    """Wall-clock ns as upstream's timestamp formatter writes them, in the local zone:
    ``2006-01-02T15:04:05.000000000Z07:00`` in Go's layout (``…Z`` in UTC).

    The date and time of day are formatted once per distinct second of the batch, the nine
    digits of the fraction by numpy; the result is one fixed-width block (a list only when
    the zone's offset changes inside the batch).
    """
    n = len(ns)
    if n == 0:
        return Fixed(np.zeros((0, 0), dtype=np.uint8))
    if n <= _FEW:
        return _few_timestamps(ns)
    v = ns.astype(np.int64)
    secs, frac = np.divmod(v, _SECOND)
    uniq, inv = _seconds(secs)
    heads: list[bytes] = []
    zones: list[bytes] = []
    for sec in uniq:
        head_text, zone_text = _second_text(sec)
        heads.append(head_text)
        zones.append(zone_text)
    head = np.frombuffer(b"".join(heads), dtype=np.uint8).reshape(len(heads), 19)
    digits = np.empty((n, 10), dtype=np.uint8)
    digits[:, 0] = ord(".")
    high, low = np.divmod(frac, 1_000_000)
    mid, low = np.divmod(low, 1000)
    digits[:, 1:4] = _THREE_DIGITS[high]
    digits[:, 4:7] = _THREE_DIGITS[mid]
    digits[:, 7:10] = _THREE_DIGITS[low]
    distinct = sorted(set(zones))

    def block(sel: npt.NDArray[np.intp] | slice, zone: bytes) -> npt.NDArray[np.uint8]:
        rows = head[inv[sel]]
        m = np.empty((rows.shape[0], 29 + len(zone)), dtype=np.uint8)
        m[:, :19] = rows
        m[:, 19:29] = digits[sel]
        m[:, 29:] = np.frombuffer(zone, dtype=np.uint8)
        return m

    if len(distinct) == 1:
        return Fixed(block(slice(None), distinct[0]))
    out = np.empty(n, dtype=object)  # the zone's offset changed inside the batch (DST)
    zone_of = np.array(zones, dtype=object)[inv]
    for zone in distinct:
        sel = np.flatnonzero(zone_of == zone)
        out[sel] = Fixed(block(sel, zone)).values()
    texts: list[bytes] = out.tolist()
    return texts


# -- enums ------------------------------------------------------------------------------------

def enum_names(values: Mapping[int, str], bitfield: bool, separator: str = "|",
               ) -> Callable[[int], bytes]:
    """The name of a value (``UNKNOWN`` when none), or for a ``*_set`` enum every member whose
    bits are all set, joined by ``separator`` (upstream's ebpf enum formatter)."""
    members: Sequence[tuple[int, str]] = list(values.items())
    if bitfield:
        def bits(v: int) -> bytes:
            return separator.join(n for m, n in members if v & m == m).encode()
        return bits

    def name(v: int) -> bytes:
        for m, n in members:
            if v == m:
                return n.encode()
        return b"UNKNOWN"
    return name
