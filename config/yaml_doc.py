"""YAML with positions: documents as plain data, and where each value sits in the file.

PyYAML's pure-Python composer gives a node tree with marks; its converter turns it into
plain data while recording every key path's node, so a later check can name the exact line
and column of what it rejects. Scalars follow the YAML 1.2 core schema (``yes`` is a string,
``0x1f`` an int), duplicate keys are problems, merge keys (``<<``) are followed, and limits on
depth and size keep odd input (alias bombs, deep nesting) from costing more than a problem.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import yaml
import yaml.composer
import yaml.nodes
import yaml.parser
import yaml.reader
import yaml.resolver
import yaml.scanner

from config.results import Issue, KeyPath, format_path

__all__ = ["MAX_DEPTH", "MAX_NODES", "Document", "parse_documents"]

MAX_DEPTH = 64
"""Deepest nesting of YAML collections accepted."""
MAX_NODES = 200_000
"""Most YAML nodes one document may expand to (aliases count each time they are used)."""

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_MERGE = "tag:yaml.org,2002:merge"


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
class Document:
    """One YAML document: its plain data and where every path of it sits in the file."""

    file: str
    node: yaml.Node
    data: Any = None
    index: dict[KeyPath, _Where] = field(default_factory=dict)

    def where(self, path: KeyPath, key: bool = False) -> tuple[int, int]:
        """1-based (line, column) of ``path`` (its key when ``key``), else of its nearest
        ancestor."""
        for n in range(len(path), -1, -1):
            w = self.index.get(path[:n])
            if w is None:
                continue
            node = w.key if (key and n == len(path) and w.key is not None) else w.node
            return node.start_mark.line + 1, node.start_mark.column + 1
        return self.node.start_mark.line + 1, self.node.start_mark.column + 1

    def text(self, path: KeyPath, value: Any, sep: str = ",") -> str:
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

    def __init__(self, doc: Document, issues: list[Issue]) -> None:
        self._doc = doc
        self._issues = issues
        self._count = 0
        self._too_big = False
        self.failed = False

    def _report(self, node: yaml.Node, path: KeyPath, message: str) -> None:
        self.failed = True
        mark = node.start_mark
        self._issues.append(Issue(self._doc.file, mark.line + 1, mark.column + 1,
                                  format_path(path), message))

    def run(self) -> Any:
        self._doc.index[()] = _Where(self._doc.node, None)
        return self._convert(self._doc.node, (), 0)

    def _convert(self, node: yaml.Node, path: KeyPath, depth: int) -> Any:
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

    def _mapping(self, node: yaml.MappingNode, path: KeyPath, depth: int) -> dict[str, Any]:
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

    def _merge_sources(self, vnode: yaml.Node, path: KeyPath,
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


def parse_documents(name: str, text: str, issues: list[Issue]) -> list[Document]:
    """The documents of one file's text that converted without a problem; problems (syntax,
    bad scalars, duplicate keys, limits) are appended to ``issues``."""
    docs: list[Document] = []
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # the reader refuses unprintable characters right away
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            doc = Document(name, node)
            converter = _Converter(doc, issues)
            doc.data = converter.run()
            if not converter.failed:
                docs.append(doc)
    except yaml.YAMLError as e:
        line, col, message = _yaml_error_position(e, text)
        issues.append(Issue(name, line, col, "", message))
    except RecursionError:
        issues.append(Issue(name, 1, 1, "", "the YAML is nested too deeply"))
    finally:
        if loader is not None:
            with contextlib.suppress(Exception):
                loader.dispose()
    return docs
