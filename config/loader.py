"""YAML files -> validated models -> ``CreateGadgetInstanceRequest``s, or a :class:`ConfigError`.

:meth:`ConfigLoader.load` reads config files (or directories of ``*.yaml``/``*.yml``), each
possibly holding several ``---`` documents: gadgetpipe config documents and upstream instance
manifests (see :mod:`config.schema`). Everything is checked before anything is returned, so a
caller never applies part of a bad config:

* YAML syntax; YAML 1.2 core scalars (``yes`` is a string, ``0x1f`` an int); duplicate keys;
* the models: unknown keys, wrong types, bad names, ids, tags, durations, addresses;
* across documents and files: duplicate instance names and ids, a second ``daemon`` section;
* per instance, without starting anything: the gadget exists in the catalog, and its params
  (including the ones the ``filter``/``fields``/``sinks``/``metrics`` sections expand to)
  pass :class:`pipeline.run.GadgetRun`'s validation with the sinks' params; sink settings
  (kafka topic template and key field, OTLP headers and body field, prometheus metric
  declarations); nodes against the ``daemon`` section's ``nodes`` when there is one;
* optionally (``reachability``), that the kafka brokers and OTLP endpoints the file names
  accept TCP connections.

Every problem is an :class:`Issue` naming the file, the 1-based line and column of the
offending key or value, its key path (``instances[0].params.operator.oci.ebpf.pidd``) and,
for near-miss names, a suggestion; they are all reported together in one :class:`ConfigError`.
The loader never raises anything else for bad input (odd YAML, deep nesting, alias bombs).

Param values are taken as written in the YAML text (``n: 1`` -> ``"1"``, ``on`` -> ``"on"``,
null -> ``""``), as upstream's manifest reader does; lists are joined with ``,`` (``;`` for
prometheus ``counters``/``histograms``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import difflib
import math
import re
import socket
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import yaml
import yaml.composer
import yaml.nodes
import yaml.parser
import yaml.reader
import yaml.resolver
import yaml.scanner
from pydantic import BaseModel, ValidationError

from api._gen import gadget_service_pb2 as pb
from config.schema import (
    EXTENSION_PREFIX,
    ConfigDocument,
    DaemonSection,
    InstanceSection,
    InstanceSpecManifest,
)
from pipeline.gadget import Catalog, GadgetError, GadgetSpec, UnknownGadget
from pipeline.ledger import Ledger
from pipeline.params import ParamError, ParamSpec
from pipeline.run import GadgetRun, RunError

__all__ = [
    "DEFAULT_CONFIG",
    "ConfigError",
    "ConfigLoader",
    "DeclaredInstance",
    "Issue",
    "LoadedConfig",
    "Reachability",
    "format_path",
]

DEFAULT_CONFIG = Path(__file__).resolve().parent / "examples" / "default.yaml"
"""The embedded default config (``serve`` without ``--config``)."""
MAX_DEPTH = 64
"""Deepest nesting of YAML collections accepted."""
MAX_NODES = 200_000
"""Most YAML nodes one document may expand to (aliases count each time they are used)."""
MAX_TIMEOUT_NS = (1 << 63) - 1
_NEAR = 0.8
"""difflib ratio from which an unknown name is taken for a typo of a known one."""

Path_ = tuple[str | int, ...]

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_MERGE = "tag:yaml.org,2002:merge"

_FILTER_KEY = "operator.filter.filter"
_FIELDS_KEY = "operator.fields.fields"
_PROMETHEUS = "prometheus"
_SEMICOLON_LISTS = frozenset({("prometheus", "counters"), ("prometheus", "histograms")})


# ------------------------------------------------------------------------------------------
# results and errors


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
    """

    sources: tuple[str, ...]
    daemon: DaemonSection | None
    daemon_file: str | None
    sink_defaults: dict[str, dict[str, str]]
    instances: tuple[DeclaredInstance, ...]
    warnings: tuple[Issue, ...] = ()

    def requests(self) -> list[pb.CreateGadgetInstanceRequest]:
        """Copies of the declared instances' requests, in declaration order."""
        out = []
        for d in self.instances:
            r = pb.CreateGadgetInstanceRequest()
            r.CopyFrom(d.request)
            out.append(r)
        return out


class SinkCatalog(Protocol):
    """What the loader needs of the sinks (:class:`pipeline.sinks.registry.SinkManager`)."""

    @property
    def types(self) -> Mapping[str, Any]: ...

    def params(self) -> list[ParamSpec]: ...

    def prefixes(self) -> list[str]: ...


def format_path(path: Sequence[str | int]) -> str:
    """``("instances", 0, "params", "a.b")`` -> ``instances[0].params.a.b``."""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else p
    return out


def _suggest(word: str, candidates: Collection[str], cutoff: float = 0.6) -> str:
    near = difflib.get_close_matches(word, list(candidates), n=1, cutoff=cutoff)
    return f"; did you mean {near[0]!r}?" if near else ""


# ------------------------------------------------------------------------------------------
# YAML with positions


class _Bad(Exception):
    """A YAML value that cannot be converted; the message says why."""


class _CoreResolver(yaml.resolver.BaseResolver):
    """YAML 1.2 core schema for plain scalars: only true/false are bools, ``0o``/``0x`` ints,
    no sexagesimal numbers, no ``yes``/``on``; quoted scalars are strings."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is yaml.nodes.ScalarNode:
            return _core_tag(value) if implicit[0] else _STR
        return super().resolve(kind, value, implicit)  # type: ignore[no-untyped-call]


def _core_tag(value: str) -> str:
    if value == "<<":
        return _MERGE
    if value in ("", "~", "null", "Null", "NULL"):
        return _NULL
    if value in ("true", "True", "TRUE", "false", "False", "FALSE"):
        return _BOOL
    if _is_int(value):
        return _INT
    if _is_float(value):
        return _FLOAT
    return _STR


def _is_int(v: str) -> bool:
    body = v[1:] if v[:1] in "+-" else v
    if body.isascii() and body.isdigit():
        return True
    if v.startswith("0o") and len(v) > 2 and all(c in "01234567" for c in v[2:]):
        return True
    return v.startswith("0x") and len(v) > 2 and all(c in "0123456789abcdefABCDEF"
                                                     for c in v[2:])


def _is_float(v: str) -> bool:
    if v in (".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF", "-.inf", "-.Inf", "-.INF",
             ".nan", ".NaN", ".NAN"):
        return True
    body = v[1:] if v[:1] in "+-" else v
    mant, _, exp = body.partition("e") if "e" in body else body.partition("E")
    if exp:
        e = exp[1:] if exp[:1] in "+-" else exp
        if not (e.isascii() and e.isdigit()):
            return False
    whole, dot, frac = mant.partition(".")
    if not (whole or frac):
        return False
    return all(p == "" or (p.isascii() and p.isdigit()) for p in (whole, frac)) and (
        bool(dot) or bool(exp))


class _Loader(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser,
              yaml.composer.Composer, _CoreResolver):
    """PyYAML's pure-Python composer (node tree with marks) with the core resolver."""

    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        _CoreResolver.__init__(self)


@dataclass(slots=True)
class _Where:
    node: yaml.Node
    key: yaml.Node | None


@dataclass
class _Doc:
    """One YAML document: its plain data and where every path of it sits in the file."""

    file: str
    node: yaml.Node
    data: Any = None
    index: dict[Path_, _Where] = field(default_factory=dict)

    def where(self, path: Path_, key: bool = False) -> tuple[int, int]:
        """1-based (line, column) of ``path`` (its key when ``key``), else of its nearest
        ancestor."""
        for n in range(len(path), -1, -1):
            w = self.index.get(path[:n])
            if w is None:
                continue
            node = w.key if (key and n == len(path) and w.key is not None) else w.node
            return node.start_mark.line + 1, node.start_mark.column + 1
        return self.node.start_mark.line + 1, self.node.start_mark.column + 1

    def text(self, path: Path_, value: Any, sep: str = ",") -> str:
        """A param value as written: scalars' source text (null -> ""), lists joined."""
        if isinstance(value, list):
            return sep.join(self.text((*path, i), v) for i, v in enumerate(value))
        if value is None:
            return ""
        w = self.index.get(path)
        if w is not None and isinstance(w.node, yaml.ScalarNode):
            return str(w.node.value)
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)


class _Converter:
    """Turns a node tree into plain data, recording positions and problems."""

    def __init__(self, doc: _Doc, issues: list[Issue]) -> None:
        self._doc = doc
        self._issues = issues
        self._count = 0
        self._too_big = False
        self.failed = False

    def _report(self, node: yaml.Node, path: Path_, message: str) -> None:
        self.failed = True
        mark = node.start_mark
        self._issues.append(Issue(self._doc.file, mark.line + 1, mark.column + 1,
                                  format_path(path), message))

    def run(self) -> Any:
        self._doc.index[()] = _Where(self._doc.node, None)
        return self._convert(self._doc.node, (), 0)

    def _convert(self, node: yaml.Node, path: Path_, depth: int) -> Any:
        self._count += 1
        if self._count > MAX_NODES:
            if not self._too_big:
                self._too_big = True
                self._report(node, path, f"the document expands to more than {MAX_NODES} "
                             "values (aliases count every time they are used)")
            return None
        if depth > MAX_DEPTH:
            self._report(node, path, f"nested deeper than {MAX_DEPTH} levels")
            return None
        if isinstance(node, yaml.ScalarNode):
            try:
                return _scalar(node)
            except _Bad as e:
                self._report(node, path, str(e))
                return None
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ:
                self._report(node, path, f"unsupported YAML tag {node.tag!r}")
                return None
            out = []
            for i, item in enumerate(node.value):
                self._doc.index[(*path, i)] = _Where(item, None)
                out.append(self._convert(item, (*path, i), depth + 1))
            return out
        if isinstance(node, yaml.MappingNode):
            if node.tag != _MAP:
                self._report(node, path, f"unsupported YAML tag {node.tag!r}")
                return None
            return self._mapping(node, path, depth)
        self._report(node, path, "unexpected YAML node")
        return None

    def _mapping(self, node: yaml.MappingNode, path: Path_, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        seen: dict[str, yaml.Node] = {}
        merged: list[tuple[yaml.Node, yaml.Node]] = []
        for knode, vnode in node.value:
            if isinstance(knode, yaml.ScalarNode) and knode.tag == _MERGE:
                merged.extend(self._merge_sources(vnode, path, depth))
                continue
            if not isinstance(knode, yaml.ScalarNode):
                self._report(knode, path, "a key must be a plain string, not a collection")
                continue
            key = str(knode.value)
            if key in seen:
                first = seen[key].start_mark
                self._report(knode, (*path, key),
                             f"duplicate key {key!r} (first at line {first.line + 1}, "
                             f"column {first.column + 1})")
                continue
            seen[key] = knode
            self._doc.index[(*path, key)] = _Where(vnode, knode)
            out[key] = self._convert(vnode, (*path, key), depth + 1)
        # Merged entries (<<: *base) fill in what the mapping does not say itself.
        for knode, vnode in merged:
            mkey = str(knode.value) if isinstance(knode, yaml.ScalarNode) else None
            if mkey is None or mkey in out:
                continue
            self._doc.index[(*path, mkey)] = _Where(vnode, knode)
            out[mkey] = self._convert(vnode, (*path, mkey), depth + 1)
        return out

    def _merge_sources(self, vnode: yaml.Node, path: Path_,
                       depth: int) -> list[tuple[yaml.Node, yaml.Node]]:
        sources = vnode.value if isinstance(vnode, yaml.SequenceNode) else [vnode]
        out: list[tuple[yaml.Node, yaml.Node]] = []
        for src in sources:
            if not isinstance(src, yaml.MappingNode) or depth > MAX_DEPTH:
                self._report(vnode, (*path, "<<"), "a merge key (<<) takes a mapping or a "
                             "list of mappings")
                continue
            out.extend((k, v) for k, v in src.value
                       if not (isinstance(k, yaml.ScalarNode) and k.tag == _MERGE))
        return out


def _scalar(node: yaml.ScalarNode) -> Any:
    value = str(node.value)
    tag = node.tag
    try:
        if tag in (_STR, _MERGE):  # "<<" as a value is just text
            return value
        if tag == _NULL:
            return None
        if tag == _BOOL:
            low = value.lower()
            if low not in ("true", "false"):
                raise ValueError
            return low == "true"
        if tag == _INT:
            text = value.replace("_", "")
            sign = -1 if text.startswith("-") else 1
            body = text.lstrip("+-")
            if body.startswith("0o"):
                return sign * int(body[2:], 8)
            if body.startswith("0x"):
                return sign * int(body[2:], 16)
            return sign * int(body, 10)
        if tag == _FLOAT:
            low = value.lower()
            if low.endswith(".inf"):
                return -math.inf if low.startswith("-") else math.inf
            if low == ".nan":
                return math.nan
            return float(value.replace("_", ""))
    except ValueError:
        raise _Bad(f"{value!r} is not a valid {tag.rsplit(':', 1)[-1]}") from None
    raise _Bad(f"unsupported YAML tag {tag!r}")


def _yaml_error_position(e: yaml.YAMLError, text: str) -> tuple[int, int, str]:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    what = f"{context}: {problem}" if context and problem else str(problem)
    if isinstance(e, yaml.reader.ReaderError):
        pos = min(max(int(e.position), 0), len(text))
        line = text.count("\n", 0, pos) + 1
        char = chr(e.character) if isinstance(e.character, int) else e.character
        return line, pos - (text.rfind("\n", 0, pos) + 1) + 1, (
            f"cannot read: {e.reason} ({char!r})")
    if mark is None:
        return 1, 1, f"invalid YAML: {what}"
    return mark.line + 1, mark.column + 1, f"invalid YAML: {what}"


# ------------------------------------------------------------------------------------------
# pydantic errors -> issues


def _real_path(data: Any, loc: Sequence[str | int]) -> tuple[Path_, bool]:
    """The data path ``loc`` points at, skipping pydantic's union-member and validator parts;
    the flag says the last element is a key the data does not have."""
    out: list[str | int] = []
    cur = data
    missing = False
    for part in loc:
        if isinstance(cur, dict) and isinstance(part, str):
            out.append(part)
            missing = part not in cur
            cur = cur.get(part)
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            out.append(part)
            missing = False
            cur = cur[part]
    return tuple(out), missing


def _unwrap(tp: Any) -> Any:
    import types
    import typing

    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _model_keys(root: type[BaseModel], path: Path_) -> list[str]:
    """The keys the model at ``path`` (a mapping inside ``root``) accepts."""
    import typing

    tp: Any = root
    for part in path:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            fields = {f.alias or n: f for n, f in tp.model_fields.items()}
            f = fields.get(str(part))
            if f is None:
                return []
            tp = f.annotation
        elif typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return []
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [f.alias or n for n, f in tp.model_fields.items()]
    return []


_TYPE_WORDS = {"string_type": "a string", "int_type": "an integer", "float_type": "a number",
               "bool_type": "true or false", "list_type": "a list", "dict_type": "a mapping",
               "model_type": "a mapping", "int_from_float": "an integer"}


def _describe(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return f"the integer {v}"
    if isinstance(v, float):
        return f"the number {v}"
    if isinstance(v, str):
        return f"the string {v[:40]!r}"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__


# ------------------------------------------------------------------------------------------
# the loader


@dataclass
class _Decl:
    """An instance between validation and its request."""

    doc: _Doc
    base: Path_
    name: str
    gadget: str
    gadget_path: Path_
    id: str | None
    tags: list[str]
    nodes: list[str]
    timeout_s: float
    event_buffer_length: int
    params: dict[str, str]
    origin: dict[str, Path_]
    upstream: bool


@dataclass
class _State:
    issues: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    docs: list[_Doc] = field(default_factory=list)
    decls: list[_Decl] = field(default_factory=list)
    daemon: DaemonSection | None = None
    daemon_doc: _Doc | None = None
    sink_types: dict[str, list[str]] | None = None

    def report(self, doc: _Doc, path: Path_, message: str, key: bool = False) -> None:
        line, col = doc.where(path, key)
        self.issues.append(Issue(doc.file, line, col, format_path(path), message))

    def warn(self, doc: _Doc, path: Path_, message: str, key: bool = False) -> None:
        line, col = doc.where(path, key)
        self.warnings.append(Issue(doc.file, line, col, format_path(path), message))


class ConfigLoader:
    """Loads and validates config files (see the module docstring).

    Args:
        catalog: the gadgets to validate against; default: the built-in catalog.
        sinks: the daemon's sinks (a running daemon passes its SinkManager, so daemon-wide
            defaults apply); default: sinks built from the file's ``daemon.sinks``.
        reachability: whether to try the kafka brokers and OTLP endpoints the file names.
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
        state = _State()
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
        return self._finish(_State(), [(filename, text)], [filename])

    def load_default(self) -> LoadedConfig:
        """The embedded default config."""
        return self.load([DEFAULT_CONFIG])

    # -- phases ------------------------------------------------------------------------------

    def _finish(self, state: _State, texts: list[tuple[str, str]],
                sources: list[str]) -> LoadedConfig:
        for name, text in texts:
            self._parse(state, name, text)
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
        instances = tuple(self._declared(d) for d in state.decls)
        return LoadedConfig(tuple(sources), state.daemon,
                            state.daemon_doc.file if state.daemon_doc else None,
                            sink_defaults, instances, tuple(state.warnings))

    def _parse(self, state: _State, name: str, text: str) -> None:
        loader: _Loader | None = None
        try:
            loader = _Loader(text)  # the reader refuses unprintable characters right away
            while loader.check_node():
                node = loader.get_node()
                if node is None:
                    continue
                doc = _Doc(name, node)
                converter = _Converter(doc, state.issues)
                doc.data = converter.run()
                if not converter.failed:
                    state.docs.append(doc)
        except yaml.YAMLError as e:
            line, col, message = _yaml_error_position(e, text)
            state.issues.append(Issue(name, line, col, "", message))
        except RecursionError:
            state.issues.append(Issue(name, 1, 1, "", "the YAML is nested too deeply"))
        finally:
            if loader is not None:
                with contextlib.suppress(Exception):
                    loader.dispose()

    def _validate_document(self, state: _State, doc: _Doc) -> None:
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
            for err in e.errors(include_url=False):
                self._pydantic_issue(state, doc, model, err)
            return
        if isinstance(parsed, InstanceSpecManifest):
            state.decls.append(self._from_manifest(state, doc, parsed))
            return
        assert isinstance(parsed, ConfigDocument)
        if parsed.daemon is not None:
            if state.daemon_doc is not None:
                line, col = state.daemon_doc.where(("daemon",), key=True)
                state.report(doc, ("daemon",), "a second daemon section (the first is at "
                             f"{state.daemon_doc.file}:{line}:{col})", key=True)
            else:
                state.daemon, state.daemon_doc = parsed.daemon, doc
        for i, inst in enumerate(parsed.instances):
            decl = self._from_section(state, doc, ("instances", i), inst)
            if decl is not None:
                state.decls.append(decl)

    def _pydantic_issue(self, state: _State, doc: _Doc, model: type[BaseModel],
                        err: Mapping[str, Any]) -> None:
        path, _ = _real_path(doc.data, err["loc"])
        kind = str(err["type"])
        value = err.get("input")
        if kind == "extra_forbidden":
            allowed = _model_keys(model, path[:-1])
            name = str(path[-1]) if path else ""
            hint = _suggest(name, allowed)
            if not hint and allowed:
                hint = f" (known: {', '.join(sorted(allowed))})"
            state.report(doc, path, f"unknown key {name!r}{hint}", key=True)
            return
        if kind == "missing":
            line, col = doc.where(path[:-1])
            name = str(path[-1]) if path else "?"
            state.issues.append(Issue(doc.file, line, col, format_path(path),
                                      f"missing required key {name!r}"))
            return
        msg = str(err.get("msg", kind))
        msg = msg.removeprefix("Value error, ")
        if kind in _TYPE_WORDS:
            msg = f"expected {_TYPE_WORDS[kind]}, got {_describe(value)}"
        elif kind == "literal_error":
            hint = _suggest(str(value), [str(x) for x in (err.get("ctx") or {})
                                         .get("expected", "").replace("'", "").split(" or ")])
            msg = f"{msg.replace('Input should be', 'must be')}, got {_describe(value)}{hint}"
        elif kind in ("greater_than_equal", "less_than_equal", "too_short", "too_long",
                      "string_too_short"):
            msg = f"{msg.replace('Input should', 'should')}, got {_describe(value)}"
        state.report(doc, path, msg)

    # -- documents -> declarations -----------------------------------------------------------

    def _from_section(self, state: _State, doc: _Doc, base: Path_,
                      inst: InstanceSection) -> _Decl | None:
        params: dict[str, str] = {}
        origin: dict[str, Path_] = {}

        def put(key: str, text: str, path: Path_) -> None:
            if key in params:
                state.report(doc, path, f"sets {key!r} again (first set at "
                             f"{format_path(origin[key])})", key=True)
                return
            params[key] = text
            origin[key] = path

        for key, value, path in _flatten(inst.params, (*base, "params")):
            if isinstance(value, list) and not all(_is_scalar(v) for v in value):
                bad = next(i for i, v in enumerate(value) if not _is_scalar(v))
                state.report(doc, (*path, bad), "a list value may hold only scalars (it is "
                             "joined with ',')")
                continue
            put(key, doc.text(path, value), path)
        if inst.filter is not None:
            put(_FILTER_KEY, doc.text((*base, "filter"), inst.filter), (*base, "filter"))
        if inst.fields is not None:
            put(_FIELDS_KEY, inst.fields, (*base, "fields"))
        sink_types = self._sink_types(state)
        sections: list[tuple[str, Path_, Mapping[str, Any]]] = []
        for sink, given in inst.sinks.items():
            sections.append((sink, (*base, "sinks", sink), given or {}))
        if inst.metrics is not None:
            sections.append((_PROMETHEUS, (*base, "metrics"), inst.metrics))
        for sink, spath, settings in sections:
            keys = sink_types.get(sink)
            if keys is None:
                state.report(doc, spath, f"unknown sink {sink!r}{_suggest(sink, sink_types)} "
                             f"(sinks: {', '.join(sorted(sink_types))})", key=True)
                continue
            prefix = f"operator.{sink}."
            if "enable" not in settings:
                put(prefix + "enable", "true", spath)
            for k, v in settings.items():
                if k not in keys:
                    state.report(doc, (*spath, k), f"unknown {sink} setting {k!r}"
                                 f"{_suggest(k, keys)} (known: {', '.join(sorted(keys))})",
                                 key=True)
                    continue
                sep = ";" if (sink, k) in _SEMICOLON_LISTS else ","
                put(prefix + k, doc.text((*spath, k), v, sep), (*spath, k))
        return _Decl(doc, base, inst.name, inst.gadget, (*base, "gadget"), inst.id,
                     list(inst.tags), list(inst.nodes), inst.timeout, inst.event_buffer_length,
                     params, origin, upstream=False)

    def _from_manifest(self, state: _State, doc: _Doc, m: InstanceSpecManifest) -> _Decl:
        params: dict[str, str] = {}
        origin: dict[str, Path_] = {}
        for key, value in m.param_values.items():
            path: Path_ = ("paramValues", key)
            params[key] = doc.text(path, value)
            origin[key] = path
        return _Decl(doc, (), m.name, m.image, ("image",), m.id, list(m.tags), list(m.nodes),
                     0.0, 0, params, origin, upstream=True)

    # -- cross-document checks ---------------------------------------------------------------

    def _check_unique(self, state: _State) -> None:
        names: dict[str, _Decl] = {}
        ids: dict[str, _Decl] = {}
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

    def _sink_types(self, state: _State) -> dict[str, list[str]]:
        """Sink type -> its param keys (without prefix)."""
        if state.sink_types is None:
            sinks = self._sink_catalog(state, {})
            state.sink_types = {} if sinks is None else {
                name: [p.key for p in t.params()] for name, t in sinks.types.items()}
        return state.sink_types

    def _sink_catalog(self, state: _State,
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

    def _daemon_sinks(self, state: _State) -> dict[str, dict[str, str]]:
        """``daemon.sinks`` as parameter texts, each key and value checked."""
        out: dict[str, dict[str, str]] = {}
        if state.daemon is None or state.daemon_doc is None or not state.daemon.sinks:
            return out
        doc = state.daemon_doc
        types = self._sink_catalog(state, {})
        if types is None:
            return out
        for sink, settings in state.daemon.sinks.items():
            base: Path_ = ("daemon", "sinks", sink)
            t = types.types.get(sink)
            if t is None:
                state.report(doc, base, f"unknown sink {sink!r}{_suggest(sink, types.types)} "
                             f"(sinks: {', '.join(sorted(types.types))})", key=True)
                continue
            specs = {p.key: p for p in t.params()}
            texts: dict[str, str] = {}
            for k, v in settings.items():
                spec = specs.get(k)
                if spec is None:
                    state.report(doc, (*base, k), f"unknown {sink} setting {k!r}"
                                 f"{_suggest(k, specs)} (known: {', '.join(sorted(specs))})",
                                 key=True)
                    continue
                sep = ";" if (sink, k) in _SEMICOLON_LISTS else ","
                text = doc.text((*base, k), v, sep)
                try:
                    spec.parse(text)
                except ParamError as e:
                    state.report(doc, (*base, k), e.reason)
                    continue
                texts[k] = text
            out[sink] = texts
        return out

    # -- per-instance checks -----------------------------------------------------------------

    def _check_instances(self, state: _State, sink_defaults: dict[str, dict[str, str]]) -> None:
        from api.run_stream import GRPC_PARAMS, GRPC_PREFIX

        sinks = self._sink_catalog(state, sink_defaults)
        extra: list[ParamSpec] = list(GRPC_PARAMS)
        prefixes = [GRPC_PREFIX]
        if sinks is not None:
            extra += sinks.params()
            prefixes += sinks.prefixes()
        known_nodes = self._nodes(state)
        probes: dict[tuple[str, str], tuple[_Doc, Path_]] = {}
        for d in state.decls:
            if known_nodes is not None:
                for i, node in enumerate(d.nodes):
                    if node not in known_nodes:
                        state.report(d.doc, (*d.base, "nodes", i), f"unknown node {node!r}"
                                     f"{_suggest(node, known_nodes)} (known: "
                                     f"{', '.join(sorted(known_nodes))})")
            spec = self._resolve(state, d)
            if spec is None:
                continue
            run, reported = self._check_params(state, d, spec, extra, prefixes)
            if run is None:
                continue
            self._check_unknown_keys(state, d, run, reported)
            if sinks is not None:
                self._check_sinks(state, d, run, sinks, sink_defaults, probes)
        if self._reachability is not Reachability.OFF and probes:
            self._probe(state, probes)

    def _nodes(self, state: _State) -> set[str] | None:
        if self._known_nodes is not None:
            return set(self._known_nodes)
        if state.daemon is None:
            return None
        return {*state.daemon.nodes, state.daemon.node or socket.gethostname()}

    def _resolve(self, state: _State, d: _Decl) -> GadgetSpec | None:
        try:
            return self.catalog.resolve(d.gadget)
        except UnknownGadget:
            names = self.catalog.names()
            state.report(d.doc, d.gadget_path, f"unknown gadget {d.gadget!r}"
                         f"{_suggest(d.gadget, names)} (available: {', '.join(names)})")
        except GadgetError as e:
            state.report(d.doc, d.gadget_path, str(e))
        return None

    def _check_params(self, state: _State, d: _Decl, spec: GadgetSpec, extra: list[ParamSpec],
                      prefixes: list[str]) -> tuple[GadgetRun | None, set[str]]:
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
                reason = _field_hint(reason, spec.datasources)
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

    def _param_issue(self, state: _State, d: _Decl, key: str | None, reason: str,
                     unknown: bool = False, warning: bool = False) -> None:
        path = d.origin.get(key) if key else None
        if path is None:
            params_path = (*d.base, "paramValues" if d.upstream else "params")
            path = params_path if params_path in d.doc.index else d.base
        named = key is not None and (format_path(path).endswith(key) or reason.startswith(key))
        message = reason if named or key is None else f"{key}: {reason}"
        (state.warn if warning else state.report)(d.doc, path, message, unknown)

    def _check_unknown_keys(self, state: _State, d: _Decl, run: GadgetRun,
                            reported: set[str]) -> None:
        """Keys no part of gadgetpipe knows are ignored by the daemon (upstream clients send
        their own operators' params); near misses of known keys are typos."""
        known = {p.full_key for p in run.param_specs}
        known |= {p.prefix + p.alternative_key for p in run.param_specs if p.alternative_key}
        for key in d.params:
            if key in known or key in reported:
                continue
            near = difflib.get_close_matches(key, list(known), n=1, cutoff=_NEAR)
            if near and not d.upstream:
                self._param_issue(state, d, key, f"unknown parameter; did you mean {near[0]!r}?",
                                  unknown=True)
            else:
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                self._param_issue(state, d, key, "not a gadgetpipe parameter; the daemon "
                                  f"ignores it{hint}", unknown=True, warning=True)

    def _check_sinks(self, state: _State, d: _Decl, run: GadgetRun, sinks: SinkCatalog,
                     defaults: Mapping[str, Mapping[str, str]],
                     probes: dict[tuple[str, str], tuple[_Doc, Path_]]) -> None:
        values = run.values
        for name, t in sinks.types.items():
            try:
                if not t.enabled(values):
                    continue
                problem = _sink_problem(name, values, run)
            except Exception as e:  # keep loading; report what the check tripped on
                problem = (f"operator.{name}.enable", f"cannot check: {type(e).__name__}: {e}")
            if problem is not None:
                key, reason = problem
                self._param_issue(state, d, key, _field_hint(reason, run.schemas))
                continue
            for key in _endpoint_keys(name, values):
                where = self._setting_origin(state, d, key, defaults)
                if where is not None:
                    probes.setdefault((name, _endpoint_text(name, key, values)), where)

    def _setting_origin(self, state: _State, d: _Decl, key: str,
                        defaults: Mapping[str, Mapping[str, str]]) -> tuple[_Doc, Path_] | None:
        """Where the file sets a sink's param: on the instance, else in ``daemon.sinks``;
        None when the value is a built-in default (not this file's to check)."""
        if key in d.origin:
            return d.doc, d.origin[key]
        sink, _, k = key.removeprefix("operator.").partition(".")
        if state.daemon_doc is not None and k in defaults.get(sink, {}):
            return state.daemon_doc, ("daemon", "sinks", sink, k)
        return None

    def _probe(self, state: _State, probes: dict[tuple[str, str], tuple[_Doc, Path_]]) -> None:
        def check(item: tuple[str, str]) -> str | None:
            sink, target = item
            return _reach(sink, target, self._connect_timeout)

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(check, probes))
        for (sink, target), problem in zip(probes, results, strict=True):
            if problem is None:
                continue
            doc, path = probes[(sink, target)]
            report = state.report if self._reachability is Reachability.ERROR else state.warn
            report(doc, path, f"{sink}: {problem}")

    # -- output ------------------------------------------------------------------------------

    def _declared(self, d: _Decl) -> DeclaredInstance:
        gi = pb.GadgetInstance(
            name=d.name, tags=d.tags, nodes=d.nodes,
            gadgetConfig=pb.GadgetRunRequest(imageName=d.gadget, paramValues=d.params,
                                             version=1, timeout=round(d.timeout_s * 1e9)))
        if d.id:
            gi.id = d.id
        req = pb.CreateGadgetInstanceRequest(gadgetInstance=gi,
                                             eventBufferLength=d.event_buffer_length)
        line, col = d.doc.where(d.base)
        return DeclaredInstance(d.name, req, d.doc.file, line, col, format_path(d.base),
                                d.upstream)


# ------------------------------------------------------------------------------------------
# helpers


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


def _flatten(value: Mapping[str, Any], path: Path_,
             prefix: str = "") -> Iterator[tuple[str, Any, Path_]]:
    """Nested param mappings -> (dotted key, value, path of the value)."""
    for k, v in value.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            yield from _flatten(v, (*path, k), key)
        else:
            yield key, v, (*path, k)


_NO_FIELD = re.compile(r"(?:has no field|has a field|has the fields) '?([\w.]+)'?")


def _field_hint(reason: str, schemas: Sequence[Any]) -> str:
    """Adds the nearest field name to a "no field X" reason."""
    m = _NO_FIELD.search(reason)
    if m is None:
        return reason
    names = {f.full_name for s in schemas for f in s.value_fields()}
    near = difflib.get_close_matches(m[1], list(names), n=1, cutoff=0.6)
    return f"{reason}; did you mean {near[0]!r}?" if near else reason


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def _field_exists(schemas: Sequence[Any], name: str) -> bool:
    for s in schemas:
        try:
            s.field(name)
            return True
        except KeyError:
            continue
    return False


def _sink_problem(sink: str, values: Mapping[str, Any], run: GadgetRun) -> tuple[str, str] | None:
    """The first problem of an enabled sink's settings that only show when it is built, as
    (param key, reason); None if fine. Mirrors the sink types' ``build`` checks, which cannot
    be called here: building a sink opens files and registers metrics."""
    p = f"operator.{sink}."
    if sink == "kafka":
        from pipeline.sinks.kafka import check_template

        topic = str(values.get(p + "topic") or "")
        try:
            check_template(topic, run.schemas)
        except ValueError as e:
            return p + "topic", str(e)
        key = str(values.get(p + "key") or "")
        if key and not _field_exists(run.schemas, key):
            return p + "key", f"no data source has a field {key!r}"
    elif sink == "otel-logs":
        for part in (x for x in str(values.get(p + "headers") or "").split(",") if x.strip()):
            if "=" not in part:
                return p + "headers", f"header {part!r} is not key=value"
        body = str(values.get(p + "body") or "")
        if body and not _field_exists(run.schemas, body):
            return p + "body", f"no data source has a field {body!r}"
    elif sink == _PROMETHEUS:
        from pipeline.sinks.prometheus import (
            GadgetMetricsStore,
            MetricSpecError,
            parse_counters,
            parse_histograms,
        )

        for key, parse in (("counters", parse_counters), ("histograms", parse_histograms)):
            try:
                parse(str(values.get(p + key) or ""), p + key)
            except MetricSpecError as e:
                return p + key, str(e)
        histograms = parse_histograms(str(values.get(p + "histograms") or ""))
        try:
            # A store of its own: the check must not register metrics anywhere.
            GadgetMetricsStore().build(
                run.spec.name, run.instance, run.schemas,
                parse_counters(str(values.get(p + "counters") or "")), histograms,
                int(values.get(p + "max-series") or 1000))
        except MetricSpecError as e:
            m = re.search(r"(?:metric|histogram) '([^']+)'", str(e))
            named = m[1] if m else ""
            which = "histograms" if any(h.name == named for h in histograms) else "counters"
            return p + which, str(e)
    return None


def _endpoint_keys(sink: str, values: Mapping[str, Any]) -> list[str]:
    if sink == "kafka":
        return ["operator.kafka.brokers"]
    if sink == "otel-logs":
        return ["operator.otel-logs.endpoint"]
    return []


def _endpoint_text(sink: str, key: str, values: Mapping[str, Any]) -> str:
    text = str(values.get(key) or "")
    if sink == "otel-logs":
        return f"{values.get('operator.otel-logs.protocol') or 'grpc'} {text}"
    return text


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    u = urlparse(text if "://" in text else f"tcp://{text}")
    port = u.port
    if port is None:
        port = {"https": 443, "http": 80}.get(u.scheme, default_port)
    if not u.hostname:
        raise ValueError(f"{text!r} has no host")
    return u.hostname, port


def _reach(sink: str, target: str, timeout: float) -> str | None:
    """None if something accepts a TCP connection at the target, else why not."""
    if sink == "otel-logs":
        protocol, _, endpoint = target.partition(" ")
        candidates = [endpoint]
        default_port = 4318 if protocol == "http" else 4317
    else:
        candidates = [b.strip() for b in target.split(",") if b.strip()]
        default_port = 9092
    errors = []
    for c in candidates:
        try:
            host, port = _host_port(c, default_port)
            with socket.create_connection((host, port), timeout=timeout):
                return None
        except (OSError, ValueError) as e:
            errors.append(f"{c}: {e}")
    return "unreachable: " + "; ".join(errors) if errors else "no address given"
