"""The config loader: every kind of bad file (table-driven: exact file:line:column, key path
and message), and what good files turn into."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from config.loader import ConfigError, ConfigLoader, LoadedConfig, Reachability

I = "instances:\n  - name: a\n    gadget: trace_exec\n"  # noqa: E741 - the common head
"""An instance head; cases append keys of ``instances[0]`` (indented 4)."""


@pytest.fixture(scope="module")
def loader() -> ConfigLoader:
    return ConfigLoader()


# (case, YAML, "line:column", key path, text the message contains)
BAD: list[tuple[str, str, str, str, str]] = [
    # structure
    ("unknown top key", "instancez: []\n", "1:1", "instancez",
     "unknown key 'instancez'; did you mean 'instances'?"),
    ("unknown instance key", I + "    tagz: [x]\n", "4:5", "instances[0].tagz",
     "unknown key 'tagz'; did you mean 'tags'?"),
    ("unknown daemon key", "daemon:\n  stateDirectory: /x\n", "2:3", "daemon.stateDirectory",
     "unknown key 'stateDirectory'; did you mean 'stateDir'?"),
    ("string for int", I + "    eventBufferLength: \"12\"\n", "4:24",
     "instances[0].eventBufferLength", "expected an integer, got the string '12'"),
    ("YAML 1.1 bool is a string", "daemon:\n  insecure: yes\n", "2:13", "daemon.insecure",
     "expected true or false, got the string 'yes'"),
    ("missing gadget", "instances:\n  - name: a\n", "2:5", "instances[0].gadget",
     "missing required key 'gadget'"),
    ("bad name", "instances:\n  - name: Exec_Audit\n    gadget: trace_exec\n", "2:11",
     "instances[0].name", "invalid gadget instance name 'Exec_Audit'"),
    ("duplicate names", I + "  - name: a\n    gadget: trace_exec\n", "4:11",
     "instances[1].name", "duplicate instance name 'a' (first declared at c.yaml:2:11)"),
    ("duplicate key", I + "    name: b\n", "4:5", "instances[0].name",
     "duplicate key 'name' (first at line 2, column 5)"),
    ("instances not a list", "instances:\n  name: a\n", "2:3", "instances",
     "expected a list, got a mapping"),
    ("sink settings not a mapping", I + "    sinks:\n      kafka: yes\n", "5:14",
     "instances[0].sinks.kafka", "expected a mapping, got the string 'yes'"),
    ("bad timeout", I + "    timeout: 10 minutes\n", "4:14", "instances[0].timeout",
     "'10 minutes' is not a duration"),
    ("negative timeout", I + "    timeout: -5\n", "4:14", "instances[0].timeout",
     "must be a finite number >= 0"),
    ("tag with comma", I + "    tags: [ok, 'a,b']\n", "4:16", "instances[0].tags[1]",
     "tag 'a,b' contains ','"),
    ("reserved tag", I + "    tags: [gadgetpipe.apply]\n", "4:12", "instances[0].tags[0]",
     "reserved for apply's bookkeeping"),
    ("id not a string", I + "    id: 1234\n", "4:9", "instances[0].id",
     "expected a string, got the integer 1234"),
    ("bad id", I + "    id: abc\n", "4:9", "instances[0].id",
     "invalid gadget instance id 'abc'"),
    ("event buffer too large", I + "    eventBufferLength: 100000\n", "4:24",
     "instances[0].eventBufferLength", "less than or equal to 65536"),
    ("list in a param list", I + "    params:\n      operator.oci.ebpf.comm: [a, [b]]\n",
     "5:35", "instances[0].params.operator.oci.ebpf.comm[1]", "may hold only scalars"),
    ("collection as key", I + "    params:\n      [a, b]: c\n", "5:7", "instances[0].params",
     "a key must be a plain string"),
    ("two daemon sections", "daemon: {}\n---\ndaemon: {}\n", "3:1", "daemon",
     "a second daemon section (the first is at c.yaml:1:1)"),
    # YAML itself
    ("YAML syntax", "instances:\n  - name: a\n    gadget: [trace_exec\n", "4:1", "",
     "invalid YAML: while parsing a flow sequence"),
    ("tab indentation", "instances:\n\t- name: a\n", "2:1", "",
     "found character '\\t' that cannot start any token"),
    ("control character", "instances:\n  - name: a\x07b\n", "2:12", "",
     "cannot read: special characters are not allowed ('\\x07')"),
    ("not a mapping", "- name: a\n  gadget: trace_exec\n", "1:1", "",
     "a document must be a mapping"),
    ("unsupported tag", "instances:\n  - name: a\n    gadget: !!binary aGVsbG8=\n", "3:13",
     "instances[0].gadget", "unsupported YAML tag 'tag:yaml.org,2002:binary'"),
    ("alias bomb", "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
     "b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
     "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n"
     "f: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n", "1:32", "f[0][6][8][8][8][8]",
     "the document expands to more than 200000 values"),
    # gadgets and params
    ("unknown gadget", "instances:\n  - name: a\n    gadget: trace_exek\n", "3:13",
     "instances[0].gadget", "unknown gadget 'trace_exek'; did you mean 'trace_exec'?"),
    ("unknown param", I + "    params:\n      operator.oci.ebpf.pidd: 5\n", "5:7",
     "instances[0].params.operator.oci.ebpf.pidd",
     "unknown parameter; did you mean 'operator.oci.ebpf.pid'?"),
    ("unknown nested param", I + "    params:\n      operator:\n        oci:\n          ebpf:\n"
     "            pidd: 5\n", "8:13", "instances[0].params.operator.oci.ebpf.pidd",
     "unknown parameter; did you mean 'operator.oci.ebpf.pid'?"),
    ("param out of range", I + "    params:\n      operator.oci.ebpf.pid: -1\n", "5:30",
     "instances[0].params.operator.oci.ebpf.pid", "-1 is outside uint32"),
    ("param not a bool", I + "    params:\n      operator.oci.ebpf.ignore-failed: maybe\n",
     "5:40", "instances[0].params.operator.oci.ebpf.ignore-failed", "'maybe' is not a bool"),
    ("near miss of a known key", I + "    params:\n      operator.filtr.filter: proc.pid>1\n",
     "5:7", "instances[0].params.operator.filtr.filter",
     "unknown parameter; did you mean 'operator.filter.filter'?"),
    ("set twice", I + "    params:\n      operator.filter.filter: proc.pid>1\n"
     "    filter: proc.pid>2\n", "6:5", "instances[0].filter",
     "sets 'operator.filter.filter' again (first set at "
     "instances[0].params.operator.filter.filter)"),
    ("filter does not parse", I + "    filter: proc.comm\n", "4:13", "instances[0].filter",
     "operator.filter.filter: cannot parse 'proc.comm'"),
    ("filter names no field", I + "    filter: proc.commm==bash\n", "4:13",
     "instances[0].filter", "has no field 'proc.commm'"),
    ("fields names no field", I + "    fields: [proc.comm, proc.pidd]\n", "4:13",
     "instances[0].fields", "did you mean 'proc.pid'?"),
    ("unknown node", "daemon:\n  node: here\n  nodes: {node-b: 10.0.0.2:8080}\n" + I
     + "    nodes: [here, node-c]\n", "7:19", "instances[0].nodes[1]",
     "unknown node 'node-c'; did you mean 'node-b'? (known: here, node-b)"),
    # sinks
    ("unknown sink", I + "    sinks:\n      kafak: {}\n", "5:7", "instances[0].sinks.kafak",
     "unknown sink 'kafak'; did you mean 'kafka'?"),
    ("unknown sink setting", I + "    sinks:\n      kafka: {topik: x}\n", "5:15",
     "instances[0].sinks.kafka.topik", "unknown kafka setting 'topik'; did you mean 'topic'?"),
    ("sink value not allowed", I + "    sinks:\n      kafka: {encoding: xml}\n", "5:25",
     "instances[0].sinks.kafka.encoding", "'xml' is not one of json, protobuf, otlp"),
    ("kafka topic placeholder", I + "    sinks:\n      kafka:\n        topic: gadget.{cluster}\n",
     "6:16", "instances[0].sinks.kafka.topic", "unknown placeholders ['cluster']"),
    ("kafka key field", I + "    sinks:\n      kafka:\n        key: proc.com\n", "6:14",
     "instances[0].sinks.kafka.key",
     "no data source has a field 'proc.com'; did you mean 'proc.comm'?"),
    ("otlp header", I + "    sinks:\n      otel-logs:\n        headers: authorization\n", "6:18",
     "instances[0].sinks.otel-logs.headers",
     # Not quoted: headers are a secret (a malformed one is often a pasted token).
     "operator.otel-logs.otel-logs-headers: header 1 is not key=value"),
    ("metric name", I + "    metrics:\n      counters: [by_comm:proc.comm, 9bad]\n", "5:17",
     "instances[0].metrics.counters", "metric name '9bad' must match"),
    ("histogram field", I + "    metrics:\n      histograms: size:args_sise:1,2,4\n", "5:19",
     "instances[0].metrics.histograms", "did you mean 'args_size'?"),
    ("daemon sink setting", "daemon:\n  sinks:\n    kafka:\n      broker: 10.0.0.1:9092\n",
     "4:7", "daemon.sinks.kafka.broker",
     "unknown kafka setting 'broker'; did you mean 'brokers'?"),
    ("daemon sink value", "daemon:\n  sinks:\n    kafka:\n      linger: soon\n", "4:15",
     "daemon.sinks.kafka.linger", "'soon' is not a duration"),
    ("daemon unknown sink", "daemon:\n  sinks:\n    otel-log: {}\n", "3:5",
     "daemon.sinks.otel-log", "unknown sink 'otel-log'; did you mean 'otel-logs'?"),
    ("listen address", "daemon:\n  listen:\n    - unix:///run/a.sock\n    - 0.0.0.0:8080\n",
     "4:7", "daemon.listen[1]", "scheme must be unix:// or tcp://"),
    ("metrics address", "daemon:\n  metricsListen: localhost\n", "2:18",
     "daemon.metricsListen", "'localhost' is not HOST:PORT (or off)"),
    ("peer address", "daemon:\n  nodes:\n    b: nowhere\n", "3:8", "daemon.nodes.b",
     "address 'nowhere' is not unix:///path, host:port or tcp://host:port"),
    # upstream manifests
    ("manifest apiVersion", "apiVersion: 2\nkind: instance-spec\nimage: trace_exec\nname: a\n",
     "1:13", "apiVersion", "must be 1, got the integer 2"),
    ("manifest kind", "apiVersion: 1\nkind: instance-specs\nimage: trace_exec\nname: a\n",
     "2:7", "kind", "must be 'instance-spec', got the string 'instance-specs'; did you mean "
     "'instance-spec'?"),
    ("manifest image", "apiVersion: 1\nkind: instance-spec\nname: a\n", "1:1", "image",
     "missing required key 'image'"),
    ("manifest name", "apiVersion: 1\nkind: instance-spec\nimage: trace_exec\n", "1:1", "name",
     "missing required key 'name'"),
    ("manifest unknown key", "apiVersion: 1\nkind: instance-spec\nimage: trace_exec\nname: a\n"
     "params: {}\n", "5:1", "params", "unknown key 'params'; did you mean 'paramValues'?"),
    ("manifest param", "apiVersion: 1\nkind: instance-spec\nimage: trace_exec\nname: a\n"
     "paramValues:\n  operator.oci.ebpf.pidd: \"1\"\n", "6:3",
     "paramValues.operator.oci.ebpf.pidd",
     "unknown parameter; did you mean 'operator.oci.ebpf.pid'?"),
]


@pytest.mark.parametrize(("text", "where", "path", "message"),
                         [pytest.param(*c[1:], id=c[0]) for c in BAD])
def test_bad_config(loader: ConfigLoader, text: str, where: str, path: str,
                    message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        loader.load_text(text, "c.yaml")
    issues = exc.value.issues
    head = f"c.yaml:{where}: {path}: " if path else f"c.yaml:{where}: "
    match = [i for i in issues if str(i).startswith(head) and message in i.message]
    assert match, f"want {head}...{message}\ngot:\n{exc.value}"
    assert str(exc.value).splitlines()[0] == str(issues[0])


def test_every_problem_is_reported_at_once(loader: ConfigLoader) -> None:
    text = (I + "    params:\n      operator.oci.ebpf.pidd: 5\n      operator.oci.ebpf.uid: x\n"
            "    filter: proc.commm==a\n  - name: a\n    gadget: nope\n")
    with pytest.raises(ConfigError) as exc:
        loader.load_text(text, "c.yaml")
    paths = [i.path for i in exc.value.issues]
    assert paths == ["instances[0].params.operator.oci.ebpf.pidd",
                     "instances[0].params.operator.oci.ebpf.uid", "instances[0].filter",
                     "instances[1].name", "instances[1].gadget"]
    assert [(i.line, i.column) for i in exc.value.issues] == [(5, 7), (6, 30), (7, 13),
                                                                (8, 11), (9, 13)]


def test_files_and_directories(tmp_path: Path, loader: ConfigLoader) -> None:
    (tmp_path / "a.yaml").write_text(I)
    (tmp_path / "b.yml").write_text("instances:\n  - name: a\n    gadget: trace_exec\n")
    (tmp_path / "notes.txt").write_text("not yaml: [")
    with pytest.raises(ConfigError) as exc:
        loader.load([tmp_path])
    assert str(exc.value) == (f"{tmp_path}/b.yml:2:11: instances[0].name: duplicate instance "
                              f"name 'a' (first declared at {tmp_path}/a.yaml:2:11)")
    with pytest.raises(ConfigError) as exc:
        loader.load([tmp_path / "missing.yaml"])
    assert str(exc.value) == f"{tmp_path}/missing.yaml:1:1: no such file or directory"
    (tmp_path / "bad.yaml").write_bytes(b"instances: \xff\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:1:1: cannot read: 'utf-8' codec"):
        loader.load([tmp_path / "bad.yaml"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"no \*\.yaml or \*\.yml files"):
        loader.load([empty])


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A local TCP port nothing listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    yield port


def test_unreachable_endpoints(closed_port: int) -> None:
    text = (f"daemon:\n  sinks:\n    otel-logs: {{endpoint: 127.0.0.1:{closed_port}}}\n" + I
            + f"    sinks:\n      kafka: {{brokers: '127.0.0.1:{closed_port}'}}\n"
            + "      otel-logs: {}\n")
    loader = ConfigLoader(reachability=Reachability.ERROR, connect_timeout=1.0)
    with pytest.raises(ConfigError) as exc:
        loader.load_text(text, "c.yaml")
    lines = str(exc.value).splitlines()
    assert lines[0].startswith("c.yaml:3:27: daemon.sinks.otel-logs.endpoint: otel-logs: "
                               f"unreachable: 127.0.0.1:{closed_port}: ")
    assert lines[1].startswith("c.yaml:8:24: instances[0].sinks.kafka.brokers: kafka: "
                               f"unreachable: 127.0.0.1:{closed_port}: ")
    # As warnings, and not at all when off.
    warned = ConfigLoader(reachability=Reachability.WARN, connect_timeout=1.0).load_text(
        text, "c.yaml")
    assert len(warned.warnings) == 2
    assert not ConfigLoader().load_text(text, "c.yaml").warnings


def test_reachable_endpoint() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        loaded = ConfigLoader(reachability=Reachability.ERROR).load_text(
            I + f"    sinks:\n      kafka: {{brokers: [127.0.0.1:1, 127.0.0.1:{port}]}}\n")
    params = loaded.instances[0].request.gadgetInstance.gadgetConfig.paramValues
    assert params["operator.kafka.kafka-brokers"] == f"127.0.0.1:1,127.0.0.1:{port}"


# -- good files --------------------------------------------------------------------------------


def _params(loaded: LoadedConfig, i: int = 0) -> dict[str, str]:
    return dict(loaded.instances[i].request.gadgetInstance.gadgetConfig.paramValues)


def test_smallest_file(loader: ConfigLoader) -> None:
    loaded = loader.load_text("instances:\n  - name: exec-audit\n    gadget: trace_exec\n"
                              "    params: {}\n    tags: [audit]\n", "c.yaml")
    assert loaded.daemon is None and loaded.sink_defaults == {} and not loaded.warnings
    [d] = loaded.instances
    assert (d.name, d.file, d.line, d.column, d.path) == ("exec-audit", "c.yaml", 2, 5,
                                                          "instances[0]")
    gi = d.request.gadgetInstance
    assert (gi.name, list(gi.tags), gi.id, gi.gadgetConfig.imageName,
            gi.gadgetConfig.version, dict(gi.gadgetConfig.paramValues),
            d.request.eventBufferLength) == ("exec-audit", ["audit"], "", "trace_exec", 1, {}, 0)


def test_empty_documents(loader: ConfigLoader) -> None:
    for text in ("", "# nothing\n", "---\n", "---\n---\n", "{}\n", "instances: []\n"):
        loaded = loader.load_text(text)
        assert loaded.instances == () and loaded.daemon is None


def test_values_are_taken_as_written(loader: ConfigLoader) -> None:
    loaded = loader.load_text(I + "    params:\n"
                              "      operator.oci.ebpf.comm: on\n"         # YAML 1.1: true
                              "      operator.oci.ebpf.gid: 0x10\n"
                              "      operator.oci.ebpf.pid: ~\n"
                              "      operator.oci.ebpf.ignore-failed: False\n"
                              "      operator.bcc.drain-interval: 1m30s\n"
                              "      custom:\n"
                              "        mode: 0755\n"                       # YAML 1.1: 493
                              "        at: 1:30\n")                        # YAML 1.1: 90
    assert _params(loaded) == {
        "operator.oci.ebpf.comm": "on", "operator.oci.ebpf.gid": "0x10",
        "operator.oci.ebpf.pid": "", "operator.oci.ebpf.ignore-failed": "False",
        "operator.bcc.drain-interval": "1m30s", "custom.mode": "0755", "custom.at": "1:30"}
    # custom.* is not a gadgetpipe param: accepted, with a warning.
    assert [str(w) for w in loaded.warnings] == [
        "<string>:11:9: instances[0].params.custom.mode: not a gadgetpipe parameter; the "
        "daemon ignores it",
        "<string>:12:9: instances[0].params.custom.at: not a gadgetpipe parameter; the "
        "daemon ignores it"]


def test_sections_expand_to_params(loader: ConfigLoader) -> None:
    loaded = loader.load_text(
        "daemon:\n  sinks:\n    kafka:\n      brokers: [10.0.0.1:9092, 10.0.0.2:9092]\n" + I
        + "    filter: proc.comm==bash\n    fields: [proc.comm, proc.pid]\n"
        "    timeout: 1m30s\n    eventBufferLength: 4096\n"
        "    sinks:\n      kafka: {topic: 't.{node}', key: proc.comm}\n"
        "      jsonl:\n        enable: false\n"
        "    metrics:\n      counters: [a:proc.comm, b]\n      max-series: 10\n")
    assert loaded.sink_defaults == {"kafka": {"brokers": "10.0.0.1:9092,10.0.0.2:9092"}}
    assert _params(loaded) == {
        "operator.filter.filter": "proc.comm==bash",
        "operator.fields.fields-select": "proc.comm,proc.pid",
        "operator.kafka.kafka-enable": "true", "operator.kafka.kafka-topic": "t.{node}",
        "operator.kafka.kafka-key": "proc.comm", "operator.jsonl.jsonl-enable": "false",
        "operator.prometheus.prometheus-enable": "true",
        "operator.prometheus.prometheus-counters": "a:proc.comm;b",
        "operator.prometheus.prometheus-max-series": "10"}
    req = loaded.instances[0].request
    assert req.gadgetInstance.gadgetConfig.timeout == 90 * 10**9
    assert req.eventBufferLength == 4096


def test_upstream_manifests_and_merge_keys(loader: ConfigLoader) -> None:
    loaded = loader.load_text(
        "apiVersion: 1\nkind: instance-spec\nimage: trace_exec\nname: my-gadget-1\n"
        "id: 0123456789abcdef0123456789abcdef\nnodes: []\n"
        "paramValues:\n  operator.KubeManager.all-namespaces: true\n  operator.oci.ebpf.uid: 0\n"
        "tags: [mytag1, mytag2]\n---\n"
        "x-base: &base {gadget: trace_exec, tags: [x]}\n"
        "instances:\n  - <<: *base\n    name: merged\n    tags: [y]\n", "m.yaml")
    d0, d1 = loaded.instances
    assert d0.upstream and not d1.upstream
    gi = d0.request.gadgetInstance
    assert (gi.id, gi.name, list(gi.tags), gi.gadgetConfig.imageName, gi.gadgetConfig.version,
            dict(gi.gadgetConfig.paramValues)) == (
        "0123456789abcdef0123456789abcdef", "my-gadget-1", ["mytag1", "mytag2"], "trace_exec",
        1, {"operator.KubeManager.all-namespaces": "true", "operator.oci.ebpf.uid": "0"})
    assert [w.path for w in loaded.warnings] == ["paramValues.operator.KubeManager.all-namespaces"]
    gi = d1.request.gadgetInstance
    assert (gi.name, gi.gadgetConfig.imageName, list(gi.tags)) == ("merged", "trace_exec", ["y"])


def test_only_x_keys_are_free(loader: ConfigLoader) -> None:
    # Anchors may live under x-* keys only; any other unknown key is an error.
    with pytest.raises(ConfigError, match=r"m\.yaml:1:1: base: unknown key .base."):
        loader.load_text("base: &b {gadget: trace_exec}\ninstances: [{<<: *b, name: a}]\n",
                         "m.yaml")
