"""Kafka topic names from templates, and the sink's encodings: what the ``kafka`` sink type
(pipeline/sinks/kafka.py) and its sender (pipeline/sinks/_kafka_send.py) share."""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence

from pipeline.batch import Batch
from pipeline.schema import DataSourceSchema
from pipeline.sinks.base import has_field
from pipeline.sinks.encode import cstring_bytes

ENCODINGS = ("json", "protobuf", "otlp")
COMPRESSIONS = ("none", "gzip", "snappy", "lz4", "zstd")
CONTENT_TYPES = {
    "json": b"application/json",
    "protobuf": b"application/x-protobuf; messageType=gadgetservice.GadgetData",
    "otlp": b"application/x-protobuf; "
            b"messageType=opentelemetry.proto.collector.logs.v1.ExportLogsServiceRequest",
}
TOPIC_FIELDS = frozenset({"gadget", "instance", "datasource", "node"})
_TOPIC_BAD = re.compile(r"[^a-zA-Z0-9._-]")


def topic_name(template: str, **fields: str) -> str:
    """The topic for ``template`` (``gadget.{gadget}``); characters Kafka refuses become _."""
    return _TOPIC_BAD.sub("_", template.format(**fields))[:249]


def record_placeholders(template: str) -> list[str]:
    """The placeholders of ``template`` that name a record field (``{k8s.namespace}``)."""
    return [f for _, f, _, _ in string.Formatter().parse(template)
            if f is not None and f not in TOPIC_FIELDS]


def check_template(template: str, schemas: Sequence[DataSourceSchema] | None = None) -> None:
    """Placeholders are the run's (:data:`TOPIC_FIELDS`) or fields of its records (with
    ``schemas`` given, every one must name a field of some data source)."""
    for f in record_placeholders(template):
        if schemas is None or not has_field(tuple(schemas), f):
            raise ValueError(f"unknown placeholders {[f]}; use {sorted(TOPIC_FIELDS)} or a "
                             "field of the records, such as k8s.namespace")


def record_topics(template: str, batch: Batch, fields: Mapping[str, str]) -> list[str]:
    """Each record's topic, for a template naming record fields (an empty value becomes _)."""
    names = record_placeholders(template)
    cols = [cstring_bytes(batch, batch.schema.field(n)) for n in names]
    # Placeholders become positional so dotted field names need no attribute lookup.
    parts = list(string.Formatter().parse(template))
    fmt = "".join(lit.replace("{", "{{").replace("}", "}}") +
                  ("" if f is None else f"{{{names.index(f)}}}" if f in names else
                   fields[f].replace("{", "{{").replace("}", "}}"))
                  for lit, f, _, _ in parts)
    cache: dict[tuple[bytes, ...], str] = {}
    out = []
    for key in zip(*cols, strict=True):
        t = cache.get(key)
        if t is None:
            t = cache[key] = _TOPIC_BAD.sub("_", fmt.format(
                *(v.decode(errors="replace") or "_" for v in key)))[:249]
        out.append(t)
    return out
