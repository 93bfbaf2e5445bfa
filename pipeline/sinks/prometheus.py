"""The ``prometheus`` sink: gadget metrics declared per run, counted per batch.

Declared with params (prefix ``operator.prometheus.``), metrics separated by ``;``:

- ``counters=exec_by_comm:proc.comm`` → ``gadgetpipe_gadget_exec_by_comm_total{comm="bash"}``;
  several label fields are comma-separated (``by_user:proc.comm,proc.creds.uid``); a name alone
  counts every record.
- ``histograms=args:args_size:64,256,1024`` → ``gadgetpipe_gadget_args_bucket{le=…}`` …;
  buckets are a list, ``exp(start,factor,count)`` or ``lin(start,width,count)``; an optional
  fourth part lists label fields (``lat:latency_ns:exp(1000,2,20):proc.comm``).

Every series also carries ``gadget``, ``gadget_instance`` (the run's ledger label, as in the
self-metrics), ``gadget_instance_id``, ``gadget_instance_name`` (an instance's id and name; a
direct run's label) and ``datasource``. A label's name is
the last part of its field name (``proc.comm`` → ``comm``). Counting is per batch: the label
bytes of every record are gathered into one matrix and ``np.unique`` counts each distinct
label set once; histograms use ``np.searchsorted`` and ``np.bincount``. Only the distinct label
sets are decoded to strings.

Each metric keeps at most ``max-series`` label sets; records of further label sets are counted
in one series whose labels are all ``__overflow__``, and in
``gadgetpipe_metric_series_refused_total``. The state lives in a daemon-wide store that a
Prometheus ``Collector`` reads at scrape time; a finished run's series stay for ``retain`` so
the last counts are scraped.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from pipeline.accessors import column, values
from pipeline.batch import Batch, CodedColumn
from pipeline.params import ParamSpec
from pipeline.schema import KIND_WIDTH, NUMPY_DTYPE, DataSourceSchema, Field, Kind
from pipeline.sinks.base import SinkContext, SinkError, SinkTypeBase, register_sink

__all__ = [
    "OVERFLOW_LABEL",
    "CounterSpec",
    "GadgetMetricsCollector",
    "GadgetMetricsStore",
    "HistogramSpec",
    "PrometheusSink",
    "PrometheusSinkType",
    "RunMetrics",
    "parse_counters",
    "parse_histograms",
    "unique_rows",
]

METRIC_PREFIX = "gadgetpipe_gadget_"
OVERFLOW_LABEL = "__overflow__"
REFUSED_METRIC = "gadgetpipe_metric_series_refused"
SERIES_METRIC = "gadgetpipe_metric_series"
BASE_LABELS = ("gadget", "gadget_instance", "gadget_instance_id", "gadget_instance_name",
               "datasource")

_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_LABEL_BAD = re.compile(r"[^a-zA-Z0-9_]")


class MetricSpecError(ValueError):
    """A metric declaration does not parse or names unknown fields."""


@dataclass(frozen=True, slots=True)
class CounterSpec:
    name: str
    fields: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HistogramSpec:
    name: str
    field: str
    buckets: tuple[float, ...]
    fields: tuple[str, ...] = ()


def _split_metrics(text: str) -> list[str]:
    return [p.strip() for p in text.split(";") if p.strip()]


def _check_name(name: str, param: str) -> str:
    if not _NAME.match(name):
        raise MetricSpecError(f"{param}: metric name {name!r} must match [a-zA-Z_][a-zA-Z0-9_]*")
    return name


def _fields(text: str) -> tuple[str, ...]:
    return tuple(f.strip() for f in text.split(",") if f.strip())


def parse_counters(text: str, param: str = "counters") -> list[CounterSpec]:
    """``name[:field,field…]`` declarations separated by ``;``."""
    out = []
    for part in _split_metrics(text):
        name, _, fields = part.partition(":")
        out.append(CounterSpec(_check_name(name.strip(), param), _fields(fields)))
    return out


def parse_buckets(text: str, param: str = "histograms") -> tuple[float, ...]:
    """A bucket list, ``exp(start,factor,count)`` or ``lin(start,width,count)``."""
    text = text.strip()
    m = re.fullmatch(r"(exp|lin)\(\s*([^,]+),\s*([^,]+),\s*(\d+)\s*\)", text)
    try:
        if m:
            start, step, count = float(m[2]), float(m[3]), int(m[4])
            if m[1] == "exp":
                if start <= 0 or step <= 1:
                    raise ValueError("exp needs start > 0 and factor > 1")
                bounds = [start * step ** i for i in range(count)]
            else:
                if step <= 0:
                    raise ValueError("lin needs width > 0")
                bounds = [start + step * i for i in range(count)]
        else:
            bounds = [float(b) for b in text.split(",") if b.strip()]
    except ValueError as e:
        raise MetricSpecError(f"{param}: buckets {text!r}: {e}") from None
    if not bounds or any(b2 <= b1 for b1, b2 in itertools.pairwise(bounds)):
        raise MetricSpecError(f"{param}: buckets {text!r} must be non-empty and increasing")
    if any(math.isinf(b) or math.isnan(b) for b in bounds):
        raise MetricSpecError(f"{param}: buckets must be finite (+Inf is implied)")
    return tuple(bounds)


def parse_histograms(text: str, param: str = "histograms") -> list[HistogramSpec]:
    """``name:field:buckets[:label,label…]`` declarations separated by ``;``."""
    out = []
    for part in _split_metrics(text):
        # Buckets may contain ':'-free parentheses with commas, so split on ':' only.
        bits = part.split(":")
        if len(bits) not in (3, 4):
            raise MetricSpecError(f"{param}: {part!r}: expected name:field:buckets[:labels]")
        name, fld, buckets = bits[0].strip(), bits[1].strip(), bits[2]
        labels = _fields(bits[3]) if len(bits) == 4 else ()
        out.append(HistogramSpec(_check_name(name, param), fld, parse_buckets(buckets, param),
                                 labels))
    return out


def _label_names(fields: Sequence[str]) -> tuple[str, ...]:
    short = [f.rsplit(".", 1)[-1] for f in fields]
    names = [(s if short.count(s) == 1 else f.replace(".", "_")) for s, f in zip(short, fields,
                                                                                strict=True)]
    out = []
    for n in names:
        n = _LABEL_BAD.sub("_", n)
        if n[:1].isdigit() or n.startswith("__") or n in BASE_LABELS or n == "le":
            n = "field_" + n.lstrip("_")
        out.append(n)
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Per-batch label sets


def unique_rows(mat: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.uint8],
                                                      npt.NDArray[np.intp]]:
    """The distinct rows of a byte matrix and each row's index into them.

    ``np.unique(axis=0)`` sorts rows as opaque void records (~1.5 µs per row here); this
    sorts them as columns of 64-bit words instead, which is ~20x faster.
    """
    n, w = mat.shape
    if n == 0:
        return mat[:0], np.zeros(0, dtype=np.intp)
    pad = (-w) % 8
    padded = np.concatenate([mat, np.zeros((n, pad), dtype=np.uint8)], axis=1) if pad else mat
    words = np.ascontiguousarray(padded).view("<u8")
    if words.shape[1] == 1:
        _, first, inverse = np.unique(words[:, 0], return_index=True, return_inverse=True)
        return mat[first], inverse.reshape(-1).astype(np.intp)
    order = np.lexsort(words.T[::-1])
    ordered = words[order]
    change = np.empty(n, dtype=np.bool_)
    change[0] = True
    change[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    inverse = np.empty(n, dtype=np.intp)
    inverse[order] = np.cumsum(change) - 1
    return mat[order[change]], inverse


class _LabelReader:
    """Distinct label sets of a batch, with each record's index into them."""

    def __init__(self, fields: Sequence[Field]) -> None:
        self.fields = tuple(fields)
        # Fixed-position fields are compared as raw bytes; others fall back to values().
        self._fast = all(f.payload_index == 0 and not f.is_array and
                         (f.base_kind in NUMPY_DTYPE or f.base_kind is Kind.CSTRING)
                         for f in fields)

    def _matrix(self, batch: Batch) -> npt.NDArray[np.uint8]:
        parts = []
        for f in self.fields:
            if f.base_kind is Kind.CSTRING:
                block = batch.rows[:, f.offs: f.offs + f.size]
                # Bytes after the first NUL are stale ring memory: zero them so equal strings
                # compare equal (argmin: the first NUL, as 0 is the least byte).
                first = block.argmin(axis=1)
                first[block[np.arange(len(block)), first] != 0] = f.size
                parts.append(block * (np.arange(f.size)[None, :] <= first[:, None]))
            else:
                w = KIND_WIDTH[f.base_kind]
                parts.append(batch.rows[:, f.offs: f.offs + w])
        return np.ascontiguousarray(np.concatenate(parts, axis=1))

    def _decode(self, keys: npt.NDArray[np.uint8]) -> list[tuple[str, ...]]:
        cols: list[list[str]] = []
        pos = 0
        for f in self.fields:
            if f.base_kind is Kind.CSTRING:
                raw = keys[:, pos: pos + f.size]
                cols.append([r.tobytes().partition(b"\0")[0].decode("utf-8", "replace")
                             for r in raw])
                pos += f.size
            else:
                w = KIND_WIDTH[f.base_kind]
                col = np.ascontiguousarray(keys[:, pos: pos + w]).view(
                    NUMPY_DTYPE[f.base_kind]).reshape(-1)
                if f.base_kind is Kind.BOOL:
                    cols.append(["true" if v else "false" for v in col.tolist()])
                else:
                    cols.append([str(v) for v in col.tolist()])
                pos += w
        return list(zip(*cols, strict=True))

    def _one_set(self, batch: Batch) -> bool:
        """Whether every record has record 0's labels (one process's records): each field's
        bytes compared with record 0's, a C string's up to its NUL (after it a record holds
        stale ring memory)."""
        rows = batch.rows
        first = rows[0]
        for f in self.fields:
            end = f.offs + (f.size if f.base_kind is Kind.CSTRING else KIND_WIDTH[f.base_kind])
            if f.base_kind is Kind.CSTRING:
                nul = np.flatnonzero(first[f.offs: end] == 0)
                if len(nul):
                    end = f.offs + int(nul[0]) + 1
            part = rows[:, f.offs: end]
            if not (bool((part[-1] == part[0]).all()) and bool((part == part[0]).all())):
                return False
        return True

    def group(self, batch: Batch) -> tuple[list[tuple[str, ...]], npt.NDArray[np.intp]]:
        """(distinct label sets, each record's index into them)."""
        if not self.fields:
            return [()], np.zeros(len(batch), dtype=np.intp)
        if self._fast:
            if len(batch) and self._one_set(batch):
                one = self._matrix(Batch(batch.schema, batch.rows[:1]))
                return self._decode(one), np.zeros(len(batch), dtype=np.intp)
            keys, inverse = unique_rows(self._matrix(batch))
            return self._decode(keys), inverse
        coded = self._coded(batch)
        if coded is not None:
            return coded
        cols = [[str(v) for v in values(batch, f)] for f in self.fields]
        tuples = list(zip(*cols, strict=True))
        index: dict[tuple[str, ...], int] = {}
        inv = np.fromiter((index.setdefault(t, len(index)) for t in tuples), dtype=np.intp,
                          count=len(tuples))
        return list(index), inv


    def _coded(self, batch: Batch) -> tuple[list[tuple[str, ...]], npt.NDArray[np.intp]] | None:
        """Label sets of fields held in coded columns (the containers' k8s.* and runtime.*
        fields: one value per container), grouped by their codes; None for other fields."""
        cols: list[CodedColumn] = []
        for f in self.fields:
            col = batch.extra[f.payload_index - 1] if f.payload_index > 0 and not f.size \
                else None
            if not isinstance(col, CodedColumn):
                return None
            cols.append(col)
        key = np.zeros(len(batch), dtype=np.int64)
        for col in cols:
            key = key * (len(col.values) + 1) + col.codes
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        sets = [tuple(_label_value(f, col[r]) for f, col in zip(self.fields, cols, strict=True))
                for r in first.tolist()]
        return sets, inverse.reshape(-1).astype(np.intp)


def _label_value(f: Field, b: bytes) -> str:
    """A payload entry as a label value, as values() would render it."""
    kind = f.base_kind
    if kind in NUMPY_DTYPE and len(b) == KIND_WIDTH[kind]:
        v = np.frombuffer(b, dtype=NUMPY_DTYPE[kind])[0]
        return ("true" if v else "false") if kind is Kind.BOOL else str(v)
    return b.split(b"\0", 1)[0].decode("utf-8", "replace")


# --------------------------------------------------------------------------------------------
# State


@dataclass
class _Metric:
    """One declared metric of one run and data source."""

    name: str
    kind: str  # "counter" | "histogram"
    labels: tuple[str, ...]
    reader: _LabelReader
    max_series: int
    value_field: Field | None = None
    buckets: npt.NDArray[np.float64] | None = None
    counts: dict[tuple[str, ...], float] = field(default_factory=dict)
    hist: dict[tuple[str, ...], tuple[npt.NDArray[np.int64], float]] = field(
        default_factory=dict)
    refused: int = 0

    def _key(self, labels: tuple[str, ...], n: int, table: Mapping[Any, Any]) -> tuple[str, ...]:
        if labels in table or len(table) < self.max_series or labels == self._overflow:
            return labels
        self.refused += n
        return self._overflow

    @property
    def _overflow(self) -> tuple[str, ...]:
        return (OVERFLOW_LABEL,) * len(self.labels)

    @property
    def series(self) -> int:
        return len(self.counts) if self.kind == "counter" else len(self.hist)

    def count(self, batch: Batch) -> None:
        sets, inverse = self.reader.group(batch)
        if self.kind == "counter":
            per_set = np.bincount(inverse, minlength=len(sets)).tolist()
            for labels, n in zip(sets, per_set, strict=True):
                if n:
                    key = self._key(labels, n, self.counts)
                    self.counts[key] = self.counts.get(key, 0) + n
            return
        if self.value_field is None or self.buckets is None:
            raise TypeError(f"histogram {self.name!r} has no value field")
        v = column(batch, self.value_field).astype(np.float64)
        nb = len(self.buckets) + 1
        bucket = np.searchsorted(self.buckets, v, side="left")
        grid = np.bincount(inverse * nb + bucket, minlength=len(sets) * nb).reshape(-1, nb)
        sums = np.bincount(inverse, weights=v, minlength=len(sets)).tolist()
        for i, labels in enumerate(sets):
            row = grid[i]
            n = int(row.sum())
            if not n:
                continue
            key = self._key(labels, n, self.hist)
            old = self.hist.get(key)
            if old is None:
                self.hist[key] = (row.astype(np.int64), float(sums[i]))
            else:
                self.hist[key] = (old[0] + row, old[1] + float(sums[i]))


@dataclass
class RunMetrics:
    """The gadget metrics of one run, by data source."""

    gadget: str
    instance: str
    metrics: dict[str, list[_Metric]]
    retire_at: float | None = None
    instance_id: str = ""
    instance_name: str = ""

    def count(self, batch: Batch) -> None:
        for m in self.metrics.get(batch.schema.name, ()):
            m.count(batch)


class GadgetMetricsStore:
    """Every run's gadget metrics, read by :class:`GadgetMetricsCollector` at scrape time."""

    def __init__(self) -> None:
        self._runs: dict[str, RunMetrics] = {}

    def build(self, gadget: str, instance: str, schemas: Sequence[DataSourceSchema],
              counters: Sequence[CounterSpec], histograms: Sequence[HistogramSpec],
              max_series: int, instance_id: str = "", instance_name: str = "") -> RunMetrics:
        """The metrics of a run; raises MetricSpecError for unknown fields or clashes."""
        by_ds: dict[str, list[_Metric]] = {}
        declared: set[str] = set()
        specs: list[CounterSpec | HistogramSpec] = [*counters, *histograms]
        for spec in specs:
            if spec.name in declared:
                raise MetricSpecError(f"metric {spec.name!r} is declared twice")
            declared.add(spec.name)
            used = False
            wanted = [*spec.fields, *([spec.field] if isinstance(spec, HistogramSpec) else [])]
            for ds in schemas:
                try:
                    fields = [ds.field(f) for f in spec.fields]
                    vf = ds.field(spec.field) if isinstance(spec, HistogramSpec) else None
                except KeyError:
                    continue
                if vf is not None and (vf.is_array or vf.base_kind not in NUMPY_DTYPE):
                    raise MetricSpecError(f"histogram {spec.name!r}: field {vf.full_name!r} is "
                                          "not numeric")
                used = True
                by_ds.setdefault(ds.name, []).append(_Metric(
                    spec.name, "histogram" if vf is not None else "counter",
                    _label_names(spec.fields), _LabelReader(fields), max_series, vf,
                    np.array(spec.buckets, dtype=np.float64)
                    if isinstance(spec, HistogramSpec) else None))
            if not used:
                names = ", ".join(f"{ds.name}: {', '.join(f.full_name for f in ds.value_fields())}"
                                  for ds in schemas)
                raise MetricSpecError(f"metric {spec.name!r}: no data source has the fields "
                                      f"{', '.join(wanted)} ({names})")
        for other in self._runs.values():
            for ms in other.metrics.values():
                for m in ms:
                    for ours in (x for xs in by_ds.values() for x in xs):
                        if ours.name == m.name and ours.kind != m.kind:
                            raise MetricSpecError(
                                f"metric {m.name!r} is a {m.kind} in {other.instance}")
        return RunMetrics(gadget, instance, by_ds, instance_id=instance_id or instance,
                          instance_name=instance_name or instance)

    def add(self, run: RunMetrics) -> None:
        self._runs[run.instance] = run

    def retire(self, instance: str, after: float) -> None:
        """Forgets a finished run's series ``after`` seconds from now (scrapers get the end)."""
        run = self._runs.get(instance)
        if run is not None:
            run.retire_at = time.monotonic() + after

    def runs(self) -> list[RunMetrics]:
        now = time.monotonic()
        for k in [k for k, r in self._runs.items()
                  if r.retire_at is not None and r.retire_at <= now]:
            del self._runs[k]
        return list(self._runs.values())


def _fmt_le(b: float) -> str:
    return repr(float(b))


class GadgetMetricsCollector(Collector):
    """Turns the store into metric families at scrape time."""

    def __init__(self, store: GadgetMetricsStore) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        refused = Metric(REFUSED_METRIC, "Records whose label set was refused a series of its "
                         "own (cardinality cap) and counted in the __overflow__ series",
                         "counter")
        series = Metric(SERIES_METRIC, "Label sets (series) a gadget metric holds", "gauge")
        for run in self._store.runs():
            for ds, metrics in run.metrics.items():
                base = {"gadget": run.gadget, "gadget_instance": run.instance,
                        "gadget_instance_id": run.instance_id,
                        "gadget_instance_name": run.instance_name, "datasource": ds}
                for m in metrics:
                    name = METRIC_PREFIX + m.name
                    fam = families.get(name)
                    if fam is None:
                        vf = m.value_field.full_name if m.value_field else ""
                        doc = (f"Records counted by {m.name}" if m.kind == "counter"
                               else f"Distribution of {vf}")
                        fam = families[name] = Metric(name, doc, m.kind)
                    meta = {**base, "metric": name}
                    refused.add_sample(REFUSED_METRIC + "_total", meta, float(m.refused))
                    series.add_sample(SERIES_METRIC, meta, float(m.series))
                    if m.kind == "counter":
                        for labels, v in m.counts.items():
                            fam.add_sample(name + "_total",
                                           {**base, **dict(zip(m.labels, labels, strict=True))},
                                           float(v))
                        continue
                    if m.buckets is None:
                        continue
                    les = [*(_fmt_le(b) for b in m.buckets), "+Inf"]
                    for labels, (counts, total) in m.hist.items():
                        lab = {**base, **dict(zip(m.labels, labels, strict=True))}
                        cum = np.cumsum(counts).tolist()
                        for le, c in zip(les, cum, strict=True):
                            fam.add_sample(name + "_bucket", {**lab, "le": le}, float(c))
                        fam.add_sample(name + "_count", lab, float(cum[-1]))
                        fam.add_sample(name + "_sum", lab, total)
        yield from families.values()
        yield refused
        yield series


# --------------------------------------------------------------------------------------------
# Sink


class PrometheusSink:
    """Counts a run's batches into its :class:`RunMetrics`."""

    name = "prometheus"

    def __init__(self, store: GadgetMetricsStore, metrics: RunMetrics, retain: float) -> None:
        self._store = store
        self._metrics = metrics
        self._retain = retain

    async def start(self) -> None:
        self._store.add(self._metrics)

    async def write(self, batch: Batch) -> int:
        self._metrics.count(batch)
        return 0

    async def flush(self, timeout: float) -> bool:
        return True

    async def stop(self, timeout: float) -> None:
        self._store.retire(self._metrics.instance, self._retain)


@register_sink("prometheus")
class PrometheusSinkType(SinkTypeBase):
    description = "gadget metrics on the daemon's Prometheus endpoint"
    default_retry_timeout = "0"
    section = "metrics"

    def __init__(self) -> None:
        self.store = GadgetMetricsStore()

    def own_params(self) -> tuple[ParamSpec, ...]:
        return (
            self.param("counters", "Counters: name[:field,field...] separated by ';', e.g. "
                       "exec_by_comm:proc.comm", list_separator=";"),
            self.param("histograms", "Histograms: name:field:buckets[:labels] separated by "
                       "';'; buckets 1,2,5 or exp(start,factor,count) or lin(start,width,count)",
                       list_separator=";"),
            self.param("max-series", "Label sets one metric may hold; more are counted in an "
                       "__overflow__ series", "1000", "uint32"),
            self.param("retain", "How long a finished run's series stay exposed", "60s",
                       "duration", advanced=True),
        )

    def enabled(self, values: Mapping[str, Any]) -> bool:
        own = self.own(values)
        return bool(own.get("enable") or own.get("counters") or own.get("histograms"))

    def _metrics(self, values: Mapping[str, Any], gadget: str, instance: str,
                 schemas: tuple[DataSourceSchema, ...], instance_id: str = "",
                 instance_name: str = "") -> RunMetrics:
        own = self.own(values)
        counters = parse_counters(str(own.get("counters") or ""), self.key("counters"))
        histograms = parse_histograms(str(own.get("histograms") or ""),
                                      self.key("histograms"))
        if not counters and not histograms:
            counters = [CounterSpec("records")]
        return self.store.build(gadget, instance, schemas, counters, histograms,
                                int(own.get("max-series") or 1000), instance_id, instance_name)

    def check(self, values: Mapping[str, Any],
              schemas: tuple[DataSourceSchema, ...]) -> tuple[str, str] | None:
        own = self.own(values)
        for setting, parse in (("counters", parse_counters), ("histograms", parse_histograms)):
            try:
                parse(str(own.get(setting) or ""), self.key(setting))
            except MetricSpecError as e:
                return self.key(setting), str(e)
        try:
            self._metrics(values, "", "", schemas)  # built, never added: no series appear
        except MetricSpecError as e:
            # Name the setting that declares the metric the problem is about.
            m = re.search(r"(?:metric|histogram) '([^']+)'", str(e))
            histograms = parse_histograms(str(own.get("histograms") or ""))
            which = "histograms" if m and any(h.name == m[1] for h in histograms) \
                else "counters"
            return self.key(which), str(e)
        return None

    def build(self, values: Mapping[str, Any], context: SinkContext) -> PrometheusSink:
        try:
            metrics = self._metrics(values, context.gadget, context.instance, context.schemas,
                                    context.id, context.instance_name)
        except MetricSpecError as e:
            raise SinkError(str(e), retryable=False) from e
        own = self.own(values)
        return PrometheusSink(self.store, metrics, float(own.get("retain") or 0.0))

    def collectors(self) -> list[Collector]:
        return [GadgetMetricsCollector(self.store)]
