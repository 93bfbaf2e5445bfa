"""Per-instance checks of a declaration, without starting anything.

The gadget exists in the catalog; its params, with the ones the sections expand to, pass
:class:`pipeline.run.GadgetRun`'s validation together with the gRPC stream's and the sinks'
params (every bad param is reported, not only the first); keys no part of gadgetpipe knows are
warnings, near misses of known keys errors; each enabled sink's settings pass the sink type's
own :meth:`check`, and the peers they name (:meth:`endpoints`) are collected for the optional
reachability probe, which is also the sink type's (:meth:`probe`). No sink is known by name.
"""

from __future__ import annotations

import concurrent.futures
import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from config.declare import Declaration, LoadState
from config.results import KeyPath, format_path, suggest
from config.yaml_doc import Document
from pipeline.gadget import GadgetError, GadgetSpec, UnknownGadget
from pipeline.ledger import Ledger
from pipeline.params import ParamError, ParamSpec
from pipeline.run import GadgetRun, RunError
from pipeline.sinks.base import KEY_ENABLE, SinkType, setting_of
from pipeline.sinks.endpoints import Endpoint
from pipeline.sources.catalog import Catalog

__all__ = ["InstanceChecker", "Probe", "SinkCatalog", "probe_all"]

_NEAR = 0.8
"""difflib ratio from which an unknown name is taken for a typo of a known one."""
_NO_FIELD = re.compile(r"(?:has no field|has a field|has the fields) '?([\w.]+)'?")


class SinkCatalog(Protocol):
    """What the loader needs of the sinks (:class:`pipeline.sinks.registry.SinkManager`)."""

    @property
    def types(self) -> Mapping[str, SinkType]: ...

    def params(self) -> list[ParamSpec]: ...

    def prefixes(self) -> list[str]: ...


@dataclass
class Probe:
    """An endpoint to try, the sink type that named it and where the file names it."""

    sink: SinkType
    endpoint: Endpoint
    doc: Document
    path: KeyPath


def field_hint(reason: str, schemas: Sequence[Any]) -> str:
    """Adds the nearest field name to a "no field X" reason."""
    m = _NO_FIELD.search(reason)
    if m is None:
        return reason
    names = {f.full_name for s in schemas for f in s.value_fields()}
    near = difflib.get_close_matches(m[1], list(names), n=1, cutoff=0.6)
    return f"{reason}; did you mean {near[0]!r}?" if near else reason


@dataclass
class InstanceChecker:
    """Checks declarations against a catalog, the stream's params and the sinks.

    Args:
        catalog: the gadgets.
        sinks: the sink types (None: they could not be set up, which was reported).
        extra: params other layers own (the gRPC stream's), validated with the gadget's.
        prefixes: the prefixes of ``extra``, checked strictly.
        sink_defaults: ``daemon.sinks`` as texts, by sink type then setting.
    """

    catalog: Catalog
    sinks: SinkCatalog | None
    extra: Sequence[ParamSpec]
    prefixes: Sequence[str]
    sink_defaults: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    probes: dict[tuple[str, str], Probe] = field(default_factory=dict)
    """What :meth:`check` found to probe, by (sink, target), first place first."""

    def all_params(self) -> list[ParamSpec]:
        return [*self.extra, *(self.sinks.params() if self.sinks is not None else ())]

    def check(self, state: LoadState, d: Declaration) -> None:
        spec = self._resolve(state, d)
        if spec is None:
            return
        extra = self.all_params()
        prefixes = [*self.prefixes, *(self.sinks.prefixes() if self.sinks is not None else ())]
        run, reported = self._check_params(state, d, spec, extra, prefixes)
        if run is None:
            return
        self._check_unknown_keys(state, d, run, reported)
        if self.sinks is not None:
            self._check_sinks(state, d, run, self.sinks)

    def _resolve(self, state: LoadState, d: Declaration) -> GadgetSpec | None:
        try:
            return self.catalog.resolve(d.gadget)
        except UnknownGadget:
            names = self.catalog.names()
            state.report(d.doc, d.gadget_path, f"unknown gadget {d.gadget!r}"
                         f"{suggest(d.gadget, names)} (available: {', '.join(names)})")
        except GadgetError as e:
            state.report(d.doc, d.gadget_path, str(e))
        return None

    def _check_params(self, state: LoadState, d: Declaration, spec: GadgetSpec,
                      extra: list[ParamSpec], prefixes: list[str]
                      ) -> tuple[GadgetRun | None, set[str]]:
        """Validates the params as a run would; returns the run (not started) built from the
        params that passed, and the keys reported.

        GadgetRun stops at the first bad param: it is reported, left out, and the rest
        validated again, so one load reports every bad param of the instance."""
        params = dict(d.params)
        hints = {p.full_key: p.type_hint for p in (*spec.params, *extra)}
        reported: set[str] = set()
        for _ in range(len(params) + 1):
            try:
                run = GadgetRun(spec, params, Ledger(), f"config:{d.name}", extra, prefixes)
                return run, reported
            except RunError as e:
                cause = e.__cause__
                key = getattr(cause, "key", None) or getattr(cause, "param", None)
                reason = str(getattr(cause, "reason", None) or e)
                unknown = "unknown parameter" in reason
                hint = hints.get(key or "", "string")
                if (isinstance(cause, ParamError) and not unknown and hint != "string"
                        and hint not in reason):
                    reason = f"{reason} (a {hint} is expected)"
                reason = field_hint(reason, spec.datasources)
                key = self._as_given(d, key)
                self._param_issue(state, d, key, reason, unknown=unknown)
                if key is None or key not in params:
                    return None, reported
                reported.add(key)
                del params[key]
            except Exception as e:  # an operator that chokes on odd input must not crash
                state.report(d.doc, d.base, f"cannot validate the params: "
                             f"{type(e).__name__}: {e}")
                return None, reported
        return None, reported

    def _as_given(self, d: Declaration, key: str | None) -> str | None:
        """The key a param was given under in the file (an old spelling, say) for the
        param the run names by its current key."""
        if key is None or key in d.params:
            return key
        for p in self.all_params():
            if p.full_key == key:
                return next((k for k in p.old_keys if k in d.params), key)
        return key

    def _param_issue(self, state: LoadState, d: Declaration, key: str | None, reason: str,
                     unknown: bool = False, warning: bool = False) -> None:
        path = d.origin.get(key) if key else None
        if path is None:
            params_path = (*d.base, "paramValues" if d.upstream else "params")
            path = params_path if params_path in d.doc.index else d.base
        named = key is not None and (format_path(path).endswith(key) or reason.startswith(key))
        message = reason if named or key is None else f"{key}: {reason}"
        (state.warn if warning else state.report)(d.doc, path, message, unknown)

    def _check_unknown_keys(self, state: LoadState, d: Declaration, run: GadgetRun,
                            reported: set[str]) -> None:
        """Keys no part of gadgetpipe knows are ignored by the daemon (upstream clients send
        their own operators' params); near misses of known keys are typos."""
        known = {p.full_key for p in run.param_specs}
        accepted = known | {p.prefix + p.alternative_key for p in run.param_specs
                            if p.alternative_key}
        accepted |= {k for p in run.param_specs for k in p.old_keys}
        for key in d.params:
            if key in accepted or key in reported:
                continue
            near = difflib.get_close_matches(key, list(known), n=1, cutoff=_NEAR)
            if near and not d.upstream:
                self._param_issue(state, d, key, f"unknown parameter; did you mean "
                                  f"{near[0]!r}?", unknown=True)
            else:
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                self._param_issue(state, d, key, "not a gadgetpipe parameter; the daemon "
                                  f"ignores it{hint}", unknown=True, warning=True)

    def _check_sinks(self, state: LoadState, d: Declaration, run: GadgetRun,
                     sinks: SinkCatalog) -> None:
        values = run.values
        for name, t in sinks.types.items():
            try:
                if not t.enabled(values):
                    continue
                problem = t.check(values, run.schemas)
                endpoints = t.endpoints(values)
            except Exception as e:  # keep loading; report what the check tripped on
                problem = (t.key(KEY_ENABLE), f"cannot check: {type(e).__name__}: {e}")
                endpoints = ()
            if problem is not None:
                key, reason = problem
                self._param_issue(state, d, self._as_given(d, key),
                                  field_hint(reason, run.schemas))
                continue
            for ep in endpoints:
                where = self._setting_origin(state, d, t, ep.key)
                if where is not None:
                    self.probes.setdefault((name, ep.target), Probe(t, ep, *where))

    def _setting_origin(self, state: LoadState, d: Declaration, t: SinkType,
                        key: str) -> tuple[Document, KeyPath] | None:
        """Where the file sets a sink's param: on the instance, else in ``daemon.sinks``;
        None when the value is a built-in default (not this file's to check)."""
        spec = next((p for p in t.settings().values() if p.full_key == key), None)
        names = (key, *(spec.old_keys if spec is not None else ()))
        for k in names:
            if k in d.origin:
                return d.doc, d.origin[k]
        setting = setting_of(spec) if spec is not None else ""
        if state.daemon_doc is not None and setting in self.sink_defaults.get(t.name, {}):
            return state.daemon_doc, ("daemon", "sinks", t.name, setting)
        return None


def probe_all(state: LoadState, probes: Mapping[tuple[str, str], Probe], timeout: float,
              as_error: bool) -> None:
    """Tries every endpoint concurrently (each with its sink type's probe); an unreachable
    one is a problem (``as_error``) or a warning at the place the file names it."""
    items = list(probes.values())

    def check(p: Probe) -> str | None:
        return p.sink.probe(p.endpoint, timeout)

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(check, items))
    for p, problem in zip(items, results, strict=True):
        if problem is not None:
            (state.report if as_error else state.warn)(p.doc, p.path, f"{p.sink.name}: {problem}")
