"""The catalog: the gadget folders under ``pipeline/sources/``, each read once and given its
source (``hooks.make_source`` when the folder has a ``hooks.py``, else the ring-buffer tracer).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.gadget import (
    SOURCES_DIR,
    GadgetError,
    GadgetSpec,
    SourceFactory,
    UnknownGadget,
    load_spec,
)
from pipeline.source import Source
from pipeline.sources.tracer import TracerSource

__all__ = ["Catalog"]

_IMAGE = re.compile(
    r"^(?:(?:[\w.-]+(?::\d+)?/)*)?(?P<name>[a-z0-9_-]+)(?::[\w.-]+)?(?:@sha256:[a-f0-9]+)?$")


class _Hooks:
    """A folder's ``hooks.make_source``, imported when the first run starts (a catalog is
    read by clients and the config loader too, which never start a source)."""

    def __init__(self, module: str) -> None:
        self._module = module

    def __call__(self, spec: GadgetSpec, values: Mapping[str, Any]) -> Source:
        make: SourceFactory = importlib.import_module(self._module).make_source
        return make(spec, values)


def hooks_loader(folder: Path) -> Callable[[], Any]:
    """Imports the folder's ``hooks.py`` when called (None: the folder has none)."""
    def load() -> Any:
        if not (folder / "hooks.py").exists():
            return None
        return importlib.import_module(f"{__package__}.{folder.name}.hooks")

    return load


def source_factory(folder: Path) -> SourceFactory:
    """``hooks.make_source`` when the folder has a ``hooks.py``, else the ring-buffer tracer."""
    if (folder / "hooks.py").exists():
        return _Hooks(f"{__package__}.{folder.name}.hooks")
    return TracerSource


class Catalog:
    """The gadgets found under a sources folder, loaded once."""

    def __init__(self, root: Path = SOURCES_DIR) -> None:
        self._specs: dict[str, GadgetSpec] = {}
        for gy in sorted(root.glob("*/gadget.yaml")):
            spec = load_spec(gy.parent, hooks_loader(gy.parent))
            self._specs[spec.name] = replace(spec, make_source=source_factory(gy.parent))

    def __iter__(self) -> Iterator[GadgetSpec]:
        return iter(self._specs.values())

    def names(self) -> list[str]:
        return sorted(self._specs)

    def resolve(self, image: str) -> GadgetSpec:
        """A gadget by short name or upstream image reference (any registry path and tag)."""
        m = _IMAGE.match(image.strip())
        name = m["name"] if m else image
        spec = self._specs.get(name)
        if spec is None:
            raise UnknownGadget(image, self.names())
        return spec

    def legacy(self, category: str, name: str) -> GadgetSpec:
        for spec in self._specs.values():
            if spec.category == category and spec.legacy_name == name:
                return spec
        known = sorted(f"{s.category}/{s.legacy_name}" for s in self._specs.values()
                       if s.category)
        raise GadgetError(f"gadget not found: {category}/{name} (known: {', '.join(known)})")
