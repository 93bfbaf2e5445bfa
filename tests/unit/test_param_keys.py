"""Every param a gadget announces can become an upstream ``gadgetctl`` flag.

gadgetctl registers a command-line flag for every param of ``GetGadgetInfo``: named by its
``key``, a hidden one for its ``alternativeKey``, a short one for its ``alias``
(cmd/common/oci.go, ``AddOCIFlags``). A key it has already registered makes it panic before
it sends the run (``run flag redefined: enable``), so the keys (and alternative keys, and
aliases) of everything a gadget announces must be unique and none may be one of gadgetctl's own.
"""

from __future__ import annotations

from collections import Counter

import pytest

from api.context import ServiceContext
from api.gadget_info import gadget_info, sorted_datasources
from api.run_session import new_run
from pipeline._gen import gadget_service_pb2 as pb
from pipeline.gadget import GadgetSpec
from pipeline.ledger import Ledger
from pipeline.params import resolve
from pipeline.sinks.registry import SinkManager
from pipeline.sources.catalog import Catalog

# The flags gadgetctl defines itself for `run`/`attach`, from upstream Inspektor Gadget's
# source (the tree the set-up builds gadgetctl from):
# - cmd/gadgetctl/main.go, cmd/common/config.go (AddConfigFlag), cmd/common/verbose.go
#   (AddVerboseFlag): config, verbose/-v; cobra adds help/-h;
# - pkg/runtime/grpc/grpc-runtime.go: GlobalParamDescs (connection-timeout, remote-address,
#   tls-key-file, tls-cert-file, tls-server-ca-file, tls-server-name; tcp-port and
#   gadget-namespace in the Kubernetes connection mode kubectl-gadget uses) and ParamDescs
#   (detach, tags, name, id, event-buffer-length; node in the Kubernetes mode);
# - cmd/common/oci.go, NewRunCommand: timeout/-t, file/-f, oci-store-user (ig only), the OCI
#   handler's instance params (pkg/operators/oci-handler/oci.go: validate-metadata, pull,
#   annotate) and the global params of every operator it links (pkg/operators/otel-metrics:
#   otel-metrics-listen, otel-metrics-listen-address, otel-metrics-export-internals);
# - the client-side operators whose instance params gadgetctl appends to the gadget's own
#   (pkg/gadget-context/run.go, instantiateOperators) before AddOCIFlags: limiter
#   (max-entries), sort (sort), otel-logs (otel-logs-exporter), otel-metrics
#   (otel-metrics-name, otel-metrics-print-interval, otel-metrics-exporter), ustack
#   (symbolizers, debuginfod-cache-path), cli (pkg/operators/cli/clioperator.go: fields,
#   output/-o), generate_networkpolicy (policy-format).
GADGETCTL_FLAGS = frozenset({
    "help", "config", "verbose",
    "connection-timeout", "remote-address", "tls-key-file", "tls-cert-file",
    "tls-server-ca-file", "tls-server-name", "tcp-port", "gadget-namespace",
    "detach", "tags", "name", "id", "event-buffer-length", "node",
    "timeout", "file", "oci-store-user", "validate-metadata", "pull", "annotate",
    "otel-metrics-listen", "otel-metrics-listen-address", "otel-metrics-export-internals",
    "max-entries", "sort", "otel-logs-exporter", "otel-metrics-name",
    "otel-metrics-print-interval", "otel-metrics-exporter", "symbolizers",
    "debuginfod-cache-path", "fields", "output", "policy-format",
})
GADGETCTL_SHORT_FLAGS = frozenset({"h", "v", "t", "f", "o"})
"""help, verbose, timeout, file (cmd/common/oci.go) and the cli operator's output."""
UPSTREAM_TYPE_HINTS = frozenset({
    "", "bool", "string", "bytes", "int", "int8", "int16", "int32", "int64", "uint", "uint8",
    "uint16", "uint32", "uint64", "float32", "float64", "duration", "ip", "[]string"})
"""pkg/params/params.go: the type hints gadgetctl validates flag values by."""

CATALOG = Catalog()


def _announced(spec: GadgetSpec) -> list[pb.Param]:
    """The params GetGadgetInfo sends for a gadget (the daemon's own path)."""
    ctx = ServiceContext(CATALOG, Ledger(), sinks=SinkManager(Ledger()))
    run = new_run(ctx, spec, {}, "inspect")
    info = gadget_info(spec, spec.name, sorted_datasources(run.schemas), run.param_specs,
                       with_ids=False)
    return list(info.params)


@pytest.mark.parametrize("spec", list(CATALOG), ids=lambda s: s.name)
def test_announced_keys_are_unique_and_none_is_a_gadgetctl_flag(spec: GadgetSpec) -> None:
    params = _announced(spec)
    flags = [p.key for p in params] + [p.alternativeKey for p in params if p.alternativeKey]
    dups = sorted(k for k, n in Counter(flags).items() if n > 1)
    assert not dups, f"{spec.name}: keys announced twice: {dups}"
    clash = sorted(set(flags) & GADGETCTL_FLAGS)
    assert not clash, f"{spec.name}: keys that are gadgetctl's own flags: {clash}"
    aliases = [p.alias for p in params if p.alias]
    dup_aliases = sorted(a for a, n in Counter(aliases).items() if n > 1)
    assert not dup_aliases, f"{spec.name}: aliases announced twice: {dup_aliases}"
    assert not set(aliases) & GADGETCTL_SHORT_FLAGS, f"{spec.name}: {aliases}"
    assert all(len(a) == 1 for a in aliases), "a cobra shorthand is one letter"
    assert {p.typeHint for p in params} <= UPSTREAM_TYPE_HINTS


@pytest.mark.parametrize("spec", list(CATALOG), ids=lambda s: s.name)
def test_every_announced_param_round_trips_as_a_flag(spec: GadgetSpec) -> None:
    """What gadgetctl sends for ``--KEY=VALUE`` (``prefix + key``) is the param itself."""
    ctx = ServiceContext(CATALOG, Ledger(), sinks=SinkManager(Ledger()))
    run = new_run(ctx, spec, {}, "inspect")
    for p in _announced(spec):
        wire = {p.prefix + p.key: p.defaultValue}
        values = resolve(run.param_specs, wire, ())
        assert p.prefix + p.key in values


def test_sink_flags_carry_the_sink_name_and_map_to_their_wire_keys() -> None:
    ctx = ServiceContext(CATALOG, Ledger(), sinks=SinkManager(Ledger()))
    run = new_run(ctx, CATALOG.resolve("trace_exec"),
                  {"operator.kafka.kafka-topic": "t.{node}", "operator.kafka.kafka-enable": "1"},
                  "x")
    assert run.values["operator.kafka.kafka-topic"] == "t.{node}"
    assert run.values["operator.kafka.kafka-enable"] is True
    sinks = {p.prefix: p.key for p in _announced(CATALOG.resolve("trace_exec"))
             if p.prefix.removeprefix("operator.").rstrip(".") in ctx.sinks.types}
    for prefix, key in sinks.items():
        assert key.startswith(prefix.removeprefix("operator.").rstrip(".") + "-"), key


@pytest.mark.parametrize(("old", "new", "value", "typed"), [
    ("operator.kafka.topic", "operator.kafka.kafka-topic", "a.{gadget}", "a.{gadget}"),
    ("operator.otel-logs.enable", "operator.otel-logs.otel-logs-enable", "true", True),
    ("operator.prometheus.max-series", "operator.prometheus.prometheus-max-series", "7", 7),
    ("operator.jsonl.path", "operator.jsonl.jsonl-path", "/dev/null", "/dev/null"),
    ("operator.fields.fields", "operator.fields.fields-select", "proc.comm", "proc.comm"),
    ("operator.enrich.node", "operator.enrich.enrich-node", "true", True),
])
def test_old_spellings_are_accepted_as_the_same_param(old: str, new: str, value: str,
                                                      typed: object) -> None:
    ctx = ServiceContext(CATALOG, Ledger(), sinks=SinkManager(Ledger()))
    run = new_run(ctx, CATALOG.resolve("trace_exec"), {old: value}, "x")
    assert run.values[new] == typed
    assert old not in run.values


def test_old_and_new_spelling_with_different_values_is_an_error_naming_both() -> None:
    from grpclib import GRPCError

    ctx = ServiceContext(CATALOG, Ledger(), sinks=SinkManager(Ledger()))
    with pytest.raises(GRPCError) as e:
        new_run(ctx, CATALOG.resolve("trace_exec"),
                {"operator.kafka.topic": "a", "operator.kafka.kafka-topic": "b"}, "x")
    assert "operator.kafka.kafka-topic" in str(e.value.message)
    assert "operator.kafka.topic" in str(e.value.message)


def test_top_file_max_rows_keeps_its_old_key() -> None:
    ctx = ServiceContext(CATALOG, Ledger(), sinks=SinkManager(Ledger()))
    run = new_run(ctx, CATALOG.resolve("top_file"), {"operator.oci.ebpf.max-entries": "3"}, "x")
    assert run.values["operator.oci.ebpf.max-rows"] == 3
