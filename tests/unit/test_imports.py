"""Dependencies point one way and nothing imports itself round a loop.

The graph is read from the source (tests/importgraph.py): every import counts, lazy ones in
functions and ``TYPE_CHECKING`` ones included. The layers, from the daemon inwards:
``api`` -> ``config`` -> ``pipeline.sources`` / ``pipeline.sinks`` -> the engine (``pipeline``
outside those two, which holds the generated protobuf modules, ``pipeline._gen``).
"""

from __future__ import annotations

from pathlib import Path

from tests import importgraph


def test_no_module_imports_itself_through_others() -> None:
    assert importgraph.cycles(importgraph.graph()) == []


def test_imports_point_from_the_daemon_towards_the_engine() -> None:
    assert importgraph.violations() == []


def test_no_layer_cycles() -> None:
    assert importgraph.cycles(importgraph.layer_graph(importgraph.graph())) == []


def test_the_engine_imports_no_source_sink_or_daemon_module() -> None:
    engine = {m: ts for m, ts in importgraph.graph().items()
              if importgraph.layer(m) == "engine"}
    assert len(engine) > 10  # the layer rule below is about real modules
    reached = {t for ts in engine.values() for t in ts}
    assert {importgraph.layer(t) for t in reached} <= {"engine"}


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_lazy_type_checking_and_dynamic_imports_are_edges(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "pipeline/__init__.py": "",
        "pipeline/a.py": "from typing import TYPE_CHECKING\n"
                         "if TYPE_CHECKING:\n    from pipeline.sources import b\n",
        "pipeline/sources/__init__.py": "",
        "pipeline/sources/b.py": "def f():\n    from ..c import x\n",
        "pipeline/c.py": "import importlib\nimportlib.import_module('api.d')\n",
        "pipeline/e.py": "import importlib\ndef hooks(n):\n"
                         "    return importlib.import_module(f'pipeline.sources.{n}.h')\n",
        "api/__init__.py": "",
        "api/d.py": "import pipeline.a\nimport os\n",
    })
    edges = importgraph.graph(root)
    assert edges["pipeline.a"] == {"pipeline.sources.b"}
    assert edges["pipeline.sources.b"] == {"pipeline.c"}
    assert edges["pipeline.c"] == {"api.d"}
    assert edges["api.d"] == {"pipeline.a"}
    assert edges["pipeline.e"] == {"pipeline.sources"}
    assert importgraph.cycles(edges) == [["api.d", "pipeline.a", "pipeline.c",
                                          "pipeline.sources.b"]]
    assert importgraph.violations(root) == [
        "pipeline/a.py:3: pipeline.a (engine) imports pipeline.sources.b (pipeline.sources)",
        "pipeline/c.py:2: pipeline.c (engine) imports api.d (api)",
        "pipeline/e.py:3: pipeline.e (engine) imports pipeline.sources (pipeline.sources)",
    ]
