"""Parameters as the gadget service describes them: prefixed keys, type hints, validation.

Keys under a prefix this daemon owns are checked strictly (an unknown one is an error with a
suggestion); keys under other prefixes (``operator.cli.``, ``operator.sort.`` …, which upstream
clients always send for their local operators) are ignored, as upstream servers do.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from api._gen import gadget_service_pb2 as pb

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_INT_RANGES = {
    "int8": (-(1 << 7), (1 << 7) - 1), "int16": (-(1 << 15), (1 << 15) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1), "int64": (-(1 << 63), (1 << 63) - 1),
    "int": (-(1 << 63), (1 << 63) - 1),
    "uint8": (0, (1 << 8) - 1), "uint16": (0, (1 << 16) - 1), "uint32": (0, (1 << 32) - 1),
    "uint64": (0, (1 << 64) - 1), "uint": (0, (1 << 64) - 1),
}


class ParamError(ValueError):
    """A parameter value or key is invalid; ``key`` names it and ``reason`` says why."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"invalid parameter {key!r}: {reason}")
        self.key = key
        self.reason = reason


def parse_duration(text: str) -> float:
    """Go-style durations (``500ms``, ``1m30s``, ``0``) in seconds."""
    text = text.strip()
    if text in ("0", ""):
        return 0.0
    if not _DURATION.match(text):
        raise ValueError(f"{text!r} is not a duration (e.g. 500ms, 2s, 1m)")
    return sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(text))


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """One parameter; ``prefix + key`` is its wire key."""

    key: str
    prefix: str
    description: str = ""
    default: str = ""
    type_hint: str = "string"
    alias: str = ""
    title: str = ""
    possible_values: tuple[str, ...] = ()
    mandatory: bool = False
    tags: tuple[str, ...] = ()
    alternative_key: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    value_hint: str = ""
    """What the value names, for clients' completion (upstream's ``k8s:pod``, ...)."""

    @property
    def full_key(self) -> str:
        return self.prefix + self.key

    def to_proto(self) -> pb.Param:
        return pb.Param(
            key=self.key, prefix=self.prefix, description=self.description,
            defaultValue=self.default, typeHint=self.type_hint, alias=self.alias,
            title=self.title, possibleValues=list(self.possible_values),
            isMandatory=self.mandatory, tags=list(self.tags), alternativeKey=self.alternative_key,
            valueHint=self.value_hint,
        )

    def parse(self, raw: str) -> Any:
        """The typed value of ``raw``; raises ParamError naming the key and the reason."""
        if self.possible_values and raw not in self.possible_values:
            raise ParamError(self.full_key, f"{raw!r} is not one of "
                             f"{', '.join(self.possible_values)}")
        hint = self.type_hint
        try:
            if hint == "bool":
                low = raw.strip().lower()
                if low not in ("true", "false", "1", "0", "t", "f", "yes", "no"):
                    raise ValueError(f"{raw!r} is not a bool (true or false)")
                return low in ("true", "1", "t", "yes")
            if hint in _INT_RANGES:
                if raw.strip() == "" and not self.mandatory:
                    return None
                value = int(raw, 0)
                lo, hi = _INT_RANGES[hint]
                if not lo <= value <= hi:
                    raise ValueError(f"{value} is outside {hint} ({lo}..{hi})")
                return value
            if hint in ("float32", "float64"):
                return float(raw)
            if hint == "duration":
                return parse_duration(raw)
            if hint == "[]string":
                return [s for s in raw.split(",") if s]
        except ValueError as e:
            raise ParamError(self.full_key, str(e)) from None
        return raw


def resolve(specs: Iterable[ParamSpec], values: Mapping[str, str],
            owned_prefixes: Iterable[str]) -> dict[str, Any]:
    """Typed values for every spec (defaults filled), keyed by full key.

    Raises:
        ParamError: a value does not parse, a mandatory one is missing, or a key under an owned
            prefix is unknown (with the nearest known key as a suggestion).
    """
    specs = list(specs)
    by_key = {s.full_key: s for s in specs}
    alt = {s.prefix + s.alternative_key: s for s in specs if s.alternative_key}
    owned = tuple(owned_prefixes)
    for k in values:
        if k in by_key or k in alt:
            continue
        if k.startswith(owned):
            near = difflib.get_close_matches(k, list(by_key), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ParamError(k, f"unknown parameter{hint}")
    out: dict[str, Any] = {}
    for s in specs:
        raw = values.get(s.full_key)
        if raw is None and s.alternative_key:
            raw = values.get(s.prefix + s.alternative_key)
        if raw is None:
            if s.mandatory:
                raise ParamError(s.full_key, "is mandatory")
            raw = s.default
        out[s.full_key] = s.parse(raw)
    return out
