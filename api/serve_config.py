"""Daemon settings from the CLI flags (the YAML config layers under them)."""

from __future__ import annotations

import argparse
from pathlib import Path

from api.daemon import DaemonSettings


def settings_from_args(args: argparse.Namespace) -> DaemonSettings:
    s = DaemonSettings()
    if args.listen:
        s.listen = tuple(args.listen)
    if args.state_dir:
        s.state_dir = Path(args.state_dir)
    if args.metrics_listen:
        s.metrics_listen = None if args.metrics_listen == "off" else args.metrics_listen
    s.insecure = args.insecure
    s.socket_group = args.socket_group
    return s
