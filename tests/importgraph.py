"""The import graph of gadgetpipe's own packages, read from the source with ``ast``.

Every import counts: module level, inside functions, under ``TYPE_CHECKING``, and
``importlib.import_module``/``__import__`` calls with a literal name (or an f-string, as a
dependency on the package its constant start names), since each is a dependency of the design
even when it does not run at import time. An import names the
deepest module of ours it reaches (``from pipeline.sinks import base`` is
``pipeline.sinks.base``); a package's ``__init__`` is the package's own name.

``python -m tests.importgraph`` prints the cycles and the layer violations (used to measure).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "config", "pipeline", "bench", "tests", "scripts")


@dataclass(frozen=True, slots=True)
class Import:
    """One import statement of one module, as written."""

    source: str
    target: str
    line: int


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` file under the packages."""
    out: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            if any(p.startswith(".") or p == "__pycache__" for p in path.parts):
                continue
            out[module_name(root, path)] = path
    return out


def _literal_import(node: ast.Call) -> str | None:
    """The module named by ``importlib.import_module("x")`` or ``__import__("x")``; for an
    f-string (``f"pipeline.sources.{name}.hooks"``), the package its constant start names."""
    f = node.func
    named = (isinstance(f, ast.Attribute) and f.attr == "import_module") or (
        isinstance(f, ast.Name) and f.id in ("import_module", "__import__"))
    if not named or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value).rpartition(".")[0] or None
    return None


def _resolve(name: str, known: Mapping[str, Path]) -> str | None:
    """The deepest of our modules that ``name`` is or is inside of."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(root: Path, known: Mapping[str, Path]) -> Iterator[Import]:
    """Every import of one of our modules by one of our modules."""
    for mod, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                names = [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Call):
                literal = _literal_import(node)
                names = [literal] if literal else []
            for name in names:
                target = _resolve(name, known)
                if target is not None and target != mod:
                    yield Import(mod, target, getattr(node, "lineno", 0))


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    known = modules(root)
    out: dict[str, set[str]] = {m: set() for m in known}
    for imp in imports(root, known):
        out[imp.source].add(imp.target)
    return out


def cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:  # recursion depth is bounded by the number of our modules
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def layer(module: str) -> str:
    """The layer a module belongs to.

    ``engine`` is ``pipeline`` outside ``sources`` and ``sinks``, the generated protobuf modules
    (``pipeline._gen``: the wire types the engine's records are) included; ``dev`` is what is not
    shipped (``bench``,
    ``tests`` and ``scripts``, which share the peer fixtures and the load generators).
    """
    top = module.split(".")[0]
    if top in ("bench", "tests", "scripts"):
        return "dev"
    if top == "pipeline":
        sub = module.split(".")[1] if "." in module else ""
        return f"pipeline.{sub}" if sub in ("sources", "sinks") else "engine"
    return top


ALLOWED: dict[str, frozenset[str]] = {
    "engine": frozenset(),
    "pipeline.sources": frozenset({"engine"}),
    "pipeline.sinks": frozenset({"engine"}),
    "config": frozenset({"engine", "pipeline.sources", "pipeline.sinks"}),
    "api": frozenset({"engine", "pipeline.sources", "pipeline.sinks", "config"}),
    "dev": frozenset({"engine", "pipeline.sources", "pipeline.sinks", "config", "api"}),
}
"""Which layers each layer may import (besides itself): dependencies point one way, from the
daemon (``api``) through ``config`` to the sources and sinks and on to the engine."""


def violations(root: Path = ROOT) -> list[str]:
    """Every import that crosses layers against :data:`ALLOWED`, once per file and line."""
    known = modules(root)
    out = set()
    for imp in imports(root, known):
        src, dst = layer(imp.source), layer(imp.target)
        if src != dst and dst not in ALLOWED[src]:
            out.add(f"{known[imp.source].relative_to(root)}:{imp.line}: {imp.source} "
                    f"({src}) imports {imp.target} ({dst})")
    return sorted(out)


def layer_graph(edges: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    """The layers and which others each imports."""
    out: dict[str, set[str]] = {}
    for src, targets in edges.items():
        out.setdefault(layer(src), set()).update(
            layer(t) for t in targets if layer(t) != layer(src))
    return out


def main() -> int:
    edges = graph()
    found = cycles(edges)
    for c in found:
        print("cycle:", " <-> ".join(c))
    bad = violations()
    for v in bad:
        print("layer:", v)
    layered = cycles(layer_graph(edges))
    for c in layered:
        print("layer cycle:", " <-> ".join(c))
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports, "
          f"{len(found)} cycles, {len(layered)} layer cycles, {len(bad)} layer violations")
    return 1 if found or bad or layered else 0


if __name__ == "__main__":
    sys.exit(main())
