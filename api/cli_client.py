"""The ``gadgetpipe`` parser with every subcommand, and the client commands (run, inspect,
gadgets; instances and apply come from api/cli_instances.py and api/cli_apply.py). api/cli.py
runs ``serve`` without importing this module."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from api import cli_apply, cli_instances, cli_serve
from api.cli_output import Printer, consume
from api.client import DEFAULT_ADDRESS, GadgetClient, TLSFiles
from pipeline.operators import fields as fields_op
from pipeline.params import parse_duration
from pipeline.severity import Severity
from pipeline.version import VERSION

BATCH_DEFAULT = 1024
DESCRIPTION = ("gadgetpipe: serve the daemon, run and attach to gadgets, manage instances, "
               "apply config")


def _kv(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--param {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k] = v
    return out


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gadgetpipe", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=f"gadgetpipe {VERSION}")
    sub = p.add_subparsers(dest="command", required=True)

    cli_serve.add_parser(sub)

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
