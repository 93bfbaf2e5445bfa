"""A real OpenTelemetry Collector writing everything it receives to JSON files."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

from tests.peers import PeerProcess, peer_paths, require_executable
from tests.peers.ports import free_ports

__all__ = [
    "KafkaReceiverConfig",
    "LogRecord",
    "OtelCollector",
    "flatten_any_value",
    "parse_export_requests",
    "parse_log_records",
]

Signal = Literal["logs", "metrics", "traces"]
READY_LINE = "Everything is ready. Begin running and processing data."


class LogRecord(TypedDict):
    """One log record as the Collector received it, OTLP/JSON values turned into Python ones.

    Fields absent in OTLP/JSON (proto3 defaults) come back as 0 / "" / None.
    """

    body: Any
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope_name: str
    scope_version: str
    time_unix_nano: int
    observed_time_unix_nano: int
    severity_number: int
    severity_text: str
    event_name: str
    trace_id: str
    span_id: str


@dataclass(frozen=True)
class KafkaReceiverConfig:
    """The Collector's kafka receiver, feeding the logs pipeline.

    ``encoding="otlp_proto"``: each Kafka message is one serialized ExportLogsServiceRequest.
    """

    brokers: Sequence[str]
    topic: str
    encoding: str = "otlp_proto"
    group_id: str = "otelcol-gp"
    initial_offset: Literal["earliest", "latest"] = "earliest"


def flatten_any_value(value: dict[str, Any]) -> Any:
    """An OTLP/JSON AnyValue as a Python value (int64 arrives as a JSON string)."""
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        return int(value["intValue"])
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])  # also "NaN" / "Infinity", which protojson quotes
    if "arrayValue" in value:
        return [flatten_any_value(v) for v in value["arrayValue"].get("values", [])]
    if "kvlistValue" in value:
        return flatten_attributes(value["kvlistValue"].get("values", []))
    if "bytesValue" in value:
        return base64.b64decode(value["bytesValue"])
    return None  # an empty AnyValue


def flatten_attributes(kvs: list[dict[str, Any]]) -> dict[str, Any]:
    return {kv["key"]: flatten_any_value(kv.get("value", {})) for kv in kvs}


def _iter_json_objects(text: str) -> Iterator[dict[str, Any]]:
    # The file exporter writes one object per line, but a SIGKILLed collector can leave a
    # truncated object that the next incarnation (append: true) continues on the same line.
    # Decode object by object; on garbage, resync at the next '{"resource' on that line.
    decoder = json.JSONDecoder()
    for line in text.splitlines():
        pos = 0
        while True:
            pos = line.find("{", pos)
            if pos < 0:
                break
            try:
                obj, end = decoder.raw_decode(line, pos)
            except json.JSONDecodeError:
                nxt = line.find('{"resource', pos + 1)
                if nxt < 0:
                    break
                pos = nxt
                continue
            if isinstance(obj, dict):
                yield obj
            pos = end


def parse_export_requests(text: str) -> list[dict[str, Any]]:
    """The OTLP/JSON export requests in a file exporter's output, skipping torn ones."""
    return list(_iter_json_objects(text))


def parse_log_records(text: str) -> list[LogRecord]:
    """Every log record in a file exporter's (logs) output, flattened, in file order."""
    out: list[LogRecord] = []
    for request in _iter_json_objects(text):
        for rl in request.get("resourceLogs", []):
            resource = flatten_attributes(rl.get("resource", {}).get("attributes", []))
            for sl in rl.get("scopeLogs", []):
                scope = sl.get("scope", {})
                for rec in sl.get("logRecords", []):
                    out.append(LogRecord(
                        body=flatten_any_value(rec.get("body", {})),
                        attributes=flatten_attributes(rec.get("attributes", [])),
                        resource=resource,
                        scope_name=scope.get("name", ""),
                        scope_version=scope.get("version", ""),
                        time_unix_nano=int(rec.get("timeUnixNano", 0)),
                        observed_time_unix_nano=int(rec.get("observedTimeUnixNano", 0)),
                        severity_number=int(rec.get("severityNumber", 0)),
                        severity_text=rec.get("severityText", ""),
                        event_name=rec.get("eventName", ""),
                        trace_id=rec.get("traceId", ""),
                        span_id=rec.get("spanId", ""),
                    ))
    return out


class OtelCollector(PeerProcess):
    """The Collector built by ``scripts/setup peers``, with OTLP gRPC and HTTP receivers on two
    fresh loopback ports and each signal written to its own OTLP/JSON file.

    Args:
        kafka: also feed the logs pipeline from a Kafka topic.
        otlp: keep the OTLP receivers (False: Kafka only; the ports are still reserved).
        binary: override the collector binary found by :func:`peer_paths`.

    Endpoints (known from construction on): ``grpc_endpoint`` is "127.0.0.1:PORT" (the OTel
    gRPC exporter wants "http://" + it for plaintext), ``http_endpoint`` the base URL
    "http://127.0.0.1:PORT", ``http_logs_endpoint`` the full logs URL. Output files are
    appended to, so what arrived before a ``kill()``/``restart()`` stays in ``records()``.
    """

    kind = "otelcol"

    def __init__(self, *, kafka: KafkaReceiverConfig | None = None, otlp: bool = True,
                 binary: str | Path | None = None, start_timeout: float = 30.0,
                 stop_timeout: float = 15.0) -> None:
        super().__init__(start_timeout=start_timeout, stop_timeout=stop_timeout)
        if not otlp and kafka is None:
            raise ValueError("a collector needs at least one receiver (otlp or kafka)")
        self._binary = str(binary or peer_paths().otelcol)
        self.kafka = kafka
        self.otlp = otlp
        self.grpc_port, self.http_port = free_ports(2)
        self.config_path = self.workdir / "collector.json"
        self.output_paths: dict[Signal, Path] = {
            s: self.workdir / "out" / f"{s}.json" for s in ("logs", "metrics", "traces")}

    @property
    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def http_logs_endpoint(self) -> str:
        return f"{self.http_endpoint}/v1/logs"

    def config(self) -> dict[str, Any]:
        receivers: dict[str, Any] = {}
        if self.otlp:
            receivers["otlp"] = {"protocols": {
                "grpc": {"endpoint": self.grpc_endpoint},
                "http": {"endpoint": f"127.0.0.1:{self.http_port}"},
            }}
        if self.kafka is not None:
            receivers["kafka"] = {
                "brokers": list(self.kafka.brokers),
                "group_id": self.kafka.group_id,
                "initial_offset": self.kafka.initial_offset,
                # `logs.topics` is a list; a `topic:` key is refused in v0.165.
                "logs": {"topics": [self.kafka.topic], "encoding": self.kafka.encoding},
            }
        exporters = {
            f"file/{signal}": {
                "path": str(path),
                "format": "json",
                "flush_interval": "100ms",  # default 1 s: every assertion would wait for it
                "append": True,  # the default truncates the file on every (re)start
            } for signal, path in self.output_paths.items()}
        otlp = ["otlp"] if self.otlp else []
        pipelines = {
            signal: {"receivers": otlp, "exporters": [f"file/{signal}"]}
            for signal in ("metrics", "traces")} if self.otlp else {}
        pipelines["logs"] = {
            "receivers": [*otlp, *(["kafka"] if self.kafka is not None else [])],
            "exporters": ["file/logs"],
        }
        return {
            "receivers": receivers,
            "exporters": exporters,
            # Internal metrics would bind 127.0.0.1:8888 in every collector, and clash.
            "service": {"telemetry": {"metrics": {"level": "none"}}, "pipelines": pipelines},
        }

    def _prepare(self) -> None:
        self._binary = require_executable(self._binary, "the OpenTelemetry Collector")
        (self.workdir / "out").mkdir()
        # JSON is YAML, and needs no YAML library to write.
        self.config_path.write_text(json.dumps(self.config(), indent=2))

    def _command(self) -> Sequence[str]:
        return [self._binary, "--config", f"file:{self.config_path}"]

    def _ready(self) -> bool:
        return READY_LINE in self.log_since_launch()

    # --- what arrived ---------------------------------------------------------------------

    def raw(self, signal: Signal = "logs") -> list[dict[str, Any]]:
        """The OTLP/JSON export requests received for ``signal``, as written by the Collector."""
        try:
            return parse_export_requests(self.output_paths[signal].read_text())
        except FileNotFoundError:
            return []

    def records(self) -> list[LogRecord]:
        """Every log record received so far (all incarnations), flattened, in arrival order."""
        try:
            return parse_log_records(self.output_paths["logs"].read_text())
        except FileNotFoundError:
            return []

    def wait_for(self, predicate: Callable[[list[LogRecord]], bool],
                 timeout: float = 15.0) -> list[LogRecord]:
        """Polls ``records()`` until ``predicate`` holds; returns them, or TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.records()
            if predicate(records):
                return records
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"collector: condition not met within {timeout} s; {len(records)} records "
                    f"received\n--- last lines of {self.log_path.name} ---\n{self.log_tail(30)}")
            if not self.running:  # nothing more can arrive: fail now, not at the timeout
                raise RuntimeError(f"collector is not running; {len(records)} records received"
                                   f"\n--- last lines of its log ---\n{self.log_tail(30)}")
            time.sleep(0.1)
