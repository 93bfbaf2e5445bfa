"""The models of gadgetpipe's YAML config, and the JSON Schema generated from them.

One YAML file (or several, or a directory of them; each may hold several ``---`` documents)
configures the daemon and declares gadget instances. A document is one of:

* a **gadgetpipe config** (:class:`ConfigDocument`): an optional ``daemon:`` section (how the
  daemon runs; only ``serve --config`` reads it, ``apply`` ignores it) and ``instances:``;
* an **upstream instance manifest** (:class:`InstanceSpecManifest`), the format Inspektor
  Gadget's ``gadgetctl run --detach -f`` reads (``apiVersion: 1``, ``kind: instance-spec``).

Contracts:

* The models are strict: unknown keys are errors, and no value is coerced from another type
  (``insecure: "yes"`` is an error, not ``True``). The loader resolves YAML scalars with the
  YAML 1.2 core schema (``yes``/``on`` stay strings, ``0755`` is decimal) before validating.
* Keys are camelCase (as in the gadget service's protobuf and upstream manifests), except the
  keys of ``sinks:``/``metrics:`` sections and ``daemon.sinks``, which are the sinks' setting
  names (``max-series``; the param key ``prometheus-max-series`` is accepted too): a setting
  ``s`` of sink ``t`` becomes the parameter ``operator.t.t-s``.
* What cannot be checked without the catalog and the sinks (gadget names, parameter keys and
  values, filter expressions, sink settings) is checked by :mod:`config.loader`.

``gadgetpipe config schema`` prints the JSON Schema (:func:`schema_text`);
``config/schema.json`` is that output and a unit test keeps it fresh.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    WithJsonSchema,
    model_validator,
)

from config.addresses import ListenAddress as Address
from config.addresses import ListenError, otlp_grpc_url, parse_host_port
from pipeline.params import parse_duration

if TYPE_CHECKING:
    from pipeline.sinks.base import SinkType

__all__ = [
    "DEFAULT_LISTEN",
    "DEFAULT_METRICS_LISTEN",
    "DEFAULT_STATE_DIR",
    "MAX_EVENT_BUFFER",
    "NAME_PATTERN",
    "ConfigDocument",
    "DaemonSection",
    "InstanceSection",
    "InstanceSpecManifest",
    "NodeSection",
    "OtelLogsSection",
    "PeerTLSSection",
    "TLSSection",
    "json_schema",
]

DEFAULT_LISTEN = "unix:///var/run/gadgetpipe/gadgetpipe.sock"
DEFAULT_STATE_DIR = "/var/lib/gadgetpipe"
DEFAULT_METRICS_LISTEN = "127.0.0.1:2224"
DEFAULT_EVENTS_BUFFER = 131072
MAX_EVENT_BUFFER = 65536
"""The instance manager's limit for ``eventBufferLength`` (api.instance)."""
NAME_PATTERN = r"^[a-z0-9-_]{1,32}$"
ID_PATTERN = r"^[a-f0-9]{32}$"
EXTENSION_PREFIX = "x-"
"""Top-level keys of a gadgetpipe document starting with this are ignored (YAML anchors)."""
RESERVED_TAG_PREFIX = "gadgetpipe."
"""Tags starting with this are apply's bookkeeping (owner and digest), not the user's."""

_NAME_RE = re.compile(NAME_PATTERN)
_ID_RE = re.compile(ID_PATTERN)
_SCALAR_SCHEMA: dict[str, Any] = {"type": ["string", "number", "boolean", "null"]}


# ------------------------------------------------------------------------------------------
# value checks (ValueError messages become the loader's error text)


def _scalar_name(v: Any) -> str:
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    return type(v).__name__


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def _check_name(v: str) -> str:
    if not _NAME_RE.match(v):
        raise ValueError(f"invalid gadget instance name {v!r}: use 1 to 32 of a-z, 0-9, - and _")
    return v


def _check_id(v: str) -> str:
    if not _ID_RE.match(v):
        raise ValueError(f"invalid gadget instance id {v!r}: 32 lowercase hex digits")
    return v


def _check_tag(t: str) -> str:
    if not t:
        raise ValueError("empty tag")
    if "," in t:
        raise ValueError(f"tag {t!r} contains ',' (tags are shown comma-joined)")
    if t.startswith(RESERVED_TAG_PREFIX):
        raise ValueError(f"tag {t!r}: tags starting with {RESERVED_TAG_PREFIX!r} are "
                         "reserved for apply's bookkeeping")
    return t


def _duration(v: Any) -> Any:
    """``30s``/``1m30s`` or a number of seconds -> seconds (other types fail later)."""
    if isinstance(v, str):
        try:
            return parse_duration(v)
        except ValueError as e:
            raise ValueError(str(e)) from None
    if isinstance(v, bool):
        raise ValueError("expected a duration such as 30s, or seconds")
    return v


def _non_negative(v: float) -> float:
    if v < 0 or v != v or v == float("inf"):
        raise ValueError(f"must be a finite number >= 0, got {v}")
    return v


def _check_sink_value(v: Any) -> Any:
    if _is_scalar(v):
        return v
    if isinstance(v, list) and all(_is_scalar(x) for x in v):
        return v
    raise ValueError(f"expected a scalar or a list of scalars, got {_scalar_name(v)}")


def _check_param_value(v: Any) -> Any:
    # Shallow: the loader flattens nested mappings and checks their leaves with exact paths.
    if _is_scalar(v) or isinstance(v, list | dict):
        return v
    raise ValueError(f"unexpected {_scalar_name(v)}")


def _check_scalar(v: Any) -> Any:
    if _is_scalar(v):
        return v
    raise ValueError(f"expected a scalar (it becomes a string), got {_scalar_name(v)}")


def _join_list(sep: str) -> Any:
    def join(v: Any) -> Any:
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return sep.join(v)
        return v

    return join


def _group_text(v: Any) -> Any:
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


def _check_listen(text: str) -> str:
    try:
        Address.parse(text)
    except ListenError as e:
        raise ValueError(str(e)) from None
    return text


def _check_metrics_listen(v: str | None) -> str | None:
    if v is None or v == "off":
        return None
    try:
        port = parse_host_port(v)[1]
    except ValueError:
        port = 0
    if not port:
        raise ValueError(f"{v!r} is not HOST:PORT (or off)")
    return v


def _check_node_address(address: str) -> str:
    try:
        Address.parse_peer(address)
    except ListenError as e:
        raise ValueError(str(e)) from None
    return address


def _check_otlp_endpoint(endpoint: str) -> str:
    otlp_grpc_url(endpoint)
    return endpoint


def _check_node_names(v: dict[str, Any]) -> dict[str, Any]:
    if "" in v:
        raise ValueError("empty node name")
    return v


# ------------------------------------------------------------------------------------------
# reusable field types

Name = Annotated[str, AfterValidator(_check_name),
                 WithJsonSchema({"type": "string", "pattern": NAME_PATTERN})]
InstanceId = Annotated[str, AfterValidator(_check_id),
                       WithJsonSchema({"type": "string", "pattern": ID_PATTERN})]
Tags = list[Annotated[str, AfterValidator(_check_tag)]]
ListenAddress = Annotated[str, AfterValidator(_check_listen)]
NodeAddress = Annotated[str, AfterValidator(_check_node_address)]
Duration = Annotated[float, BeforeValidator(_duration, json_schema_input_type=str | float),
                     AfterValidator(_non_negative)]
SinkValue = Annotated[Any, AfterValidator(_check_sink_value),
                      WithJsonSchema({"anyOf": [_SCALAR_SCHEMA,
                                                {"type": "array", "items": _SCALAR_SCHEMA}]})]
SinkSettings = dict[str, SinkValue]
_SINK_VALUE_SCHEMA: dict[str, Any] = {"anyOf": [_SCALAR_SCHEMA,
                                                {"type": "array", "items": _SCALAR_SCHEMA}]}
ParamValue = Annotated[Any, AfterValidator(_check_param_value),
                       WithJsonSchema({"anyOf": [_SCALAR_SCHEMA,
                                                 {"type": "array", "items": _SCALAR_SCHEMA},
                                                 {"type": "object"}]})]
ScalarValue = Annotated[Any, AfterValidator(_check_scalar), WithJsonSchema(_SCALAR_SCHEMA)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True,
                              validate_by_alias=True, validate_by_name=False,
                              serialize_by_alias=True, use_attribute_docstrings=True,
                              field_title_generator=lambda name, info: info.alias or name)


# ------------------------------------------------------------------------------------------
# gadgetpipe config documents


class TLSSection(_Model):
    """Mutual TLS of the gRPC server (applies to its tcp:// listen addresses)."""

    cert: str
    """PEM file with the server certificate (chain)."""
    key: str
    """PEM file with the server's private key."""
    client_ca: str | None = Field(None, alias="clientCA")
    """PEM file with the CA that signs client certificates; set: clients must present one."""


class OtelLogsSection(_Model):
    """The daemon's own log, also sent to an OpenTelemetry Collector (OTLP/gRPC)."""

    endpoint: Annotated[str, AfterValidator(_check_otlp_endpoint)]
    """``host:port`` or ``http://host:port`` (plaintext), ``https://host:port`` (TLS)."""
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Least severe level sent (records ``serve --log-level`` drops are not sent either)."""


class PeerTLSSection(_Model):
    """TLS towards peer daemons on TCP: the CA their server certificates chain to and, for
    peers that require client certificates (``tls.clientCA``), this daemon's own."""

    ca: str | None = None
    """PEM file with the CA of the peers' server certificates; none: the system's CAs."""
    cert: str | None = None
    """PEM file with this daemon's client certificate (chain), for mutual TLS."""
    key: str | None = None
    """PEM file with the client certificate's private key (with ``cert``)."""
    server_name: str | None = Field(None, alias="serverName")
    """The name the peers' certificates must carry; none: the host of the node's address."""

    @model_validator(mode="after")
    def _cert_and_key(self) -> PeerTLSSection:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together")
        return self


class NodeSection(_Model):
    """A peer daemon with its own TLS settings."""

    address: NodeAddress
    """``host:port``, ``tcp://host:port`` or ``unix:///path``."""
    tls: PeerTLSSection | None = None
    """TLS towards this peer (TCP only); none: the daemon's ``nodeTLS``."""


def _node_address(v: Any) -> Any:
    """A bare address is the node's ``address`` (the short form of a node)."""
    return {"address": v} if isinstance(v, str) else v


Node = Annotated[NodeSection, BeforeValidator(_node_address,
                                              json_schema_input_type=str | NodeSection)]


class DaemonSection(_Model):
    """How the daemon runs. Read by ``serve --config`` only; CLI flags given to ``serve``
    override it; a change takes effect at the next start (SIGHUP reloads instances only)."""

    listen: list[ListenAddress] = Field(default_factory=lambda: [DEFAULT_LISTEN], min_length=1)
    """gRPC listen addresses: ``unix:///path`` or ``tcp://host:port``."""
    tls: TLSSection | None = None
    """Server TLS files; none: plaintext."""
    insecure: bool = False
    """Allow TCP without TLS: tcp:// listen addresses, and TCP peers in ``nodes``."""
    socket_group: Annotated[str | None, BeforeValidator(
        _group_text, json_schema_input_type=str | int | None)] = Field(None, alias="socketGroup")
    """Group (name or gid) owning the unix sockets (mode 0660); none: root only."""
    state_dir: str = Field(DEFAULT_STATE_DIR, alias="stateDir")
    """Where gadget instances are persisted (``<stateDir>/gadgets``)."""
    metrics_listen: Annotated[str | None, AfterValidator(_check_metrics_listen)] = Field(
        DEFAULT_METRICS_LISTEN, alias="metricsListen")
    """HOST:PORT of the Prometheus /metrics endpoint; ``off`` or null: none."""
    events_buffer_length: int = Field(DEFAULT_EVENTS_BUFFER, alias="eventsBufferLength",
                                      ge=1, le=1 << 24)
    """Records a direct run's stream may queue before dropping (not instances)."""
    node: str | None = None
    """This daemon's node name; default: the host name."""
    nodes: Annotated[dict[str, Node], AfterValidator(_check_node_names)] = Field(
        default_factory=dict)
    """Peer daemons by node name (``node-b: 10.0.0.2:8080``, or ``{address, tls}``), for
    multi-node instances."""
    node_tls: PeerTLSSection | None = Field(None, alias="nodeTLS")
    """TLS towards TCP peers without their own; a TCP peer without any needs ``insecure``."""
    otel_logs: OtelLogsSection | None = Field(None, alias="otelLogs")
    """Send the daemon's own log to an OpenTelemetry Collector too; none: stderr only."""
    containerd_socket: str | None = Field(None, alias="containerdSocket")
    """containerd's API socket the container collection watches; ``""``: no container runtime;
    none: ``/run/containerd/containerd.sock``."""
    containerd_namespace: str | None = Field(None, alias="containerdNamespace", min_length=1)
    """containerd namespace of the containers; none: ``k8s.io`` (Kubernetes' CRI)."""
    compile_queue: int | None = Field(None, alias="compileQueue", ge=1)
    """Runs of clients that may wait for their turn to compile, in all; none: 128."""
    compile_queue_per_client: int | None = Field(None, alias="compileQueuePerClient", ge=1)
    """Of those, runs of one client (a process on the unix socket, a host over TCP); none: 32."""
    sinks: dict[str, SinkSettings] = Field(default_factory=dict)
    """Daemon-wide sink defaults by sink type, keys as the sink's setting names
    (``brokers``, ``endpoint``); see ``$defs/sink-<type>``."""


class InstanceSection(_Model):
    """One gadget instance; becomes one ``CreateGadgetInstanceRequest``."""

    name: Name
    """Instance name, unique; apply matches declared and running instances by it."""
    gadget: Annotated[str, Field(min_length=1)]
    """Gadget short name (``trace_exec``) or image (``ghcr.io/inspektor-gadget/gadget/x:tag``)."""
    id: InstanceId | None = None
    """Fixed instance id (32 hex); default: the daemon picks one."""
    tags: Tags = Field(default_factory=list)
    """Free labels (no ``,``; ``gadgetpipe.*`` is reserved)."""
    nodes: list[str] = Field(default_factory=list)
    """Nodes (names of the daemon's ``nodes``, or its own) to run on; empty: this daemon."""
    params: dict[str, ParamValue] = Field(default_factory=dict)
    """Gadget params (``gadgetConfig.paramValues``): flat prefixed keys or nested mappings
    (joined with ``.``); values are written as strings, lists are joined with ``,``."""
    timeout: Duration = 0.0
    """Stop the instance after this long (``30s``, ``1h``, or seconds); 0: never."""
    event_buffer_length: int = Field(0, alias="eventBufferLength", ge=0, le=MAX_EVENT_BUFFER)
    """Payload packets kept for clients that attach later; 0: the default (1024)."""
    filter: str | None = None
    """Record filter (``operator.filter.filter``), e.g. ``proc.comm==bash``."""
    fields: Annotated[str | None, BeforeValidator(
        _join_list(","), json_schema_input_type=str | list[str] | None)] = None
    """Fields to emit (``operator.fields.fields-select``): ``a,b`` or a list."""
    sinks: dict[str, SinkSettings | None] = Field(default_factory=dict)
    """Sinks to enable, by sink type, with their settings (``kafka: {topic: t}`` ->
    ``operator.kafka.kafka-enable=true``, ``operator.kafka.kafka-topic=t``); lists are joined
    with ``,``."""
    metrics: SinkSettings | None = None
    """Prometheus metrics of this instance: the settings of the sink type whose section is
    ``metrics`` (``prometheus``); ``counters`` and ``histograms`` may be lists (joined with
    ``;``)."""


class ConfigDocument(_Model):
    """A gadgetpipe config document. Every key is optional; an empty file is valid. Top-level
    keys starting with ``x-`` are ignored (a place for YAML anchors)."""

    model_config = ConfigDict(json_schema_extra={"patternProperties": {"^x-": {}}})

    daemon: DaemonSection | None = None
    """Daemon settings (``serve --config`` only)."""
    instances: list[InstanceSection] = Field(default_factory=list)
    """Declared gadget instances."""


# ------------------------------------------------------------------------------------------
# upstream instance manifests (pkg/gadget-manifest/instance-spec.go, docs/reference/manifests)


class InstanceSpecManifest(_Model):
    """Upstream's instance manifest. Upstream requires only apiVersion, kind and image;
    gadgetpipe also requires ``name``, since declared instances are matched by name."""

    api_version: Literal[1] = Field(alias="apiVersion")
    """Must be 1."""
    kind: Literal["instance-spec"]
    """Must be ``instance-spec``."""
    image: Annotated[str, Field(min_length=1)]
    """Gadget image or short name."""
    id: InstanceId | None = None
    """Fixed instance id (32 hex)."""
    name: Name
    """Instance name (required by gadgetpipe, optional upstream)."""
    tags: Tags = Field(default_factory=list)
    """Tags."""
    nodes: list[str] = Field(default_factory=list)
    """Nodes to run on."""
    param_values: dict[str, ScalarValue] = Field(default_factory=dict, alias="paramValues")
    """Flat prefixed params; values are used as written."""


# ------------------------------------------------------------------------------------------
# JSON Schema


def json_schema(sinks: Mapping[str, SinkType] | None = None) -> dict[str, Any]:
    """The JSON Schema of one YAML document (either kind), with ``$defs`` for the models.

    Args:
        sinks: the sink types whose settings the ``sinks:`` sections (and a sink's own
            section, ``metrics:``) may hold; default: every registered sink type. Each becomes
            ``$defs/sink-<name>``, its settings described as the sink type declares them.
    """
    if sinks is None:
        from pipeline.sinks.registry import discover_sink_types

        sinks = {name: cls() for name, cls in discover_sink_types().items()}
    adapter: TypeAdapter[Any] = TypeAdapter(ConfigDocument | InstanceSpecManifest)
    schema = adapter.json_schema(by_alias=True, mode="validation",
                                 ref_template="#/$defs/{model}")
    defs = schema["$defs"]
    defs["sink-value"] = _SINK_VALUE_SCHEMA
    for name, t in sorted(sinks.items()):
        defs[f"sink-{name}"] = _sink_schema(t)
    by_name = {name: {"$ref": f"#/$defs/sink-{name}"} for name in sorted(sinks)}
    daemon = defs["DaemonSection"]["properties"]["sinks"]
    daemon.pop("additionalProperties", None)
    daemon.update(properties=by_name, additionalProperties=False)
    inst = defs["InstanceSection"]["properties"]
    inst["sinks"].pop("additionalProperties", None)
    inst["sinks"].update(properties={n: {"anyOf": [ref, {"type": "null"}]}
                                     for n, ref in by_name.items()},
                         additionalProperties=False)
    for name, t in sinks.items():
        section = inst.get(t.section) if t.section else None
        if section is not None:
            section["anyOf"] = [by_name[name], {"type": "null"}]
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "gadgetpipe config",
        "description": "One document of a gadgetpipe config file: a gadgetpipe config "
                       "(daemon settings and instances) or an upstream Inspektor Gadget "
                       "instance manifest (apiVersion: 1, kind: instance-spec).",
        **schema,
    }
    return schema


def _sink_schema(t: SinkType) -> dict[str, Any]:
    """The settings of one sink type, named as YAML names them (the param key is accepted
    too)."""
    props: dict[str, Any] = {}
    for setting, p in t.settings().items():
        prop: dict[str, Any] = {"$ref": "#/$defs/sink-value", "description": p.description
                                + (f" (param {p.full_key}; {p.type_hint})"
                                   if p.type_hint != "string" else f" (param {p.full_key})")}
        if p.default and not p.secret:
            prop["default"] = p.default
        if p.possible_values:
            prop["enum"] = list(p.possible_values)
            prop.pop("$ref")
        props[setting] = prop
    return {
        "type": "object",
        "title": f"{t.name} sink",
        "description": f"Settings of the {t.name} sink; a setting s is the param "
                       f"{t.prefix}{t.name}-s, which is also accepted as the key.",
        "properties": props,
        "patternProperties": {f"^{t.name}-": {}},
        "additionalProperties": False,
    }


def schema_text(sinks: Mapping[str, SinkType] | None = None) -> str:
    """What ``config/schema.json`` holds."""
    return json.dumps(json_schema(sinks), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
