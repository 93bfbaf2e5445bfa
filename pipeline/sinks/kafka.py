"""The ``kafka`` sink: records to a Kafka topic with aiokafka, one message per record.

Per batch the records are encoded at once (JSON objects, ``GadgetData`` protobufs as on the gRPC
wire, or one OTLP ``ExportLogsServiceRequest`` per message for a Collector's kafka receiver),
grouped by partition, appended to ``create_batch()`` builders and handed over with ``send_batch()``
— not ``send()`` per record, which costs ~7x more (measured on the 2-core test machine).

Delivery: the producer is idempotent with ``acks=all``. A write returns when every message of
the batch is acknowledged, or raises a retryable SinkError after ``timeout``. aiokafka's
idempotent producer never expires what it has taken: it keeps retrying until the broker is
back. So a retried write of the *same* batch waits for the messages already handed over
instead of sending them again (no duplicates), and the next batch is only handed over once the
previous one is acknowledged (order kept). Meanwhile new records wait in the sink's bounded
edge; past its capacity they are dropped by its overflow policy and counted. By default the
sink retries until the run stops (``retry-timeout=0``).

Messages carry headers ``gadget``, ``instance``, ``node``, ``datasource`` and
``content-type``; the key is a chosen field's value (``key``), the timestamp the record's own
time when the data source has one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pipeline.params import ParamSpec
from pipeline.schema import DataSourceSchema
from pipeline.sinks._kafka_topics import (
    COMPRESSIONS,
    CONTENT_TYPES,
    ENCODINGS,
    TOPIC_FIELDS,
    check_template,
    record_placeholders,
    record_topics,
    topic_name,
)
from pipeline.sinks.base import (
    SinkContext,
    SinkError,
    SinkTypeBase,
    has_field,
    register_sink,
)
from pipeline.sinks.endpoints import Endpoint

if TYPE_CHECKING:
    from pipeline.sinks._kafka_send import KafkaSink

__all__ = ["COMPRESSIONS", "CONTENT_TYPES", "ENCODINGS", "TOPIC_FIELDS", "KafkaSinkType",
           "check_template", "record_placeholders", "topic_name"]

_record_topics = record_topics


@register_sink("kafka")
class KafkaSinkType(SinkTypeBase):
    description = "a Kafka topic"
    default_retry_timeout = "0"

    def own_params(self) -> tuple[ParamSpec, ...]:
        return (
            self.param("brokers", "Bootstrap brokers host:port,host:port", "127.0.0.1:9092"),
            self.param("topic", "Topic; {gadget}, {instance}, {datasource} and {node} are "
                       "replaced, and so is a record field such as {k8s.namespace} (records "
                       "then go to the topic of their own values; empty ones become _)",
                       "gadget.{gadget}"),
            self.param("key", "Field whose value is the message key (records with one key "
                       "stay ordered); empty for none"),
            self.param("encoding", "json: one object per record; protobuf: one GadgetData per "
                       "record; otlp: one ExportLogsServiceRequest per message", "json",
                       possible=ENCODINGS),
            self.param("compression", "Message compression", "none", possible=COMPRESSIONS),
            self.param("linger", "How long a send waits for more records", "5ms", "duration"),
            self.param("batch-size", "Bytes of one Kafka record batch", str(512 << 10),
                       "uint32", advanced=True),
            self.param("max-message-bytes", "Bytes one OTLP message may hold", str(900 << 10),
                       "uint32", advanced=True),
            self.param("timeout", "How long one send waits for acknowledgements before it is "
                       "retried", "10s", "duration"),
            self.param("client-id", "Kafka client id", "gadgetpipe", advanced=True),
        )

    def check(self, values: Mapping[str, Any],
              schemas: tuple[DataSourceSchema, ...]) -> tuple[str, str] | None:
        own = self.own(values)
        try:
            check_template(str(own.get("topic") or "gadget.{gadget}"), schemas)
        except ValueError as e:
            return self.key("topic"), str(e)
        key = str(own.get("key") or "")
        if key and not has_field(schemas, key):
            return self.key("key"), f"no data source has a field {key!r}"
        return None

    def endpoints(self, values: Mapping[str, Any]) -> tuple[Endpoint, ...]:
        brokers = str(self.own(values).get("brokers") or "")
        return (Endpoint(self.key("brokers"), brokers,
                         tuple(b.strip() for b in brokers.split(",") if b.strip()), 9092),)

    def build(self, values: Mapping[str, Any], context: SinkContext) -> KafkaSink:
        problem = self.check(values, context.schemas)
        if problem is not None:
            raise SinkError(f"{problem[0]}: {problem[1]}", retryable=False)
        own = self.own(values)
        topic = str(own.get("topic") or "gadget.{gadget}")
        key = str(own.get("key") or "")
        encoding = str(own.get("encoding") or "json")
        compression = str(own.get("compression") or "none")
        timeout = float(own.get("timeout") or 10.0)
        linger = float(own.get("linger") or 0.0)
        producer_args: dict[str, Any] = {
            "bootstrap_servers": str(own.get("brokers") or "127.0.0.1:9092"),
            "client_id": str(own.get("client-id") or "gadgetpipe"),
            "acks": "all",
            "enable_idempotence": True,
            "compression_type": None if compression == "none" else compression,
            "linger_ms": int(linger * 1000),
            "max_batch_size": int(own.get("batch-size") or (512 << 10)),
            "max_request_size": max(1 << 20, int(own.get("batch-size") or 0) + (64 << 10)),
            # Also the age at which aiokafka fails a queued batch whose partition has no
            # leader (after a broker restart): kept well above one write's timeout.
            "request_timeout_ms": int(max(30.0, timeout) * 1000),
            "retry_backoff_ms": 200,
        }
        # Imported here: aiokafka is ~4 MB of a daemon that has no Kafka sink.
        from pipeline.sinks._kafka_send import KafkaSink

        return KafkaSink(producer_args, topic, encoding, key, context, timeout,
                         int(own.get("max-message-bytes") or (900 << 10)))
