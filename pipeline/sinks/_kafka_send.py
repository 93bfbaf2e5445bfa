"""The ``kafka`` sink's sender (see pipeline/sinks/kafka.py for the contract): apart from the
sink type so that aiokafka is imported only by a daemon that has a Kafka sink."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    OutOfOrderSequenceNumber,
    UnknownProducerId,
)
from aiokafka.partitioner import murmur2

from pipeline import wire
from pipeline.accessors import column, values
from pipeline.batch import Batch
from pipeline.schema import DataSourceSchema, Field, Kind
from pipeline.sinks._kafka_topics import (
    CONTENT_TYPES,
    record_placeholders,
    record_topics,
    topic_name,
)
from pipeline.sinks.base import SinkContext, SinkError
from pipeline.sinks.container_resource import container_requests
from pipeline.sinks.encode import (
    JsonEncoder,
    OtlpLogEncoder,
    PerSchema,
    cstring_bytes,
    otlp_scope,
    time_field,
)
from pipeline.sinks.otlp_logs import resource_attributes
from pipeline.version import VERSION

__all__ = ["KafkaSink"]

_logger = logging.getLogger(__name__)

_KEY_CACHE_MAX = 65536
_SEQUENCE_ERRORS = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch)


@dataclass
class _Chunk:
    """Messages [start, stop) of a batch for one partition, and their delivery future."""

    partition: int
    start: int
    stop: int
    future: asyncio.Future[Any] | None = None
    topic: str = ""


@dataclass
class _Pending:
    """A batch being delivered: its messages, and how far handing them over got."""

    batch: Batch
    topic: str
    headers: list[tuple[str, bytes]]
    values: list[bytes]
    keys: list[bytes | None]
    timestamps: list[int | None]
    chunks: list[_Chunk] = field(default_factory=list)
    refused: int = 0
    counts: list[int] = field(default_factory=list)
    """Records per message (one each, except OTLP requests holding many)."""
    topics: list[str] | None = None
    """Each message's topic, when the template names record fields; else all go to topic."""


class KafkaSink:
    """Sends a run's records to Kafka. Never called concurrently (the runner's contract).

    Args:
        producer_args: keyword arguments of ``AIOKafkaProducer``.
        topic: the topic template.
        encoding: json, protobuf or otlp.
        key_field: the field whose value is each message's key ("" for none).
        context: the run.
        timeout: how long one write waits for acknowledgements.
        max_message: bytes an OTLP message may hold.
    """

    name = "kafka"

    def __init__(self, producer_args: dict[str, Any], topic: str, encoding: str,
                 key_field: str, context: SinkContext, timeout: float,
                 max_message: int) -> None:
        self._producer_args = producer_args
        self._template = topic
        self._encoding = encoding
        self._key_field = key_field
        self._ctx = context
        self._timeout = timeout
        self._max_message = max_message
        self._producer: AIOKafkaProducer | None = None
        self._started = False
        self._pending: _Pending | None = None
        self._json = PerSchema(JsonEncoder)
        self._otlp = PerSchema(self._compile_otlp)
        self._resource = resource_attributes(context)
        self._key_partition: dict[tuple[int, bytes], int] = {}
        self._rr = itertools.count()

    async def start(self) -> None:
        # Connecting happens on the first write: a broker that is down at start must not fail
        # the run, its records wait in the edge until it is back.
        return None

    async def _ensure_producer(self, deadline: float) -> AIOKafkaProducer:
        if self._producer is not None and self._started:
            return self._producer
        if self._producer is None:
            self._producer = AIOKafkaProducer(**self._producer_args)
        try:
            await asyncio.wait_for(self._producer.start(), max(0.1, deadline - time.monotonic()))
        except (TimeoutError, KafkaError, OSError) as e:
            producer, self._producer = self._producer, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 1.0)
            raise SinkError(f"connecting to Kafka {self._producer_args['bootstrap_servers']}: "
                            f"{type(e).__name__} {e}") from e
        self._started = True
        return self._producer

    # -- encoding ---------------------------------------------------------------------------

    def _compile_otlp(self, schema: DataSourceSchema) -> tuple[OtlpLogEncoder, bytes]:
        return (OtlpLogEncoder(schema, body=self._ctx.gadget),
                otlp_scope(self._ctx.gadget, VERSION, {"gadget.datasource": schema.name}))

    def _encode(self, batch: Batch) -> _Pending:
        schema = batch.schema
        static = {"gadget": self._ctx.gadget, "instance": self._ctx.id,
                  "datasource": schema.name, "node": self._ctx.node}
        per_record = bool(record_placeholders(self._template))
        topic = "" if per_record else topic_name(self._template, **static)
        headers = [("gadget", self._ctx.gadget.encode()),
                   ("instance", self._ctx.id.encode()),
                   ("node", self._ctx.node.encode()), ("datasource", schema.name.encode()),
                   ("content-type", CONTENT_TYPES[self._encoding])]
        n = len(batch)
        topics = record_topics(self._template, batch, static) if per_record else None
        if self._encoding == "otlp":
            enc = self._otlp.get(schema)
            records = enc[0].encode(batch, time.time_ns())
            if topics is not None:  # one request per run of records bound for one topic
                return self._otlp_per_topic(batch, topic, headers, enc, records, topics)
            reqs = container_requests(self._resource, enc[1], batch, records, self._max_message)
            return _Pending(batch, topic, headers, [r for r, _ in reqs], [None] * len(reqs),
                            [None] * len(reqs), counts=[c for _, c in reqs])
        if self._encoding == "json":
            vals = self._json.get(schema).encode(batch)
        else:
            vals = _gadget_data(batch)
        keys: list[bytes | None] = _keys(batch, self._key_field) if self._key_field else [None] * n
        tf = time_field(schema)
        stamps: list[int | None] = ((column(batch, tf) // 1_000_000).astype("i8").tolist()
                                    if tf is not None else [None] * n)
        return _Pending(batch, topic, headers, vals, keys, stamps, counts=[1] * n,
                        topics=topics)

    def _otlp_per_topic(self, batch: Batch, topic: str, headers: list[tuple[str, bytes]],
                        enc: tuple[OtlpLogEncoder, bytes], records: list[bytes],
                        topics: list[str]) -> _Pending:
        values: list[bytes] = []
        counts: list[int] = []
        out_topics: list[str] = []
        start = 0
        for i in range(1, len(topics) + 1):
            if i == len(topics) or topics[i] != topics[start]:
                for req, c in container_requests(self._resource, enc[1], batch.slice(start, i),
                                                 records[start:i], self._max_message):
                    values.append(req)
                    counts.append(c)
                    out_topics.append(topics[start])
                start = i
        k = len(values)
        return _Pending(batch, topic, headers, values, [None] * k, [None] * k, counts=counts,
                        topics=out_topics)

    def _partition_of(self, key: bytes | None, partitions: Sequence[int]) -> int:
        if key is None:
            return -1
        cached = (len(partitions), key)
        p = self._key_partition.get(cached)
        if p is None:
            # The Java client's (and aiokafka's) default partitioner, cached per key and
            # partition count (a topic that gains partitions moves its keys): the pure-Python
            # murmur2 costs a few µs, label-like keys repeat.
            p = partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
            if len(self._key_partition) >= _KEY_CACHE_MAX:
                self._key_partition.clear()
            self._key_partition[cached] = p
        return p

    def _chunks(self, pending: _Pending, partitions: Mapping[str, list[int]]) -> list[_Chunk]:
        """Runs of consecutive messages going to one partition of one topic, in order.

        Keyless messages of a batch go together to one partition, the next batch to the next
        partition (a sticky round robin, like the Java client's).
        """
        topics = pending.topics or [pending.topic] * len(pending.keys)
        if any(k is not None for k in pending.keys):
            parts = [self._partition_of(k, partitions[t])
                     for k, t in zip(pending.keys, topics, strict=True)]
        else:
            rr = next(self._rr)
            parts = [partitions[t][rr % len(partitions[t])] for t in topics]
        chunks: list[_Chunk] = []
        start = 0
        for i in range(1, len(parts) + 1):
            if i == len(parts) or parts[i] != parts[start] or topics[i] != topics[start]:
                chunks.append(_Chunk(parts[start], start, i, topic=topics[start]))
                start = i
        return chunks

    # -- sending ----------------------------------------------------------------------------

    async def _send_chunk(self, producer: AIOKafkaProducer, p: _Pending, c: _Chunk,
                          deadline: float, out: list[_Chunk]) -> None:
        """Hands one chunk over, as several Kafka batches if it does not fit in one; what was
        handed over is appended to ``out``, and on failure the rest too (not yet sent)."""
        i = c.start
        try:
            while i < c.stop:
                builder = producer.create_batch()
                j = i
                while j < c.stop:
                    if builder.append(key=p.keys[j], value=p.values[j],
                                      timestamp=p.timestamps[j], headers=p.headers) is None:
                        break
                    j += 1
                if j == i:
                    raise SinkError(f"message of {len(p.values[i])} bytes does not fit a Kafka "
                                    "batch (raise operator.kafka.batch-size)", retryable=False)
                builder.close()
                fut = await asyncio.wait_for(
                    producer.send_batch(builder, c.topic or p.topic, partition=c.partition),
                    max(0.1, deadline - time.monotonic()))
                out.append(_Chunk(c.partition, i, j, fut, c.topic))
                i = j
        except BaseException:
            out.append(_Chunk(c.partition, i, c.stop, topic=c.topic))
            raise

    async def _reset_producer(self) -> None:
        """Replaces the producer: a new producer id starts its sequence numbers afresh."""
        old, self._producer, self._started = self._producer, None, False
        if old is not None:
            await _close_producer(old, 2.0)

    async def write(self, batch: Batch) -> int:
        deadline = time.monotonic() + self._timeout
        if self._pending is None or self._pending.batch is not batch:
            if self._pending is not None:
                _logger.warning("kafka: a batch of %d records was given up while its delivery "
                                "was unknown", len(self._pending.batch))
            # Encoded in a worker thread (numpy passes mostly, which let the event loop run).
            self._pending = await asyncio.to_thread(self._encode, batch)
        p = self._pending
        try:
            producer = await self._ensure_producer(deadline)
            if not p.chunks:
                # Cached metadata answers at once; a new topic is created (auto-create) or
                # waited for here.
                partitions = {}
                for t in dict.fromkeys(p.topics or [p.topic]):
                    got = await asyncio.wait_for(producer.partitions_for(t),
                                                 max(0.1, deadline - time.monotonic()))
                    partitions[t] = sorted(got)
                p.chunks = self._chunks(p, partitions)
            # Hand over in order; what could not be handed over stays first in line.
            sent: list[_Chunk] = []
            for k, c in enumerate(p.chunks):
                if c.future is not None:
                    sent.append(c)
                    continue
                try:
                    await self._send_chunk(producer, p, c, deadline, sent)
                except (TimeoutError, KafkaError):
                    p.chunks = sent + p.chunks[k + 1:]
                    raise
            p.chunks = sent
            futures = [c.future for c in p.chunks if c.future is not None]
            remaining = deadline - time.monotonic()
            if futures and remaining > 0:
                await asyncio.wait(futures, timeout=remaining)
            if not all(f.done() for f in futures):
                raise SinkError(f"Kafka did not acknowledge {len(batch)} records within "
                                f"{self._timeout:.0f}s (broker down?); waiting for them")
        except TimeoutError as e:
            raise SinkError(f"Kafka did not answer within {self._timeout:.0f}s") from e
        except KafkaError as e:
            raise SinkError(f"Kafka: {type(e).__name__} {e}",
                            retryable=bool(getattr(e, "retriable", True))) from e
        ok: list[_Chunk] = []
        again: list[_Chunk] = []
        reset = False
        first_error = ""
        for c in p.chunks:
            exc = c.future.exception() if c.future is not None else None
            if exc is None:
                ok.append(c)
            elif isinstance(exc, _SEQUENCE_ERRORS) or (isinstance(exc, KafkaError)
                                                       and exc.retriable):
                # The idempotent producer gave the batch up (its accumulator expires batches
                # whose partition has no leader after request_timeout) or the broker lost
                # track of the sequence: the producer's numbering has a gap now, and every
                # later batch would fail. A new producer id starts afresh.
                again.append(_Chunk(c.partition, c.start, c.stop, topic=c.topic))
                reset = True
                first_error = first_error or f"{type(exc).__name__} {exc}"
            else:
                p.refused += sum(p.counts[c.start: c.stop])
                _logger.error("kafka refused %d messages: %s", c.stop - c.start, exc)
        if again:
            if reset:
                await self._reset_producer()
            p.chunks = ok + again
            raise SinkError(f"Kafka: {len(again)} batches failed ({first_error}); sending them "
                            "again with a new producer")
        self._pending = None
        return p.refused

    async def flush(self, timeout: float) -> bool:
        if self._producer is None or not self._started:
            return True
        try:
            await asyncio.wait_for(self._producer.flush(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self, timeout: float) -> None:
        producer, self._producer = self._producer, None
        self._pending = None
        if producer is not None:
            await _close_producer(producer, timeout)


async def _close_producer(producer: AIOKafkaProducer, timeout: float) -> None:
    try:
        await asyncio.wait_for(producer.stop(), timeout)
    except (TimeoutError, KafkaError) as e:
        # A dead broker keeps an idempotent producer's flush waiting forever: give up on what
        # it holds (the runner counts it as shutdown) and close the connections.
        _logger.warning("kafka producer did not stop within %.1fs: %s", timeout, e)
        sender = getattr(producer, "_sender", None)
        task = getattr(sender, "sender_task", None)
        if task is not None:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.client.close(), 1.0)


def _gadget_data(batch: Batch) -> list[bytes]:
    """Each record as a serialized ``GadgetData``, built in one numpy pass.

    A ``GadgetDataArray`` is the concatenation of its elements as field-3 entries, which is
    byte for byte a ``GadgetData`` per record; with payload 0 only they all have one length.
    """
    n = len(batch)
    if batch.extra or n == 0:
        return wire.gadget_data(batch)
    flat = wire.gadget_data_array(batch)
    w = len(flat) // n
    return [flat[i: i + w] for i in range(0, len(flat), w)]


def _keys(batch: Batch, f_name: str) -> list[bytes | None]:
    f: Field = batch.schema.field(f_name)
    if not f.is_array and f.base_kind in (Kind.CSTRING, Kind.STRING):
        return list(cstring_bytes(batch, f))
    return [str(v).encode() for v in values(batch, f)]
