"""What loading a config gives: the validated instances and daemon section, or every problem.

:class:`Issue` names one problem by file, line, column and key path; :class:`ConfigError`
carries all of them; :class:`LoadedConfig` is a config that passed every check.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from config.schema import DaemonSection
from pipeline._gen import gadget_service_pb2 as pb
from pipeline.params import redact

__all__ = [
    "ConfigError",
    "DeclaredInstance",
    "Issue",
    "KeyPath",
    "LoadedConfig",
    "Reachability",
    "format_path",
    "suggest",
]

KeyPath = tuple[str | int, ...]
"""Where a value sits in a YAML document: ``("instances", 0, "params", "a.b")``."""


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem (or warning) in a config file.

    Args:
        file: the file as given (``<string>`` for text).
        line: 1-based line of the offending key or value.
        column: 1-based column.
        path: key path inside the document (``instances[0].gadget``); "" for the document.
        message: what is wrong, with a suggestion when one is near.
    """

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(ValueError):
    """The config is invalid; ``issues`` lists every problem found (at least one)."""

    def __init__(self, issues: Sequence[Issue]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


class Reachability(StrEnum):
    """What to do about kafka brokers / OTLP endpoints in the file that refuse connections."""

    OFF = "off"
    WARN = "warn"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class DeclaredInstance:
    """One declared instance and where it was declared."""

    name: str
    request: pb.CreateGadgetInstanceRequest
    file: str
    line: int
    column: int
    path: str
    upstream: bool = False
    """Declared by an upstream instance manifest."""


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A validated config.

    Args:
        sources: the files read, in order.
        daemon: the ``daemon`` section, if a document had one.
        daemon_file: the file holding it.
        sink_defaults: the ``daemon.sinks`` settings as parameter texts, by sink type then key
            (what ``DaemonSettings.sinks`` takes).
        instances: the declared instances, in file and document order.
        warnings: things that are valid but probably not meant (ignored params, ...).
        secret_keys: the param keys whose values are secrets (never to be shown; see
            :func:`pipeline.params.redact`).
    """

    sources: tuple[str, ...]
    daemon: DaemonSection | None
    daemon_file: str | None
    sink_defaults: dict[str, dict[str, str]]
    instances: tuple[DeclaredInstance, ...]
    warnings: tuple[Issue, ...] = ()
    secret_keys: frozenset[str] = field(default_factory=frozenset)

    def requests(self) -> list[pb.CreateGadgetInstanceRequest]:
        """Copies of the declared instances' requests, in declaration order."""
        out = []
        for d in self.instances:
            r = pb.CreateGadgetInstanceRequest()
            r.CopyFrom(d.request)
            out.append(r)
        return out

    def redacted(self, request: pb.CreateGadgetInstanceRequest
                 ) -> pb.CreateGadgetInstanceRequest:
        """A copy of ``request`` whose secret param values read ``<redacted>`` (for showing)."""
        out = pb.CreateGadgetInstanceRequest()
        out.CopyFrom(request)
        values = out.gadgetInstance.gadgetConfig.paramValues
        shown = redact(dict(values), self.secret_keys)
        values.clear()
        values.update(shown)
        return out


def format_path(path: Sequence[str | int]) -> str:
    """``("instances", 0, "params", "a.b")`` -> ``instances[0].params.a.b``."""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else p
    return out


def suggest(word: str, candidates: Collection[str], cutoff: float = 0.6) -> str:
    """``"; did you mean 'x'?"`` for the candidate nearest ``word``, or ""."""
    near = difflib.get_close_matches(word, list(candidates), n=1, cutoff=cutoff)
    return f"; did you mean {near[0]!r}?" if near else ""
