"""``gadgetpipe config render|check|schema`` and ``gadgetpipe apply``.

* ``config render FILE...``: validates and prints the exact ``CreateGadgetInstanceRequest``s
  (protobuf JSON, a JSON array) that ``apply`` (or, with ``--owner config``, the daemon's
  ``serve --config``) sends, bookkeeping tags included, secret param values redacted.
* ``config check FILE...``: validates, including whether the kafka brokers and OTLP endpoints
  the files name accept connections; prints warnings and ``ok``.
* ``config schema``: the JSON Schema of one config document (= ``config/schema.json``).
* ``apply -f FILE|DIR [--prune] [--dry-run]``: makes a daemon's instances match the files,
  matching by instance name (see :mod:`api.reconcile`): absent -> created, changed ->
  replaced, unchanged -> left running, and with ``--prune`` instances an earlier ``apply``
  created that are no longer declared -> removed. Before changing anything the files are
  validated locally and every instance to create is checked by the daemon itself
  (GetGadgetInfo with its params validates them without starting anything), so a bad file
  changes nothing. ``--dry-run`` prints the plan only.

Exit status: 0 on success (and for a dry run), 1 if the config is invalid or an action failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format

from api.client import GadgetClient
from api.reconcile import (
    OWNER_APPLY,
    OWNER_CONFIG,
    Action,
    ActionKind,
    Outcome,
    execute,
    plan,
    stamp,
)
from config.loader import ConfigError, ConfigLoader, DeclaredInstance, LoadedConfig, Reachability
from config.schema import schema_text
from pipeline._gen import gadget_service_pb2 as pb

ClientFactory = Callable[[argparse.Namespace], GadgetClient]
AddRemote = Callable[[argparse.ArgumentParser], None]

__all__ = ["RemoteOps", "register", "rendered"]


def _load(files: list[str], reachability: Reachability) -> LoadedConfig | None:
    try:
        loaded = ConfigLoader(reachability=reachability).load(files)
    except ConfigError as e:
        print(f"error: the config is invalid, nothing was done:\n{e}", file=sys.stderr)
        return None
    for w in loaded.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return loaded


def rendered(loaded: LoadedConfig, owner: str) -> list[dict[str, Any]]:
    """The requests a config sends, as protobuf JSON, stamped for ``owner``; secret param
    values read ``<redacted>`` (the digest tag is of the real request)."""
    return [json_format.MessageToDict(loaded.redacted(stamp(r, owner)))
            for r in loaded.requests()]


def cmd_render(args: argparse.Namespace) -> int:
    loaded = _load(args.files, Reachability.OFF)
    if loaded is None:
        return 1
    owner = OWNER_CONFIG if args.owner == "config" else OWNER_APPLY
    print(json.dumps(rendered(loaded, owner), indent=2, ensure_ascii=False))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    loaded = _load(args.files, Reachability.OFF if args.no_reach_check else Reachability.ERROR)
    if loaded is None:
        return 1
    print(f"ok: {len(loaded.instances)} instance(s) in {len(loaded.sources)} file(s)"
          + (", with a daemon section" if loaded.daemon is not None else ""))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    sys.stdout.write(schema_text())
    return 0


class RemoteOps:
    """:class:`api.reconcile.InstanceOps` over gRPC (grpcio's blocking stubs, in threads)."""

    def __init__(self, client: GadgetClient) -> None:
        self._c = client

    async def create(self, req: pb.CreateGadgetInstanceRequest) -> pb.GadgetInstance:
        resp = await asyncio.to_thread(self._c.instances.CreateGadgetInstance, req)
        gi: pb.GadgetInstance = resp.gadgetInstance
        return gi

    async def remove(self, instance_id: str) -> None:
        resp = await asyncio.to_thread(self._c.instances.RemoveGadgetInstance,
                                       pb.GadgetInstanceId(id=instance_id))
        if resp.result != 0:
            raise RuntimeError(resp.message or f"removing {instance_id} failed")


def _rpc_reason(e: Exception) -> str:
    details = getattr(e, "details", None)
    if callable(details):
        return str(details())
    return str(e) or type(e).__name__


def _preflight(client: GadgetClient, actions: list[Action],
               where: dict[str, DeclaredInstance]) -> list[str]:
    """The daemon's own verdict on every request about to be created: GetGadgetInfo with the
    request's image and params resolves the gadget and validates the params there (its sinks,
    its catalog) without starting anything."""
    problems = []
    for a in actions:
        if a.kind not in (ActionKind.CREATE, ActionKind.REPLACE) or a.desired is None:
            continue
        cfg = a.desired.gadgetInstance.gadgetConfig
        try:
            client.info(cfg.imageName, dict(cfg.paramValues))
        except Exception as e:
            problems.append(f"{_where(where, a.name)}the daemon refuses instance {a.name!r}: "
                            f"{_rpc_reason(e)}")
    return problems


def _where(where: dict[str, DeclaredInstance], name: str) -> str:
    d = where.get(name)
    return f"{d.file}:{d.line}:{d.column}: {d.path}: " if d is not None else ""


def cmd_apply(args: argparse.Namespace, client_factory: ClientFactory) -> int:
    loaded = _load(args.file, Reachability.OFF if args.no_reach_check else Reachability.ERROR)
    if loaded is None:
        return 1
    if loaded.daemon is not None:
        print(f"note: the daemon section of {loaded.daemon_file} is not applied (serve --config "
              "reads it)", file=sys.stderr)
    where = {d.name: d for d in loaded.instances}
    with client_factory(args) as c:
        existing = list(c.instances.ListGadgetInstances(pb.ListGadgetInstancesRequest())
                        .gadgetInstances)
        actions = plan(loaded.requests(), existing, OWNER_APPLY, args.prune)
        problems = [f"{_where(where, a.name)}instance {a.name!r}: {a.reason}"
                    for a in actions if a.kind is ActionKind.CONFLICT]
        problems += _preflight(c, actions, where)
        if problems:
            print("error: nothing was done:\n" + "\n".join(problems), file=sys.stderr)
            return 1
        if args.dry_run:
            for a in actions:
                print(a)
            print(_summary(actions) + " (dry run: nothing was done)")
            return 0

        def show(o: Outcome) -> None:
            print(o, flush=True)

        outcomes = asyncio.run(execute(actions, RemoteOps(c), show))
    print(_summary(actions))
    failed = [o for o in outcomes if not o.ok]
    if failed:
        print(f"error: {len(failed)} action(s) failed", file=sys.stderr)
        return 1
    return 0


def _summary(actions: list[Action]) -> str:
    counts = {k: sum(1 for a in actions if a.kind is k) for k in ActionKind}
    return (f"{counts[ActionKind.CREATE]} to create, {counts[ActionKind.REPLACE]} to replace, "
            f"{counts[ActionKind.KEEP]} unchanged, {counts[ActionKind.REMOVE]} to remove")


def register(sub: Any, add_remote: AddRemote, client_factory: ClientFactory) -> None:
    """Adds ``config`` and ``apply`` to the ``gadgetpipe`` parser."""
    cfg = sub.add_parser("config", help="render, check and describe config files")
    csub = cfg.add_subparsers(dest="config_command", required=True)

    r = csub.add_parser("render", help="print the CreateGadgetInstance requests a config "
                        "declares, as JSON")
    r.add_argument("files", nargs="+", metavar="FILE", help="config files or directories")
    r.add_argument("--owner", choices=("apply", "config"), default="apply",
                   help="bookkeeping tags as apply (default) or serve --config sends them")
    r.set_defaults(fn=cmd_render)

    ck = csub.add_parser("check", help="validate config files, endpoints included")
    ck.add_argument("files", nargs="+", metavar="FILE", help="config files or directories")
    ck.add_argument("--no-reach-check", action="store_true",
                    help="do not try the kafka brokers and OTLP endpoints")
    ck.set_defaults(fn=cmd_check)

    s = csub.add_parser("schema", help="print the JSON Schema of a config document")
    s.set_defaults(fn=cmd_schema)

    a = sub.add_parser("apply", help="make a daemon's instances match config files")
    a.add_argument("-f", "--file", action="append", required=True, metavar="FILE|DIR",
                   help="config file or directory of *.yaml (repeatable)")
    a.add_argument("--prune", action="store_true",
                   help="remove instances an earlier apply created that are no longer declared")
    a.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    a.add_argument("--no-reach-check", action="store_true",
                   help="do not try the kafka brokers and OTLP endpoints the files name")
    add_remote(a)
    a.set_defaults(fn=lambda ns: cmd_apply(ns, client_factory))
