"""The ``otel-logs`` sink: one OTLP log record per event, over gRPC or HTTP/protobuf.

Each batch becomes one ``ExportLogsServiceRequest`` (split only where a request would pass
``max-request-bytes``), built as bytes by :class:`pipeline.sinks.encode.OtlpLogEncoder`: the
bytes the OpenTelemetry SDK's exporter writes for the same records
(tests/unit/test_otlp_sdk.py), at a fraction of the cost of the SDK's per-record
``Logger.emit`` path (~49 µs per event on the 2-core test machine), which therefore serves
only the daemon's own logs (api/otel_logs.py).

The transport follows the OTLP retry rules: retryable gRPC codes (CANCELLED,
DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, OUT_OF_RANGE, UNAVAILABLE, DATA_LOSS) and
HTTP statuses (429, 502, 503, 504, connection errors) raise a retryable SinkError carrying
the server's RetryInfo / Retry-After; everything else is permanent. The runner backs off
(exponential, jitter) and drops after ``retry-timeout``; every outcome lands in the ledger. A
partial success (``rejected_log_records``) is counted as rejected, the rest as delivered.

When one batch needs several requests and one fails, the retry resumes at the failed request,
so requests already accepted are not sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import socket
import time
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import urlparse

from google.rpc import status_pb2  # type: ignore[import-untyped]
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse

from pipeline.batch import Batch
from pipeline.params import ParamSpec
from pipeline.schema import DataSourceSchema
from pipeline.sinks.base import (
    SinkContext,
    SinkError,
    SinkTypeBase,
    has_field,
    register_sink,
)
from pipeline.sinks.container_resource import container_requests
from pipeline.sinks.encode import (
    OtlpLogEncoder,
    PerSchema,
    otlp_scope,
)
from pipeline.sinks.endpoints import Endpoint
from pipeline.version import VERSION

__all__ = ["OtelLogsSink", "OtelLogsSinkType", "resource_attributes"]

_logger = logging.getLogger(__name__)

HTTP_PATH = "/v1/logs"
RETRYABLE_HTTP = frozenset({429, 502, 503, 504})
DEFAULT_MAX_REQUEST = 4 << 20
"""The Collector's OTLP gRPC receiver refuses messages over 4 MiB by default."""


def resource_attributes(ctx: SinkContext) -> dict[str, Any]:
    return {
        "service.name": "gadgetpipe",
        "service.version": VERSION,
        "host.name": ctx.node,
        "gadget.name": ctx.gadget,
        "gadget.instance.id": ctx.id,
        "gadget.instance.name": ctx.instance_name,
    }


def _parse_headers(text: str) -> dict[str, str]:
    out = {}
    for i, part in enumerate(p for p in text.split(",") if p.strip()):
        k, sep, v = part.partition("=")
        if not sep:
            # Not quoted: the text is often a credential (see ParamSpec.secret).
            raise ValueError(f"header {i + 1} is not key=value")
        out[k.strip().lower()] = v.strip()
    return out


class Transport(Protocol):
    """Sends one serialized ``ExportLogsServiceRequest``; returns (rejected, message)."""

    async def start(self) -> None: ...

    async def send(self, request: bytes) -> tuple[int, str]: ...

    async def close(self) -> None: ...


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    from email.utils import parsedate_to_datetime
    with contextlib.suppress(TypeError, ValueError):
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    return None


def _rejected(body: bytes) -> tuple[int, str]:
    if not body:
        return 0, ""
    try:
        resp = ExportLogsServiceResponse.FromString(body)
    except Exception:  # a proxy's HTML answer with a 200: nothing to count
        return 0, ""
    return int(resp.partial_success.rejected_log_records), resp.partial_success.error_message


class _HttpTransport:
    def __init__(self, endpoint: str, headers: dict[str, str], timeout: float,
                 gzip_: bool) -> None:
        url = endpoint if "://" in endpoint else f"http://{endpoint}"
        u = urlparse(url)
        if u.path in ("", "/"):
            url = url.rstrip("/") + HTTP_PATH
        self.url = url
        self._headers = {"content-type": "application/x-protobuf", **headers}
        if gzip_:
            self._headers["content-encoding"] = "gzip"
        self._gzip = gzip_
        self._timeout = timeout
        self._pool: Any = None

    async def start(self) -> None:
        import urllib3

        self._pool = urllib3.PoolManager(retries=urllib3.Retry(0, redirect=False),
                                         num_pools=1, maxsize=1)

    def _post(self, body: bytes) -> tuple[int, str, bytes, str | None]:
        import urllib3

        try:
            r = self._pool.request("POST", self.url, body=body, headers=self._headers,
                                   timeout=urllib3.Timeout(total=self._timeout),
                                   preload_content=True)
        except urllib3.exceptions.HTTPError as e:
            raise SinkError(f"OTLP HTTP export to {self.url}: {e}", retryable=True) from e
        return r.status, r.reason or "", r.data or b"", r.headers.get("retry-after")

    async def send(self, request: bytes) -> tuple[int, str]:
        if self._pool is None:
            raise SinkError("OTLP HTTP transport used before start()", retryable=False)
        body = gzip.compress(request, 6) if self._gzip else request
        status, reason, data, retry_after = await asyncio.to_thread(self._post, body)
        if 200 <= status < 300:
            return _rejected(data)
        detail = reason
        with contextlib.suppress(Exception):
            detail = status_pb2.Status.FromString(data).message or reason
        raise SinkError(f"OTLP HTTP export to {self.url}: {status} {detail}",
                        retryable=status in RETRYABLE_HTTP, retry_after=_retry_after(retry_after))

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.clear()
            self._pool = None


class OtelLogsSink:
    """Exports a run's records as OTLP logs.

    Args:
        transport: gRPC or HTTP.
        resource: the attributes of every request's ``Resource``; each container's records
            add that container's (k8s.*, container.*: pipeline/sinks/container_resource.py).
        gadget: the gadget's name (scope name and default body).
        body_field: a field whose value becomes the body (default: the gadget's name).
        max_request: bytes one request may hold.
    """

    name = "otel-logs"

    def __init__(self, transport: Transport, resource: dict[str, Any],
                 gadget: str, body_field: str, max_request: int) -> None:
        self._transport = transport
        self._resource_attrs = resource
        self._gadget = gadget
        self._body_field = body_field
        self._max_request = max_request
        self._encoders = PerSchema(self._compile)
        # (batch, its requests, how many were accepted): a retry of the same batch resumes
        self._pending: tuple[Batch, list[tuple[bytes, int]], int, int] | None = None

    async def start(self) -> None:
        await self._transport.start()

    def _compile(self, schema: DataSourceSchema) -> tuple[OtlpLogEncoder, bytes]:
        body_field = self._body_field if _has(schema, self._body_field) else ""
        return (OtlpLogEncoder(schema, body=self._gadget, body_field=body_field),
                otlp_scope(self._gadget, VERSION, {"gadget.datasource": schema.name}))

    def _requests(self, encoder: OtlpLogEncoder, scope: bytes, batch: Batch,
                  observed_ns: int) -> list[tuple[bytes, int]]:
        records = encoder.encode(batch, observed_ns)
        return container_requests(self._resource_attrs, scope, batch, records,
                                  self._max_request)

    async def write(self, batch: Batch) -> int:
        if self._pending is not None and self._pending[0] is batch:
            _, requests, done, refused = self._pending
        else:
            encoder, scope = self._encoders.get(batch.schema)
            # Built in a worker thread (numpy passes mostly, which let the event loop run).
            requests = await asyncio.to_thread(self._requests, encoder, scope, batch,
                                               time.time_ns())
            done, refused = 0, 0
        while done < len(requests):
            self._pending = (batch, requests, done, refused)
            rejected, message = await self._transport.send(requests[done][0])
            if rejected:
                _logger.warning("OTLP endpoint rejected %d log records: %s", rejected, message)
            refused += rejected
            done += 1
        self._pending = None
        return refused

    async def flush(self, timeout: float) -> bool:
        return True

    async def stop(self, timeout: float) -> None:
        self._pending = None
        await self._transport.close()


@register_sink("otel-logs")
class OtelLogsSinkType(SinkTypeBase):
    description = "an OpenTelemetry Collector as OTLP logs"
    default_retry_timeout = "30s"
    default_max_batch = 2048

    def own_params(self) -> tuple[ParamSpec, ...]:
        return (
            self.param("endpoint", "OTLP endpoint: host:port or http(s)://host:port for gRPC; "
                       "for http the URL (/v1/logs is added when it has no path)",
                       "127.0.0.1:4317"),
            self.param("protocol", "OTLP transport", "grpc", possible=("grpc", "http")),
            self.param("compression", "Request compression", "none",
                       possible=("none", "gzip")),
            self.param("headers", "Extra request headers/metadata: k=v,k2=v2 (often a "
                       "credential: never shown)", advanced=True, secret=True),
            self.param("timeout", "Deadline of one export request", "10s", "duration"),
            self.param("body", "Field whose value is the log body (default: the data source's "
                       "logs.body annotation, else the gadget's name)"),
            self.param("max-request-bytes", "Split a batch into requests of at most this size",
                       str(DEFAULT_MAX_REQUEST), "uint32", advanced=True),
        )

    def check(self, values: Mapping[str, Any],
              schemas: tuple[DataSourceSchema, ...]) -> tuple[str, str] | None:
        own = self.own(values)
        try:
            _parse_headers(str(own.get("headers") or ""))
        except ValueError as e:
            return self.key("headers"), str(e)
        body = str(own.get("body") or "")
        if body and not has_field(schemas, body):
            return self.key("body"), f"no data source has a field {body!r}"
        return None

    def endpoints(self, values: Mapping[str, Any]) -> tuple[Endpoint, ...]:
        own = self.own(values)
        endpoint = str(own.get("endpoint") or "")
        protocol = str(own.get("protocol") or "grpc")
        return (Endpoint(self.key("endpoint"), f"{protocol} {endpoint}", (endpoint,),
                         4318 if protocol == "http" else 4317),)

    def build(self, values: Mapping[str, Any], context: SinkContext) -> OtelLogsSink:
        problem = self.check(values, context.schemas)
        if problem is not None:
            raise SinkError(f"{problem[0]}: {problem[1]}", retryable=False)
        own = self.own(values)
        headers = _parse_headers(str(own.get("headers") or ""))
        body = str(own.get("body") or "")
        endpoint = str(own.get("endpoint") or "127.0.0.1:4317")
        timeout = float(own.get("timeout") or 10.0)
        gz = own.get("compression") == "gzip"
        transport: Transport
        if own.get("protocol") == "http":
            transport = _HttpTransport(endpoint, headers, timeout, gz)
        else:
            # Imported only for a gRPC sink: grpcio is ~6 MB of a daemon that never uses it.
            from pipeline.sinks._otlp_grpc import GrpcTransport

            transport = GrpcTransport(endpoint, headers, timeout, gz)
        resource = {**resource_attributes(context),
                    "host.name": context.node or socket.gethostname()}
        return OtelLogsSink(transport, resource, context.gadget, body,
                            int(own.get("max-request-bytes") or DEFAULT_MAX_REQUEST))


def _has(schema: DataSourceSchema, name: str) -> bool:
    return bool(name) and has_field((schema,), name)
