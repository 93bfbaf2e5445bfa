"""gadgetpipe's version: the one in pyproject.toml, read from the installed package's metadata
(from pyproject.toml itself when running from a source tree that is not installed). The CLI's
``--version``, GetInfo's ``serverVersion``, the OTLP scope and resource, and the
``gadgetpipe_build_info`` metric all report this string."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

__all__ = ["VERSION"]

DISTRIBUTION = "gadgetpipe"


def _version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        with pyproject.open("rb") as f:
            return str(tomllib.load(f)["project"]["version"])


VERSION = _version()
