"""The OTLP/gRPC transport of the ``otel-logs`` sink (pipeline/sinks/otlp_logs.py), apart so
that grpcio is imported only by a daemon that has such a sink."""

from __future__ import annotations

import contextlib
from typing import Any
from urllib.parse import urlparse

import grpc
import grpc.aio
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse

from pipeline.sinks.base import SinkError

EXPORT_METHOD = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"
RETRYABLE_GRPC = frozenset({
    grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})


def _retry_info(e: grpc.aio.AioRpcError) -> float | None:
    """The server's RetryInfo delay from the status details, if it sent one."""
    for key, value in e.trailing_metadata() or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        with contextlib.suppress(Exception):
            status = status_pb2.Status.FromString(value)
            for d in status.details:
                if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    d.Unpack(info)
                    return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None


class GrpcTransport:
    def __init__(self, endpoint: str, headers: dict[str, str], timeout: float,
                 gzip_: bool) -> None:
        u = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        self.target = u.netloc or u.path
        self._secure = u.scheme == "https"
        self._metadata = tuple(headers.items())
        self._timeout = timeout
        self._compression = grpc.Compression.Gzip if gzip_ else grpc.Compression.NoCompression
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None

    async def start(self) -> None:
        # Reconnect fast after a peer restart instead of grpc's default backoff of up to 2 min;
        # the runner owns the backoff.
        opts = [("grpc.max_reconnect_backoff_ms", 1000), ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100)]
        self._channel = (grpc.aio.secure_channel(self.target, grpc.ssl_channel_credentials(),
                                                 options=opts)
                         if self._secure else grpc.aio.insecure_channel(self.target, options=opts))
        self._call = self._channel.unary_unary(
            EXPORT_METHOD, request_serializer=None,
            response_deserializer=ExportLogsServiceResponse.FromString)

    async def send(self, request: bytes) -> tuple[int, str]:
        if self._call is None:
            raise SinkError("OTLP gRPC transport used before start()", retryable=False)
        try:
            resp: ExportLogsServiceResponse = await self._call(
                request, timeout=self._timeout, metadata=self._metadata,
                compression=self._compression, wait_for_ready=False)
        except grpc.aio.AioRpcError as e:
            code = e.code()
            raise SinkError(f"OTLP gRPC export to {self.target}: {code.name} {e.details()}",
                            retryable=code in RETRYABLE_GRPC, retry_after=_retry_info(e)) from e
        return (int(resp.partial_success.rejected_log_records),
                resp.partial_success.error_message)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
