"""Parameters as the gadget service describes them: prefixed keys, type hints, validation.

Keys under a prefix this daemon owns are checked strictly (an unknown one is an error with a
suggestion); keys under other prefixes (``operator.cli.``, ``operator.sort.`` …, which upstream
clients always send for their local operators) are ignored, as upstream servers do.

Upstream clients turn every announced param into a command-line flag named by its ``key``
(and its ``alternativeKey``, and a short flag from its ``alias``), so keys must be unique across
everything a gadget announces; see ``tests/unit/test_param_keys.py``. A param renamed for that
keeps its former full keys in :attr:`ParamSpec.old_keys`: :func:`resolve` accepts them as the
same param, and they are never announced (an announced alternative key would be a flag again).

A param marked :attr:`ParamSpec.secret` (a credential) never leaves the daemon in clear: its
announced default is :data:`REDACTED`, a value equal to :data:`REDACTED` means "the default"
(clients echo announced defaults back), errors do not quote its value, and
:func:`redact` hides it wherever values are logged or shown.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline._gen import gadget_service_pb2 as pb

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


REDACTED = "<redacted>"
"""What a secret param's value reads as wherever it is shown."""


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
    old_keys: tuple[str, ...] = ()
    """Full keys this param had before (accepted as the same param, never announced)."""
    secret: bool = False
    """A credential: never logged, announced or shown in clear (see the module doc)."""
    value_hint: str = ""
    """What the value names, for clients' completion (upstream's ``k8s:pod``, ...)."""

    @property
    def full_key(self) -> str:
        return self.prefix + self.key

    def to_proto(self) -> pb.Param:
        default = REDACTED if self.secret and self.default else self.default
        return pb.Param(
            key=self.key, prefix=self.prefix, description=self.description,
            defaultValue=default, typeHint=self.type_hint, alias=self.alias,
            title=self.title, possibleValues=list(self.possible_values),
            isMandatory=self.mandatory, tags=list(self.tags), alternativeKey=self.alternative_key,
            valueHint=self.value_hint,
        )

    def parse(self, raw: str) -> Any:
        """The typed value of ``raw``; raises ParamError naming the key and the reason (without
        the value when the param is secret)."""
        if self.possible_values and raw not in self.possible_values:
            shown = "the value" if self.secret else repr(raw)
            raise ParamError(self.full_key, f"{shown} is not one of "
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
            reason = f"not a valid {hint}" if self.secret else str(e)
            raise ParamError(self.full_key, reason) from None
        return raw


def _given(specs: list[ParamSpec], values: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Full key -> (value, the key it was given under), for every spec given a value under its
    key, its alternative key or one of its old keys.

    Raises:
        ParamError: one param is given under two of its names.
    """
    out: dict[str, tuple[str, str]] = {}
    for s in specs:
        names = (s.full_key, *((s.prefix + s.alternative_key,) if s.alternative_key else ()),
                 *s.old_keys)
        for name in names:
            raw = values.get(name)
            if raw is None:
                continue
            if s.secret and raw == REDACTED:
                continue  # a client echoing the announced default back
            first = out.get(s.full_key)
            if first is not None and first[0] != raw:
                raise ParamError(s.full_key, f"given twice, as {first[1]!r} and {name!r}")
            if first is None:
                out[s.full_key] = (raw, name)
    return out


def resolve(specs: Iterable[ParamSpec], values: Mapping[str, str],
            owned_prefixes: Iterable[str]) -> dict[str, Any]:
    """Typed values for every spec (defaults filled), keyed by full key.

    Raises:
        ParamError: a value does not parse, a mandatory one is missing, or a key under an owned
            prefix is unknown (with the nearest known key as a suggestion).
    """
    specs = list(specs)
    known = known_keys(specs)
    by_key = [s.full_key for s in specs]
    owned = tuple(owned_prefixes)
    for k in values:
        if k in known:
            continue
        if k.startswith(owned):
            near = difflib.get_close_matches(k, by_key, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ParamError(k, f"unknown parameter{hint}")
    given = _given(specs, values)
    out: dict[str, Any] = {}
    for s in specs:
        raw = given.get(s.full_key, (None, ""))[0]
        if raw is None:
            if s.mandatory:
                raise ParamError(s.full_key, "is mandatory")
            raw = s.default
        out[s.full_key] = s.parse(raw)
    return out


def known_keys(specs: Iterable[ParamSpec]) -> dict[str, ParamSpec]:
    """Every full key a param may be given under (key, alternative key, old keys)."""
    out: dict[str, ParamSpec] = {}
    for s in specs:
        out[s.full_key] = s
        if s.alternative_key:
            out[s.prefix + s.alternative_key] = s
        for old in s.old_keys:
            out[old] = s
    return out


def secret_keys(specs: Iterable[ParamSpec]) -> frozenset[str]:
    """Every full key (current, alternative, old) under which a secret param may be given."""
    return frozenset(k for k, s in known_keys(specs).items() if s.secret)


def redact(values: Mapping[str, Any], secrets: Iterable[ParamSpec] | frozenset[str]
           ) -> dict[str, Any]:
    """A copy of ``values`` (params by full key, as given or resolved) whose secret params
    read :data:`REDACTED`; ``secrets`` is the param specs (their secret ones count) or a set of
    secret keys from :func:`secret_keys`. Empty values stay empty: nothing to hide."""
    keys = secrets if isinstance(secrets, frozenset) else secret_keys(secrets)
    return {k: (REDACTED if k in keys and v not in ("", None) else v)
            for k, v in values.items()}
