"""User and group names for uids and gids, from ``/etc/passwd`` and ``/etc/group``.

As upstream's UidGidResolver: only these two files are read (no NSS), the last line naming an
id wins, and an id no line names shows as ``uid:<n>`` / ``gid:<n>``. The files are re-read when
their modification time or size changes, looked at no more than once per ``recheck`` seconds, so
a user added while a gadget runs gets its name within that time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PASSWD = Path("/etc/passwd")
GROUP = Path("/etc/group")
RECHECK_S = 1.0


def parse_id_file(text: str) -> dict[int, bytes]:
    """``name:x:id:...`` lines -> {id: name}; comments, short lines and bad ids are skipped."""
    out: dict[int, bytes] = {}
    for line in text.splitlines():
        line = line.lstrip(" \t")
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) < 3:
            continue
        try:
            ident = int(parts[2])
        except ValueError:
            continue
        if 0 <= ident <= 0xFFFFFFFF:
            out[ident] = parts[0].encode()
    return out


class IdNames:
    """id -> name from one file, reloaded when it changes.

    Args:
        path: ``/etc/passwd`` or ``/etc/group``.
        missing: the prefix shown for an id the file does not name (``uid`` or ``gid``).
        recheck: seconds between two looks at the file's modification time.
    """

    def __init__(self, path: Path, missing: str, recheck: float = RECHECK_S) -> None:
        self._path = path
        self._missing = missing
        self._recheck = recheck
        self._names: dict[int, bytes] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = float("-inf")

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self._recheck:
            return
        self._checked = now
        try:
            st = os.stat(self._path)
        except OSError:
            self._names, self._stamp = {}, None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                self._names = parse_id_file(self._path.read_text(errors="replace"))
            except OSError:
                self._names = {}
            self._stamp = stamp

    def names(self, ids: list[int]) -> list[bytes]:
        """The name of each id (``uid:<n>`` for one the file does not name)."""
        self._refresh()
        get = self._names.get
        return [get(i) or f"{self._missing}:{i}".encode() for i in ids]


class UserNames:
    """Users and groups, one pair of files per run (no state shared between runs)."""

    def __init__(self, passwd: Path = PASSWD, group: Path = GROUP,
                 recheck: float = RECHECK_S) -> None:
        self.users = IdNames(passwd, "uid", recheck)
        self.groups = IdNames(group, "gid", recheck)
