"""``gadgetpipe serve``: its flags and the daemon's start.

Apart from the client commands (api/cli_client.py) so that the daemon imports none of their
modules: grpcio alone is ~6 MB of the daemon's anonymous memory (bench m).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from api.compile_queue import DEFAULT_MAX_WAITING, DEFAULT_MAX_WAITING_PER_CLIENT


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"want an integer >= 1, got {text!r}")
    return int(text)


def cmd_serve(args: argparse.Namespace) -> int:
    from api.daemon import Daemon
    from api.server import ListenError

    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("hpack", "h2", "grpclib.protocol"):  # per-frame debug lines drown ours
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from api.serve_config import settings_from_args

    settings = settings_from_args(args)  # --tls-*, --insecure and the rest over the config
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(Daemon(settings).run_until_signalled())
    except ListenError as e:  # TCP without TLS, unreadable TLS files, unknown socket group
        raise SystemExit(f"gadgetpipe: cannot serve: {e}") from None
    return 0


def add_parser(sub: Any) -> None:
    """The ``serve`` subcommand on a parser's subparsers."""
    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--config", help="YAML config file (default: the embedded one)")
    s.add_argument("--listen", action="append", help="unix:///path or tcp://host:port "
                   "(repeatable)")
    s.add_argument("--state-dir", help="where instances are persisted")
    s.add_argument("--metrics-listen", help="HOST:PORT of the Prometheus endpoint")
    s.add_argument("--tls-cert")
    s.add_argument("--tls-key")
    s.add_argument("--tls-client-ca", help="require client certificates signed by this CA")
    s.add_argument("--insecure", action="store_true", help="allow TCP without TLS")
    s.add_argument("--socket-group", help="group owning the unix socket (mode 0660)")
    s.add_argument("--containerd-socket", help="containerd's socket, whose containers enrich "
                   "records ('' to watch none; default /run/containerd/containerd.sock)")
    s.add_argument("--containerd-namespace", help="containerd namespace to watch (default "
                   "k8s.io, Kubernetes')")
    s.add_argument("--log-level", default="info")
    s.add_argument("--otel-logs-endpoint", metavar="HOST:PORT",
                   help="also send the daemon's own log to this OTLP/gRPC endpoint "
                        "(http(s)://host:port too)")
    s.add_argument("--compile-queue", type=_positive, metavar="N",
                   help="runs of clients that may wait for their turn to compile their BPF "
                   "programs; more are refused (RESOURCE_EXHAUSTED) (default "
                   f"{DEFAULT_MAX_WAITING})")
    s.add_argument("--compile-queue-per-client", type=_positive, metavar="N",
                   help="of those, runs of one client (a process on the unix socket, a host "
                   f"over TCP) (default {DEFAULT_MAX_WAITING_PER_CLIENT})")
    s.set_defaults(fn=cmd_serve)


def main(argv: Sequence[str]) -> int:
    """``gadgetpipe serve ...`` with only this subcommand's parser (``argv`` starts with
    ``serve``)."""
    p = argparse.ArgumentParser(prog="gadgetpipe")
    add_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return int(args.fn(args))
