"""``gadgetpipe config render|check|schema``, the examples, the embedded default and the
generated JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from api.cli import main
from api.reconcile import DIGEST_TAG, OWNER_APPLY, OWNER_CONFIG, digest
from config.loader import DEFAULT_CONFIG, ConfigLoader
from config.schema import schema_text

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "config" / "examples").glob("*.yaml"))


def test_render_prints_the_exact_requests(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("instances:\n  - name: exec-audit\n    gadget: trace_exec\n    params: {}\n"
                 "    tags: [audit]\n  - name: b\n    gadget: trace_exec\n    timeout: 2s\n"
                 "    eventBufferLength: 10\n    filter: proc.comm==sh\n")
    assert main(["config", "render", str(f)]) == 0
    out = json.loads(capsys.readouterr().out)
    req = ConfigLoader().load([f]).requests()
    assert out == [
        {"gadgetInstance": {
            "gadgetConfig": {"imageName": "trace_exec", "version": 1},
            "tags": ["audit", OWNER_APPLY, DIGEST_TAG + digest(req[0])],
            "name": "exec-audit"}},
        {"gadgetInstance": {
            "gadgetConfig": {"imageName": "trace_exec", "version": 1, "timeout": "2000000000",
                             "paramValues": {"operator.filter.filter": "proc.comm==sh"}},
            "tags": [OWNER_APPLY, DIGEST_TAG + digest(req[1])],
            "name": "b"},
         "eventBufferLength": 10},
    ]
    assert main(["config", "render", "--owner", "config", str(f)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["gadgetInstance"]["tags"][1] == OWNER_CONFIG


def test_render_refuses_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("instances:\n  - name: a\n    gadget: trace_exec\n    prams: {}\n")
    assert main(["config", "render", str(f)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("error: the config is invalid, nothing was done:\n"
                            f"{f}:4:5: instances[0].prams: unknown key 'prams'; did you mean "
                            "'params'?\n")


def test_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(DEFAULT_CONFIG)]) == 0
    assert capsys.readouterr().out == "ok: 1 instance(s) in 1 file(s), with a daemon section\n"


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_examples_are_valid(example: Path) -> None:
    loaded = ConfigLoader().load([example])
    assert loaded.instances
    # Only the upstream manifest carries params gadgetpipe does not have.
    assert not loaded.warnings or example.name == "upstream-manifest.yaml"


def test_embedded_default() -> None:
    loaded = ConfigLoader().load_default()
    assert loaded.daemon is not None
    assert loaded.daemon.listen == ["unix:///var/run/gadgetpipe/gadgetpipe.sock"]
    assert loaded.daemon.metrics_listen == "127.0.0.1:2224"
    assert [(d.name, d.request.gadgetInstance.gadgetConfig.imageName)
            for d in loaded.instances] == [("exec-audit", "trace_exec")]


def test_schema_json_is_fresh(capsys: pytest.CaptureFixture[str]) -> None:
    """config/schema.json is generated: `gadgetpipe config schema > config/schema.json`."""
    on_disk = (ROOT / "config" / "schema.json").read_text()
    assert on_disk == schema_text(), "regenerate: gadgetpipe config schema > config/schema.json"
    assert main(["config", "schema"]) == 0
    assert capsys.readouterr().out == on_disk


def test_schema_describes_both_document_kinds() -> None:
    schema = json.loads(schema_text())
    assert {r["$ref"] for r in schema["anyOf"]} == {"#/$defs/ConfigDocument",
                                                   "#/$defs/InstanceSpecManifest"}
    inst = schema["$defs"]["InstanceSection"]
    assert inst["required"] == ["name", "gadget"]
    assert inst["additionalProperties"] is False
    assert {"name", "gadget", "id", "tags", "nodes", "params", "timeout", "eventBufferLength",
            "filter", "fields", "sinks", "metrics"} == set(inst["properties"])
    manifest = schema["$defs"]["InstanceSpecManifest"]
    assert set(manifest["required"]) == {"apiVersion", "kind", "image", "name"}


def test_render_redacts_secret_params(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("instances:\n  - name: a\n    gadget: trace_exec\n    sinks:\n"
                 "      otel-logs: {headers: 'authorization=Bearer t0ps3cret'}\n")
    assert main(["config", "render", str(f)]) == 0
    out = capsys.readouterr().out
    assert "t0ps3cret" not in out
    values = json.loads(out)[0]["gadgetInstance"]["gadgetConfig"]["paramValues"]
    assert values["operator.otel-logs.otel-logs-headers"] == "<redacted>"
    # The digest tag is of the real request, so apply still sees changes of the secret.
    req = ConfigLoader().load([f]).requests()[0]
    assert json.loads(out)[0]["gadgetInstance"]["tags"][-1] == (
        DIGEST_TAG + digest(req))
