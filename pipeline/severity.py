"""Log severities: the numbers upstream Inspektor Gadget gives them (its logger's levels, which
are logrus's), as they travel in a log ``GadgetEvent`` (``type = severity << 16``) and in a run
request's ``logLevel``."""

from __future__ import annotations

import logging
from enum import IntEnum

__all__ = ["Severity"]


class Severity(IntEnum):
    """A log message's severity; lower is more severe, and a client's ``logLevel`` lets
    through every message at or below it."""

    PANIC = 0
    FATAL = 1
    ERROR = 2
    WARN = 3
    INFO = 4
    DEBUG = 5
    TRACE = 6

    @classmethod
    def of(cls, value: int) -> Severity:
        """The severity of a number off the wire; numbers past TRACE read as TRACE."""
        return cls(min(max(value, 0), cls.TRACE))

    @property
    def text(self) -> str:
        """The lowercase name (``warn``), as upstream's CLI prints it."""
        return self.name.lower()

    @property
    def python_level(self) -> int:
        """The :mod:`logging` level of the daemon's own log for this severity."""
        return _PYTHON_LEVEL[self]


_PYTHON_LEVEL = {
    Severity.PANIC: logging.CRITICAL, Severity.FATAL: logging.CRITICAL,
    Severity.ERROR: logging.ERROR, Severity.WARN: logging.WARNING, Severity.INFO: logging.INFO,
    Severity.DEBUG: logging.DEBUG, Severity.TRACE: logging.DEBUG,
}
