"""``gadgetpipe instances list|get|rm``, ``gadgetpipe attach`` and ``gadgetpipe run --detach``.

Instance references resolve as upstream's CLI does (docs/gadget-service.md §9.1): the instances are
listed, then a reference matches a full id, else an exact name, else a unique id prefix; an
ambiguous or unknown reference is an error. ``attach --from-seq N`` asks the daemon to replay from
instance seq ``N`` (request metadata ``gadgetpipe-from-seq``); when an attach ends, the command
prints the ``--from-seq`` that resumes where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable, Iterator
from typing import Any, cast

import grpc
from google.protobuf import json_format

from api.cli_output import Printer, consume
from api.client import GadgetClient, RunStream
from api.instance import FROM_SEQ_METADATA, SEQ_BASE_METADATA
from pipeline._gen import gadget_service_pb2 as pb
from pipeline.params import parse_duration

ClientFactory = Callable[[argparse.Namespace], GadgetClient]
AddRemote = Callable[[argparse.ArgumentParser], None]

_STATUS = {pb.StatusRunning: "Running", pb.StatusError: "Error"}


def _status(state: pb.GadgetInstanceState) -> str:
    """Running, Error, or Starting (not tracing yet, api/instance.py); Unknown otherwise."""
    if state.status == pb.StatusInvalid and state.message.startswith("starting"):
        return "Starting"
    return _STATUS.get(state.status, "Unknown")


class ResolveError(SystemExit):
    """A reference matches no instance, or several."""


def resolve(instances: list[pb.GadgetInstance], ref: str) -> pb.GadgetInstance:
    """Full id, exact name, then unique id prefix (docs/gadget-service.md §9.1)."""
    for gi in instances:
        if gi.id == ref:
            return gi
    named = [gi for gi in instances if gi.name == ref]
    if len(named) == 1:
        return named[0]
    prefixed = [gi for gi in instances if ref and gi.id.startswith(ref)]
    if len(prefixed) == 1:
        return prefixed[0]
    if len(prefixed) > 1 or len(named) > 1:
        raise ResolveError(f"ambiguous gadget instance {ref!r}: matches "
                           f"{', '.join(gi.id[:12] for gi in named or prefixed)}")
    raise ResolveError(f"no gadget instance {ref!r}")


def _list(c: GadgetClient) -> list[pb.GadgetInstance]:
    resp = c.instances.ListGadgetInstances(pb.ListGadgetInstancesRequest())
    return list(resp.gadgetInstances)


def cmd_list(args: argparse.Namespace, client: ClientFactory) -> int:
    with client(args) as c:
        instances = _list(c)
    if args.output == "json":
        for gi in instances:
            print(json_format.MessageToJson(gi, indent=None))
        return 0
    print(f"{'ID':<12}  {'NAME':<24}  {'TAGS':<16}  {'GADGET':<28}  {'STATUS':<8}  MESSAGE")
    for gi in instances:
        tags = ",".join(t for t in gi.tags if t)
        print(f"{gi.id[:12]:<12}  {gi.name:<24}  {tags:<16}  {gi.gadgetConfig.imageName:<28}  "
              f"{_status(gi.state):<8}  {gi.state.message}")
    return 0


def cmd_get(args: argparse.Namespace, client: ClientFactory) -> int:
    with client(args) as c:
        gi = c.instances.GetGadgetInstance(pb.GadgetInstanceId(id=resolve(_list(c), args.ref).id))
    created = datetime.datetime.fromtimestamp(gi.timeCreated, datetime.UTC).isoformat()
    print(json_format.MessageToJson(gi, indent=2))
    print(f"# created {created}", file=sys.stderr)
    return 0


def cmd_rm(args: argparse.Namespace, client: ClientFactory) -> int:
    failed = 0
    with client(args) as c:
        instances = _list(c)
        for ref in args.refs:
            gi = resolve(instances, ref)
            resp = c.instances.RemoveGadgetInstance(pb.GadgetInstanceId(id=gi.id))
            if resp.result != 0:
                print(f"error: removing {gi.id}: {resp.message}", file=sys.stderr)
                failed += 1
                continue
            print(gi.id)
            if resp.message:
                print(f"warning: {resp.message}", file=sys.stderr)
    return 1 if failed else 0


class _ObservedCall:
    """A grpcio call whose payload seqs are watched (to print where to resume), and whose
    cancel by this side ends the iteration quietly (that is how an attach session ends)."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.last_seq = 0
        self.cancelled = False

    def __iter__(self) -> Iterator[pb.GadgetEvent]:
        try:
            for ev in self._call:
                if ev.type == 0:
                    self.last_seq = ev.seq
                yield ev
        except grpc.RpcError as e:
            if self.cancelled and e.code() == grpc.StatusCode.CANCELLED:
                return
            raise

    def cancel(self) -> None:
        self.cancelled = True
        self._call.cancel()

    def seq_base(self) -> int:
        try:
            md = dict(self._call.initial_metadata() or ())
        except Exception:
            return 0
        raw = md.get(SEQ_BASE_METADATA, "0")
        return int(raw) if str(raw).isdigit() else 0


class _MetadataStub:
    """Stands in for ``GadgetManagerStub`` so a RunStream's call carries request metadata."""

    def __init__(self, stub: Any, metadata: list[tuple[str, str]]) -> None:
        self._stub = stub
        self._metadata = metadata
        self.call: _ObservedCall | None = None

    def RunGadget(self, requests: Iterator[pb.GadgetControlRequest],
                  timeout: float | None = None) -> _ObservedCall:
        self.call = _ObservedCall(self._stub.RunGadget(requests, timeout=timeout,
                                                       metadata=self._metadata or None))
        return self.call


class _AttachStream(RunStream):
    """The server never reads an attach stream after the first message
    (docs/gadget-service.md §3.3), so a stop is a cancel, as upstream's client does."""

    def stop(self) -> None:
        self.cancel()


def open_attach(c: GadgetClient, instance_id: str, from_seq: int | None
                ) -> tuple[RunStream, _MetadataStub]:
    """An attach stream (optionally resuming from an instance seq)."""
    md = [(FROM_SEQ_METADATA, str(from_seq))] if from_seq is not None else []
    stub = _MetadataStub(c.gadgets, md)
    req = pb.GadgetControlRequest(attachRequest=pb.GadgetAttachRequest(id=instance_id,
                                                                       version=1))
    return _AttachStream(cast(Any, stub), req), stub


def cmd_attach(args: argparse.Namespace, client: ClientFactory) -> int:
    with client(args) as c:
        gi = resolve(_list(c), args.ref)
        c.info(gi.id, instance=True)  # waits until it started; fails with its error if it did not
        stream, stub = open_attach(c, gi.id, args.from_seq)
        rc = consume(stream, Printer(args.output), args.verbose)
        call = stub.call
        if call is not None and call.last_seq:
            resume = call.last_seq + call.seq_base() + 1
            print(f"to resume: gadgetpipe attach {gi.id} --from-seq {resume}", file=sys.stderr)
        return rc


def run_detached(args: argparse.Namespace, params: dict[str, str], client: ClientFactory
                 ) -> int:
    """``run --detach``: creates an instance of the gadget and prints its id."""
    tags = [t for item in args.tag for t in item.split(",")] or [""]
    timeout = parse_duration(args.timeout) if args.timeout else 0.0
    req = pb.CreateGadgetInstanceRequest(gadgetInstance=pb.GadgetInstance(
        name=args.name or "", tags=tags,
        gadgetConfig=pb.GadgetRunRequest(imageName=args.gadget, paramValues=params, version=1,
                                         timeout=int(timeout * 1e9))))
    with client(args) as c:
        try:
            resp = c.instances.CreateGadgetInstance(req)
        except Exception as e:
            details = getattr(e, "details", None)
            print(f"error: {details() if callable(details) else e}", file=sys.stderr)
            return 1
    gi = resp.gadgetInstance
    print(f'installed as "{gi.id}" (name {gi.name})')
    # The daemon answers once the instance traces, or says why not (failed, still starting).
    if gi.state.status == pb.StatusError:
        print(f"error: the instance failed: {gi.state.message}", file=sys.stderr)
        return 1
    if gi.state.status == pb.StatusRunning and not gi.state.message:
        print("tracing", file=sys.stderr)
    else:
        print(f"not tracing yet: {gi.state.message or 'starting'}", file=sys.stderr)
    return 0


def register(sub: Any, add_remote: AddRemote, client_factory: ClientFactory) -> None:
    """Adds ``instances`` and ``attach`` to the ``gadgetpipe`` parser."""
    inst = sub.add_parser("instances", help="list, show and remove gadget instances")
    isub = inst.add_subparsers(dest="instances_command", required=True)

    ls = isub.add_parser("list", aliases=["ls"], help="list instances")
    ls.add_argument("-o", "--output", choices=("columns", "json"), default="columns")
    add_remote(ls)
    ls.set_defaults(fn=lambda a: cmd_list(a, client_factory))

    get = isub.add_parser("get", aliases=["show"], help="show one instance as JSON")
    get.add_argument("ref", metavar="ID", help="id, name or unique id prefix")
    add_remote(get)
    get.set_defaults(fn=lambda a: cmd_get(a, client_factory))

    rm = isub.add_parser("rm", aliases=["delete"], help="stop and remove instances")
    rm.add_argument("refs", metavar="ID", nargs="+", help="id, name or unique id prefix")
    add_remote(rm)
    rm.set_defaults(fn=lambda a: cmd_rm(a, client_factory))

    at = sub.add_parser("attach", help="print an instance's buffered, then live, records")
    at.add_argument("ref", metavar="ID", help="id, name or unique id prefix")
    at.add_argument("--from-seq", type=int, help="replay from this instance seq on "
                    "(what a previous attach printed), without duplicates")
    at.add_argument("-o", "--output", choices=("columns", "json"), default="columns")
    at.add_argument("-v", "--verbose", action="store_true")
    add_remote(at)
    at.set_defaults(fn=lambda a: cmd_attach(a, client_factory))
