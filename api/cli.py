"""``gadgetpipe``: serve the daemon, run and attach to gadgets, manage instances, apply config."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Sequence

from api import cli_apply, cli_instances
from api.cli_output import Printer, consume
from api.client import DEFAULT_ADDRESS, GadgetClient, TLSFiles
from api.compile_queue import DEFAULT_MAX_WAITING, DEFAULT_MAX_WAITING_PER_CLIENT
from pipeline.operators import fields as fields_op
from pipeline.params import parse_duration
from pipeline.severity import Severity
from pipeline.version import VERSION

BATCH_DEFAULT = 1024


def _kv(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--param {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"want an integer >= 1, got {text!r}")
    return int(text)


def _add_remote(p: argparse.ArgumentParser) -> None:
    p.add_argument("--remote-address", default=DEFAULT_ADDRESS,
                   help=f"daemon address (default {DEFAULT_ADDRESS}; also host:port)")
    p.add_argument("--tls-ca", help="CA of the daemon's certificate (enables TLS)")
    p.add_argument("--tls-cert", help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", help="client key (mutual TLS)")
    p.add_argument("--tls-server-name", help="expected server name in its certificate")


def _client(args: argparse.Namespace) -> GadgetClient:
    tls = TLSFiles(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name) \
        if args.tls_ca else None
    try:
        return GadgetClient(args.remote_address, tls)
    except Exception as e:  # grpc's FutureTimeoutError has no message
        raise SystemExit(f"cannot reach the daemon at {args.remote_address}: "
                         f"{type(e).__name__} {e}".rstrip()) from None


def cmd_run(args: argparse.Namespace) -> int:
    params = _kv(args.param)
    if args.filter:
        params["operator.filter.filter"] = args.filter
    if args.fields:
        params[fields_op.PARAM] = args.fields
    if args.detach:
        return cli_instances.run_detached(args, params, _client)
    if not args.per_record:
        params.setdefault("operator.grpc.batch-max", str(args.batch_max))
    timeout = parse_duration(args.timeout) if args.timeout else 0.0
    with _client(args) as c:
        level = Severity.DEBUG if args.verbose else Severity.INFO
        stream = c.run(args.gadget, params, timeout, log_level=level)
        return consume(stream, Printer(args.output), args.verbose, args.ready_file)


def cmd_inspect(args: argparse.Namespace) -> int:
    with _client(args) as c:
        info = c.info(args.gadget, _kv(args.param), extra=True)
    print(f"gadget: {info.imageName}")
    for ds in info.dataSources:
        print(f"\ndata source {ds.name} ({'array' if ds.type == 2 else 'single'}):")
        for f in ds.fields:
            flags = " hidden" if f.flags & 4 else ""
            print(f"  {f.fullName:<28} kind={f.kind:<3} payload={f.payloadIndex} offs={f.offs:<5}"
                  f" size={f.size:<5}{flags}")
    print("\nparams:")
    for p in info.params:
        print(f"  {p.prefix}{p.key:<24} default={p.defaultValue!r:<10} {p.typeHint:<8} "
              f"{p.description}")
    if info.extraInfo.data:
        print("\nextra info:", ", ".join(f"{k} ({v.contentType}, {len(v.content)} bytes)"
                                         for k, v in sorted(info.extraInfo.data.items())))
        if args.show:
            for key in args.show:
                entry = info.extraInfo.data.get(key)
                if entry is not None:
                    print(f"\n--- {key} ---\n{entry.content.decode('utf-8', 'replace')}")
    return 0


def cmd_gadgets(args: argparse.Namespace) -> int:
    from pipeline.sources.catalog import Catalog

    for spec in Catalog():
        print(f"{spec.name:<22} {spec.description}")
        if args.verbose:
            for p in spec.params:
                print(f"    {p.full_key:<40} {p.default!r:<10} {p.description}")
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gadgetpipe", description=__doc__)
    p.add_argument("--version", action="version", version=f"gadgetpipe {VERSION}")
    sub = p.add_subparsers(dest="command", required=True)

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

    r = sub.add_parser("run", help="run a gadget and print its records")
    r.add_argument("gadget")
    r.add_argument("--param", "-p", action="append", default=[], metavar="K=V")
    r.add_argument("--filter", "-F")
    r.add_argument("--fields")
    r.add_argument("--timeout", "-t", help="e.g. 5s; default: until interrupted")
    r.add_argument("-o", "--output", choices=("columns", "json"), default="columns")
    r.add_argument("--per-record", action="store_true",
                   help="one message per record, as upstream clients receive them")
    r.add_argument("--batch-max", type=int, default=BATCH_DEFAULT)
    r.add_argument("-v", "--verbose", action="store_true")
    r.add_argument("--ready-file", metavar="PATH",
                   help="write PATH (atomically) when the gadget traces, for scripts that "
                   "start a workload then")
    r.add_argument("--detach", action="store_true", help="create a gadget instance instead "
                   "(waits until it traces, up to the daemon's bound)")
    r.add_argument("--name", help="instance name (with --detach; default: a random one)")
    r.add_argument("--tag", action="append", default=[], help="instance tag (with --detach; "
                   "repeatable or comma-separated)")
    _add_remote(r)
    r.set_defaults(fn=cmd_run)

    i = sub.add_parser("inspect", help="show a gadget's data sources, fields and params")
    i.add_argument("gadget")
    i.add_argument("--param", "-p", action="append", default=[], metavar="K=V")
    i.add_argument("--show", action="append", help="print this extra-info entry")
    _add_remote(i)
    i.set_defaults(fn=cmd_inspect)

    g = sub.add_parser("gadgets", help="list the gadgets this build knows")
    g.add_argument("-v", "--verbose", action="store_true")
    g.set_defaults(fn=cmd_gadgets)

    cli_instances.register(sub, _add_remote, _client)
    cli_apply.register(sub, _add_remote, _client)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    raise SystemExit(main())
