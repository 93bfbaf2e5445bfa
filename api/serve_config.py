"""Daemon settings: the YAML config (``--config FILE``, else the embedded default), with the
CLI flags layered over it.

Order, later wins: :class:`api.daemon.DaemonSettings` defaults, the config's ``daemon:``
section, the flags given to ``serve`` (``--listen`` replaces the config's whole list). The
config is validated completely (instances included) before anything starts; an invalid one
ends ``serve`` with its issues and exit status 1. The validated config rides along in
``DaemonSettings.config``: the daemon creates its instances at start and re-reads the same
files on SIGHUP.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from api.daemon import DaemonSettings
from api.otel_logs import OtelLogsSettings
from api.peers import Peer, PeerTLS
from api.server import TLSConfig
from config.loader import DEFAULT_CONFIG, ConfigError, ConfigLoader, LoadedConfig, Reachability
from config.schema import NodeSection, PeerTLSSection

_logger = logging.getLogger(__name__)


def load_config(path: str | None) -> LoadedConfig:
    """The validated config at ``path`` (None: the embedded default).

    Raises:
        SystemExit: the config is invalid; the message lists every issue.
    """
    # Unreachable sink endpoints are only logged: the daemon must start while a broker is
    # down (sinks retry), unlike ``gadgetpipe config check``.
    loader = ConfigLoader(reachability=Reachability.WARN)
    try:
        loaded = loader.load([path or DEFAULT_CONFIG])
    except ConfigError as e:
        raise SystemExit(f"gadgetpipe: invalid config, not starting:\n{e}") from None
    for w in loaded.warnings:
        _logger.warning("config: %s", w)
    return loaded


def settings_from_args(args: argparse.Namespace) -> DaemonSettings:
    """Settings for ``serve``: config file (or the embedded default), then flags."""
    loaded = load_config(getattr(args, "config", None))
    s = DaemonSettings(config=loaded)
    d = loaded.daemon
    if d is not None:
        s.listen = tuple(d.listen)
        s.state_dir = Path(d.state_dir)
        s.metrics_listen = d.metrics_listen
        s.insecure = d.insecure
        s.socket_group = d.socket_group
        s.events_buffer_length = d.events_buffer_length
        s.node = d.node
        s.nodes = {name: peer(n) for name, n in d.nodes.items()}
        s.node_tls = peer_tls(d.node_tls)
        if d.tls is not None:
            s.tls = TLSConfig(Path(d.tls.cert), Path(d.tls.key),
                              Path(d.tls.client_ca) if d.tls.client_ca else None)
        if d.otel_logs is not None:
            s.otel_logs = OtelLogsSettings(d.otel_logs.endpoint, d.otel_logs.level)
        if d.containerd_socket is not None:
            s.containerd_socket = d.containerd_socket
        if d.containerd_namespace is not None:
            s.containerd_namespace = d.containerd_namespace
        if d.compile_queue is not None:
            s.compile_queue = d.compile_queue
        if d.compile_queue_per_client is not None:
            s.compile_queue_per_client = d.compile_queue_per_client
    s.sinks = {k: dict(v) for k, v in loaded.sink_defaults.items()}
    if args.listen:
        s.listen = tuple(args.listen)
    if args.state_dir:
        s.state_dir = Path(args.state_dir)
    if args.metrics_listen:
        s.metrics_listen = None if args.metrics_listen == "off" else args.metrics_listen
    # store_true flags cannot say "not given": they can only switch the config's value on.
    s.insecure = s.insecure or args.insecure
    if args.socket_group:
        s.socket_group = args.socket_group
    if getattr(args, "containerd_socket", None) is not None:
        s.containerd_socket = args.containerd_socket
    if getattr(args, "containerd_namespace", None):
        s.containerd_namespace = args.containerd_namespace
    if getattr(args, "compile_queue", None):
        s.compile_queue = args.compile_queue
    if getattr(args, "compile_queue_per_client", None):
        s.compile_queue_per_client = args.compile_queue_per_client
    s.tls = layer_tls(s.tls, getattr(args, "tls_cert", None), getattr(args, "tls_key", None),
                      getattr(args, "tls_client_ca", None))
    endpoint = getattr(args, "otel_logs_endpoint", None)
    if endpoint:
        level = s.otel_logs.level if s.otel_logs is not None else "info"
        try:
            s.otel_logs = OtelLogsSettings(endpoint, level)
        except ValueError as e:
            raise SystemExit(f"gadgetpipe: --otel-logs-endpoint: {e}") from None
    return s


def peer_tls(section: PeerTLSSection | None) -> PeerTLS | None:
    """The config's TLS towards peers as the daemon takes it."""
    if section is None:
        return None
    ca, cert, key = (Path(p) if p else None for p in (section.ca, section.cert, section.key))
    return PeerTLS(ca, cert, key, section.server_name)


def peer(node: NodeSection) -> Peer:
    """A ``daemon.nodes`` entry as the daemon takes it."""
    return Peer(node.address, peer_tls(node.tls))


def layer_tls(tls: TLSConfig | None, cert: str | None, key: str | None,
              client_ca: str | None) -> TLSConfig | None:
    """The config's TLS with the ``--tls-*`` flags given over it.

    ``--tls-cert`` and ``--tls-key`` replace the config's pair (and keep its client CA unless
    ``--tls-client-ca`` is given too); ``--tls-client-ca`` alone adds mutual TLS to the
    config's pair, and is an error when there is none (it would silently do nothing).

    Raises:
        SystemExit: one of cert/key without the other, or a client CA without a certificate.
    """
    if cert or key:
        if not (cert and key):
            raise SystemExit("gadgetpipe: --tls-cert and --tls-key go together")
        keep = tls.client_ca if tls is not None else None
        return TLSConfig(Path(cert), Path(key), Path(client_ca) if client_ca else keep)
    if client_ca:
        if tls is None:
            raise SystemExit("gadgetpipe: --tls-client-ca needs --tls-cert and --tls-key (or "
                             "daemon.tls in the config)")
        return replace(tls, client_ca=Path(client_ca))
    return tls
