"""The daemon's own log to an OpenTelemetry Collector, through the OpenTelemetry SDK (opt-in:
``daemon.otelLogs`` in the config, ``serve --otel-logs-endpoint``).

The daemon logs a few lines a second at most (starts and stops, runs and instances coming
and going, warnings its runs send their clients), which is where the SDK's one object per
record costs nothing that matters; gadget records go through the otel-logs sink's own encoder
(pipeline/sinks/encode.py), which writes the same bytes per batch (tests/unit/test_otlp_sdk.py).

A :mod:`logging` handler on the root logger turns each record at or above the configured level
into an SDK log record: body the message, severity from the level, the Python logger as the
instrumentation scope, ``code.*`` attributes, ``exception.*`` ones when an exception is logged.
The SDK's batch processor queues them (bounded: a Collector that is down costs records, never
memory or the event loop) and exports over OTLP/gRPC from its own thread. The SDK's and
grpc's own log lines are not exported: a failing export would otherwise log about itself to the
Collector it cannot reach.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from dataclasses import dataclass

from opentelemetry._logs import Logger, SeverityNumber
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import Resource

from config.addresses import otlp_grpc_url
from pipeline.version import VERSION

__all__ = ["DaemonLogExport", "OtelLogsSettings"]

LEVELS = ("debug", "info", "warning", "error")
EXPORT_TIMEOUT = 5.0
"""Seconds one export may take; also what stopping waits, at most, for the last records."""
_NOT_EXPORTED = ("opentelemetry", "grpc")
_SEVERITY = {logging.DEBUG: SeverityNumber.DEBUG, logging.INFO: SeverityNumber.INFO,
             logging.WARNING: SeverityNumber.WARN, logging.ERROR: SeverityNumber.ERROR,
             logging.CRITICAL: SeverityNumber.FATAL}


@dataclass(frozen=True)
class OtelLogsSettings:
    """Where the daemon's own log goes.

    Args:
        endpoint: the Collector's OTLP/gRPC endpoint: ``host:port`` or ``http://host:port``
            (plaintext), ``https://host:port`` (TLS, system CAs).
        level: the least severe Python level exported (``debug``, ``info``, ``warning``,
            ``error``); what ``serve --log-level`` keeps out of the daemon's log is not
            exported either.
    """

    endpoint: str
    level: str = "info"

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"otel logs level {self.level!r}: one of {', '.join(LEVELS)}")
        otlp_grpc_url(self.endpoint)


def _severity(levelno: int) -> SeverityNumber:
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _SEVERITY[level]
    return SeverityNumber.DEBUG


class _Handler(logging.Handler):
    """Python log records to SDK log records (one SDK logger per Python logger, cached)."""

    def __init__(self, provider: LoggerProvider, level: int) -> None:
        super().__init__(level)
        self._provider = provider
        self._loggers: dict[str, Logger] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(_NOT_EXPORTED) and super().filter(record)

    def _logger(self, name: str) -> Logger:
        logger = self._loggers.get(name)
        if logger is None:
            logger = self._loggers[name] = self._provider.get_logger(name, VERSION)
        return logger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            attributes: dict[str, str | int] = {
                "code.file.path": record.pathname, "code.function.name": record.funcName,
                "code.line.number": record.lineno}
            if record.exc_info and record.exc_info[0] is not None:
                kind, value, tb = record.exc_info
                attributes["exception.type"] = kind.__name__
                attributes["exception.message"] = str(value)
                attributes["exception.stacktrace"] = "".join(
                    traceback.format_exception(kind, value, tb))
            self._logger(record.name).emit(
                timestamp=int(record.created * 1e9), severity_number=_severity(record.levelno),
                severity_text=record.levelname, body=record.getMessage(), attributes=attributes)
        except Exception:  # logging must never raise into the code that logs
            self.handleError(record)


class DaemonLogExport:
    """Exports the daemon's Python log while started.

    Args:
        settings: the endpoint and level.
        node: this daemon's node name (the resource's ``host.name``).
    """

    def __init__(self, settings: OtelLogsSettings, node: str) -> None:
        self.settings = settings
        self._node = node
        self._provider: LoggerProvider | None = None
        self._handler: _Handler | None = None

    def start(self) -> None:
        """Attaches to the root logger; records flow from here on."""
        # Imported here: the exporter pulls in grpcio (~6 MB), which a daemon that exports
        # nothing does not need.
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter

        endpoint = otlp_grpc_url(self.settings.endpoint)
        exporter = OTLPLogExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"),
                                   timeout=EXPORT_TIMEOUT)
        resource = Resource({"service.name": "gadgetpipe", "service.version": VERSION,
                             "host.name": self._node})
        self._provider = LoggerProvider(resource=resource, shutdown_on_exit=False)
        self._provider.add_log_record_processor(BatchLogRecordProcessor(
            exporter, schedule_delay_millis=200, export_timeout_millis=EXPORT_TIMEOUT * 1000))
        level = logging.getLevelNamesMapping()[self.settings.level.upper()]
        self._handler = _Handler(self._provider, level)
        logging.getLogger().addHandler(self._handler)

    async def stop(self) -> None:
        """Detaches, then exports what is queued (up to :data:`EXPORT_TIMEOUT`)."""
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler = None
        if self._provider is not None:
            provider, self._provider = self._provider, None
            await asyncio.to_thread(provider.shutdown)
