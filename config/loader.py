"""YAML files -> validated models -> ``CreateGadgetInstanceRequest``s, or a :class:`ConfigError`.

:meth:`ConfigLoader.load` reads config files (or directories of ``*.yaml``/``*.yml``), each
possibly holding several ``---`` documents: gadgetpipe config documents and upstream instance
manifests (see :mod:`config.schema`). Everything is checked before anything is returned, so a
caller never applies part of a bad config:

* YAML syntax; YAML 1.2 core scalars (``yes`` is a string, ``0x1f`` an int); duplicate keys
  (:mod:`config.yaml_doc`);
* the models: unknown keys, wrong types, bad names, ids, tags, durations, addresses
  (:mod:`config.model_issues`);
* across documents and files: duplicate instance names and ids, a second ``daemon`` section;
* per instance, without starting anything (:mod:`config.checks`): the gadget exists in the
  catalog, and its params (including the ones the ``filter``/``fields``/``sinks``/``metrics``
  sections expand to, :mod:`config.declare`) pass :class:`pipeline.run.GadgetRun`'s
  validation with the sinks' params; each enabled sink's settings pass the sink type's own
  check; nodes against the ``daemon`` section's ``nodes`` when there is one;
* optionally (``reachability``), that the peers the sinks' settings name accept connections
  (each sink type says which peers and how to probe them).

Every problem is an :class:`Issue` naming the file, the 1-based line and column of the
offending key or value, its key path (``instances[0].params.operator.oci.ebpf.pidd``) and,
for near-miss names, a suggestion; they are all reported together in one :class:`ConfigError`.
The loader never raises anything else for bad input (odd YAML, deep nesting, alias bombs).

Param values are taken as written in the YAML text (``n: 1`` -> ``"1"``, ``on`` -> ``"on"``,
null -> ``""``), as upstream's manifest reader does; lists are joined with ``,`` (or the
separator a sink setting declares, ``;`` for prometheus ``counters``/``histograms``).
"""

from __future__ import annotations

import socket
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from config.checks import InstanceChecker, SinkCatalog, probe_all
from config.declare import (
    Declaration,
    LoadState,
    from_manifest,
    from_section,
    request_of,
    setting,
)
from config.model_issues import pydantic_issue
from config.results import (
    ConfigError,
    DeclaredInstance,
    Issue,
    KeyPath,
    LoadedConfig,
    Reachability,
    format_path,
    suggest,
)
from config.schema import EXTENSION_PREFIX, ConfigDocument, InstanceSpecManifest
from config.yaml_doc import Document, parse_documents
from pipeline.ledger import Ledger
from pipeline.params import ParamError, secret_keys
from pipeline.sinks.base import list_separator, setting_of
from pipeline.sources.catalog import Catalog
from pipeline.wire import GRPC_PARAMS, GRPC_PREFIX

__all__ = [
    "DEFAULT_CONFIG",
    "ConfigError",
    "ConfigLoader",
    "DeclaredInstance",
    "Issue",
    "LoadedConfig",
    "Reachability",
    "SinkCatalog",
    "format_path",
]

DEFAULT_CONFIG = Path(__file__).resolve().parent / "examples" / "default.yaml"
"""The embedded default config (``serve`` without ``--config``)."""
MAX_TIMEOUT_NS = (1 << 63) - 1


def _expand(p: Path) -> Iterator[tuple[Path, str]]:
    """The files a path stands for, or a problem."""
    if p.is_dir():
        files = sorted(f for f in p.iterdir()
                       if f.suffix in (".yaml", ".yml") and f.is_file())
        if not files:
            yield p, "no *.yaml or *.yml files in this directory"
        for f in files:
            yield f, ""
    elif p.exists():
        yield p, ""
    else:
        yield p, "no such file or directory"


class ConfigLoader:
    """Loads and validates config files (see the module docstring).

    Args:
        catalog: the gadgets to validate against; default: the built-in catalog.
        sinks: the daemon's sinks (a running daemon passes its SinkManager, so daemon-wide
            defaults apply); default: sinks built from the file's ``daemon.sinks``.
        reachability: whether to try the peers the sinks' settings name.
        connect_timeout: seconds one reachability probe may take.
        known_nodes: node names instances may use (a daemon passes its own); default: the
            file's ``daemon`` section's, or no check without one.
    """

    def __init__(self, catalog: Catalog | None = None, sinks: SinkCatalog | None = None, *,
                 reachability: Reachability = Reachability.OFF, connect_timeout: float = 2.0,
                 known_nodes: Collection[str] | None = None) -> None:
        self._catalog = catalog
        self._sinks = sinks
        self._reachability = reachability
        self._connect_timeout = connect_timeout
        self._known_nodes = known_nodes

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = Catalog()
        return self._catalog

    # -- entry points ------------------------------------------------------------------------

    def load(self, paths: Sequence[str | Path]) -> LoadedConfig:
        """Loads files and directories (their ``*.yaml``/``*.yml``, sorted) as one config.

        Raises:
            ConfigError: anything is wrong; nothing is returned then.
        """
        state = LoadState()
        sources: list[str] = []
        texts: list[tuple[str, str]] = []
        for p in paths:
            for f, problem in _expand(Path(p)):
                if problem:
                    state.issues.append(Issue(str(f), 1, 1, "", problem))
                    continue
                try:
                    texts.append((str(f), f.read_bytes().decode("utf-8")))
                    sources.append(str(f))
                except (OSError, UnicodeDecodeError) as e:
                    state.issues.append(Issue(str(f), 1, 1, "", f"cannot read: {e}"))
        if not paths:
            state.issues.append(Issue("<none>", 1, 1, "", "no config file given"))
        return self._finish(state, texts, sources)

    def load_text(self, text: str, filename: str = "<string>") -> LoadedConfig:
        """Loads one file's text; ``filename`` is what issues name."""
        return self._finish(LoadState(), [(filename, text)], [filename])

    def load_default(self) -> LoadedConfig:
        """The embedded default config."""
        return self.load([DEFAULT_CONFIG])

    # -- phases ------------------------------------------------------------------------------

    def _finish(self, state: LoadState, texts: list[tuple[str, str]],
                sources: list[str]) -> LoadedConfig:
        for name, text in texts:
            state.docs.extend(parse_documents(name, text, state.issues))
        self._sink_settings(state)
        for doc in state.docs:
            self._validate_document(state, doc)
        # The checks below look at what did validate, so one run reports as much as it can.
        self._check_unique(state)
        sink_defaults = self._daemon_sinks(state)
        self._check_instances(state, sink_defaults)
        if state.issues:
            order = {name: i for i, (name, _) in enumerate(texts)}
            raise ConfigError(sorted(state.issues, key=lambda i: (order.get(i.file, -1),
                                                                  i.line, i.column)))
        instances = tuple(request_of(d) for d in state.decls)
        return LoadedConfig(tuple(sources), state.daemon,
                            state.daemon_doc.file if state.daemon_doc else None,
                            sink_defaults, instances, tuple(state.warnings), state.secret_keys)

    def _validate_document(self, state: LoadState, doc: Document) -> None:
        data = doc.data
        if data is None and isinstance(doc.node, yaml.ScalarNode):
            return  # an empty document ("---" alone, or comments only)
        if not isinstance(data, dict):
            state.report(doc, (), "a document must be a mapping: a gadgetpipe config "
                         "(daemon:, instances:) or an instance manifest (apiVersion: 1, "
                         "kind: instance-spec)")
            return
        upstream = "kind" in data or "apiVersion" in data
        model: type[BaseModel] = InstanceSpecManifest if upstream else ConfigDocument
        if not upstream:
            # x-* keys are free for YAML anchors to live in (as in docker-compose files).
            data = {k: v for k, v in data.items() if not k.startswith(EXTENSION_PREFIX)}
        try:
            parsed = model.model_validate(data)
        except ValidationError as e:
            state.issues.extend(pydantic_issue(doc, model, err)
                                for err in e.errors(include_url=False))
            return
        if isinstance(parsed, InstanceSpecManifest):
            state.decls.append(from_manifest(doc, parsed))
            return
        if not isinstance(parsed, ConfigDocument):
            raise TypeError(f"unexpected model {type(parsed).__name__}")
        if parsed.daemon is not None:
            if state.daemon_doc is not None:
                line, col = state.daemon_doc.where(("daemon",), key=True)
                state.report(doc, ("daemon",), "a second daemon section (the first is at "
                             f"{state.daemon_doc.file}:{line}:{col})", key=True)
            else:
                state.daemon, state.daemon_doc = parsed.daemon, doc
        for i, inst in enumerate(parsed.instances):
            state.decls.append(from_section(state, doc, ("instances", i), inst,
                                            state.sink_settings or {}))

    # -- cross-document checks ---------------------------------------------------------------

    def _check_unique(self, state: LoadState) -> None:
        names: dict[str, Declaration] = {}
        ids: dict[str, Declaration] = {}
        for d in state.decls:
            first = names.setdefault(d.name, d)
            if first is not d:
                line, col = first.doc.where((*first.base, "name"))
                state.report(d.doc, (*d.base, "name"), f"duplicate instance name {d.name!r} "
                             f"(first declared at {first.doc.file}:{line}:{col})")
            if d.id:
                first = ids.setdefault(d.id, d)
                if first is not d:
                    line, col = first.doc.where((*first.base, "id"))
                    state.report(d.doc, (*d.base, "id"), f"duplicate instance id {d.id!r} "
                                 f"(first declared at {first.doc.file}:{line}:{col})")
            if d.timeout_s * 1e9 > MAX_TIMEOUT_NS:
                state.report(d.doc, (*d.base, "timeout"), "timeout is too large")

    def _sink_settings(self, state: LoadState) -> None:
        """What the sink types declare: settings by sink, and the sections standing for one."""
        sinks = self._sink_catalog(state, {})
        if sinks is None:
            state.sink_settings = {}
            return
        state.sink_settings = {name: dict(t.settings()) for name, t in sinks.types.items()}
        state.sections = {t.section: name for name, t in sinks.types.items() if t.section}

    def _sink_catalog(self, state: LoadState,
                      defaults: Mapping[str, Mapping[str, str]]) -> SinkCatalog | None:
        if self._sinks is not None:
            return self._sinks
        from pipeline.sinks.registry import SinkManager

        try:
            return SinkManager(Ledger(), defaults)
        except Exception as e:  # a sink module that fails to import must not crash loading
            doc = state.daemon_doc or (state.docs[0] if state.docs else None)
            if doc is not None:
                state.report(doc, ("daemon", "sinks") if state.daemon_doc else (),
                             f"cannot set up the sinks: {e}")
            return None

    def _daemon_sinks(self, state: LoadState) -> dict[str, dict[str, str]]:
        """``daemon.sinks`` as parameter texts by sink and setting, each checked."""
        out: dict[str, dict[str, str]] = {}
        if state.daemon is None or state.daemon_doc is None or not state.daemon.sinks:
            return out
        doc = state.daemon_doc
        known = state.sink_settings or {}
        for sink, settings in state.daemon.sinks.items():
            base: KeyPath = ("daemon", "sinks", sink)
            specs = known.get(sink)
            if specs is None:
                state.report(doc, base, f"unknown sink {sink!r}{suggest(sink, known)} "
                             f"(sinks: {', '.join(sorted(known))})", key=True)
                continue
            texts: dict[str, str] = {}
            for k, v in settings.items():
                spec = setting(specs, k)
                if spec is None:
                    state.report(doc, (*base, k), f"unknown {sink} setting {k!r}"
                                 f"{suggest(k, specs)} (known: {', '.join(sorted(specs))})",
                                 key=True)
                    continue
                text = doc.text((*base, k), v, list_separator(spec))
                try:
                    spec.parse(text)
                except ParamError as e:
                    state.report(doc, (*base, k), e.reason)
                    continue
                texts[setting_of(spec)] = text
            out[sink] = texts
        return out

    # -- per-instance checks -----------------------------------------------------------------

    def _check_instances(self, state: LoadState, sink_defaults: dict[str, dict[str, str]]
                         ) -> None:
        checker = InstanceChecker(self.catalog, self._sink_catalog(state, sink_defaults),
                                  list(GRPC_PARAMS), [GRPC_PREFIX], sink_defaults)
        state.secret_keys = secret_keys(checker.all_params())
        known_nodes = self._nodes(state)
        for d in state.decls:
            if known_nodes is not None:
                for i, node in enumerate(d.nodes):
                    if node not in known_nodes:
                        state.report(d.doc, (*d.base, "nodes", i), f"unknown node {node!r}"
                                     f"{suggest(node, known_nodes)} (known: "
                                     f"{', '.join(sorted(known_nodes))})")
            checker.check(state, d)
        if self._reachability is not Reachability.OFF and checker.probes:
            probe_all(state, checker.probes, self._connect_timeout,
                      self._reachability is Reachability.ERROR)

    def _nodes(self, state: LoadState) -> set[str] | None:
        if self._known_nodes is not None:
            return set(self._known_nodes)
        if state.daemon is None:
            return None
        return {*state.daemon.nodes, state.daemon.node or socket.gethostname()}
