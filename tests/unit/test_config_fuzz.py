"""Hypothesis: whatever YAML comes in, the loader returns a config or raises ConfigError, and
every issue has a position inside the text."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.loader import ConfigError, ConfigLoader, LoadedConfig

# Keys the format knows, near misses of them, and param keys: random documents stay close
# enough to valid ones to reach the deep checks (gadgets, params, sinks).
KEYS = ["daemon", "instances", "name", "gadget", "id", "tags", "nodes", "params", "timeout",
        "eventBufferLength", "filter", "fields", "sinks", "metrics", "listen", "tls",
        "insecure", "socketGroup", "stateDir", "metricsListen", "eventsBufferLength", "node",
        "sinks", "kafka", "otel-logs", "prometheus", "jsonl", "topic", "key", "encoding",
        "brokers", "endpoint", "counters", "histograms", "apiVersion", "kind", "image",
        "paramValues", "instance", "gadgte", "tagz", "parms", "kafak", "operator.oci.ebpf.pid",
        "operator.oci.ebpf.pidd", "operator.filter.filter", "operator.fields.fields",
        "operator.kafka.enable", "operator", "oci", "ebpf", "<<", "x-anchor", ""]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["trace_exec", "trace_exek", "exec-audit", "instance-spec", "1", "30s",
                     "-5", "proc.comm==bash", "proc.comm", "unix:///x", "127.0.0.1:1",
                     "tcp://a:1", "a,b", "gadgetpipe.apply", "{bad}", "0x10", "yes", "~"]),
    st.text(max_size=12),
)


def _values(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.lists(children, max_size=4),
                     st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), children,
                                     max_size=5))


DATA = st.recursive(SCALARS, _values, max_leaves=30)


@st.composite
def documents(draw: st.DrawFn) -> str:
    """A YAML text: a dumped random structure, sometimes shaped like a config, sometimes
    cut or with a character replaced."""
    shape = draw(st.sampled_from(["raw", "config", "manifest"]))
    data: Any = draw(DATA)
    if shape == "config":
        data = {"instances": draw(st.lists(st.dictionaries(st.sampled_from(KEYS), DATA,
                                                              max_size=6), max_size=3))}
        if draw(st.booleans()):
            data["daemon"] = draw(st.dictionaries(st.sampled_from(KEYS), DATA, max_size=4))
    elif shape == "manifest":
        data = {"apiVersion": 1, "kind": "instance-spec", "image": "trace_exec", "name": "a",
                **draw(st.dictionaries(st.sampled_from(KEYS), DATA, max_size=4))}
    text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    if text and draw(st.booleans()):
        i = draw(st.integers(0, len(text) - 1))
        text = text[:i] + draw(st.sampled_from(["", ":", "-", "[", "{", "&a", "*a", "!!x",
                                                "\t", "'", "\x00", "\n  ", "<<: "])) \
            + text[i + draw(st.integers(0, 2)):]
    return text


@pytest.fixture(scope="module")
def loader() -> ConfigLoader:
    """One loader (and catalog) for all examples: the loader keeps no state between loads."""
    return ConfigLoader()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=documents())
def test_loader_never_crashes(loader: ConfigLoader, text: str) -> None:
    try:
        loaded = loader.load_text(text, "f.yaml")
    except ConfigError as e:
        assert e.issues
        # YAML breaks lines at \r, \x85, \u2028 and \u2029 too.
        lines = len(re.split("\r\n|[\n\r\x85\u2028\u2029]", text)) + 1
        for issue in e.issues:
            assert issue.file == "f.yaml"
            assert 1 <= issue.line <= lines and issue.column >= 1, issue
            assert issue.message
        return
    assert isinstance(loaded, LoadedConfig)
    for d in loaded.instances:
        assert d.request.gadgetInstance.name == d.name


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_arbitrary_text(loader: ConfigLoader, text: str) -> None:
    try:
        loader.load_text(text, "f.yaml")
    except ConfigError as e:
        assert all(i.line >= 1 and i.column >= 1 for i in e.issues)
