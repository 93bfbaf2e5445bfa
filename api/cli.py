"""``gadgetpipe``: serve the daemon, run and attach to gadgets, manage instances, apply config.

``serve`` is dispatched before the client commands are imported (api/cli_serve.py says why);
every other command goes through the full parser of api/cli_client.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand."""
    from api.cli_client import build_parser as full

    return full()


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["serve"]:
        from api import cli_serve

        return cli_serve.main(args_list)
    args = build_parser().parse_args(args_list)
    return int(args.fn(args))


if __name__ == "__main__":
    raise SystemExit(main())
