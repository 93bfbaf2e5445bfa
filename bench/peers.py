"""Paths of the benchmark peers that ``scripts/setup bench`` builds.

The peers are the upstream-style Go client (``bench/goclient``) and the C load generators
(``bench/loadgen``). ``scripts/setup bench`` builds them into ``$GADGETPIPE_CACHE/bench`` and
lists them in ``bench.env``; the functions here run it when a peer is missing or a source is
newer than ``bench.env`` (the script itself rebuilds only what changed), then return the path.

Example::

    subprocess.run([str(goclient_path()), "-addr", addr, "-image", "trace_open", "-quiet"])
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

__all__ = ["exec_loop_path", "goclient_path", "open_loop_path"]

_ROOT = Path(__file__).resolve().parent.parent
_SETUP = _ROOT / "scripts" / "setup"
_SOURCES = (_ROOT / "bench" / "goclient", _ROOT / "bench" / "loadgen")


def _env_file() -> Path:
    cache = os.environ.get("GADGETPIPE_CACHE", "/var/cache/gadgetpipe")
    return Path(cache) / "bench" / "bench.env"


def _read_env(path: Path) -> dict[str, str]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    return dict(line.split("=", 1) for line in lines if "=" in line)


def _stale(env_file: Path) -> bool:
    built = env_file.stat().st_mtime
    return any(f.stat().st_mtime > built for d in _SOURCES for f in d.iterdir() if f.is_file())


def _peer(key: str) -> Path:
    """Returns the path bench.env gives for ``key``, running ``scripts/setup bench`` if needed.

    Raises:
        subprocess.CalledProcessError: the build failed.
        RuntimeError: bench.env still has no executable ``key`` after the build.
    """
    env_file = _env_file()
    value = _read_env(env_file).get(key)
    if value is None or not os.access(value, os.X_OK) or _stale(env_file):
        subprocess.run([str(_SETUP), "bench"], check=True)
        value = _read_env(env_file).get(key)
    if value is None or not os.access(value, os.X_OK):
        raise RuntimeError(f"{env_file} names no executable {key} after scripts/setup bench")
    return Path(value)


def goclient_path() -> Path:
    """Returns the built ``goclient`` (bench/goclient), building it if needed."""
    return _peer("GOCLIENT")


def open_loop_path() -> Path:
    """Returns the built ``open_loop`` (bench/loadgen/open_loop.c), building it if needed."""
    return _peer("OPEN_LOOP")


def exec_loop_path() -> Path:
    """Returns the built ``exec_loop`` (bench/loadgen/exec_loop.c), building it if needed."""
    return _peer("EXEC_LOOP")
