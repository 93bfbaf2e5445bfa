"""Sinks own their settings: a sink type defined here, in the test, and nowhere else, is
loaded from YAML, checked, probed, described by the JSON Schema, rendered with its secret
hidden, and discovered as a module, with no edit to the loader, the schema or the CLI."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from api.cli_apply import rendered
from api.reconcile import OWNER_APPLY
from config.loader import ConfigError, ConfigLoader, Reachability
from config.schema import json_schema
from pipeline.batch import Batch
from pipeline.ledger import Ledger
from pipeline.params import REDACTED
from pipeline.schema import DataSourceSchema
from pipeline.sinks.base import SinkContext, SinkTypeBase, has_field, register_sink
from pipeline.sinks.endpoints import Endpoint
from pipeline.sinks.registry import SinkManager, discover_sink_types


class _MemorySink:
    name = "webhook"

    def __init__(self) -> None:
        self.batches: list[Batch] = []

    async def start(self) -> None:
        return None

    async def write(self, batch: Batch) -> int:
        self.batches.append(batch)
        return 0

    async def flush(self, timeout: float) -> bool:
        return True

    async def stop(self, timeout: float) -> None:
        return None


@register_sink("webhook")
class WebhookSinkType(SinkTypeBase):
    """A sink that exists only in this test."""

    description = "a test webhook"

    def own_params(self) -> tuple[Any, ...]:
        return (
            self.param("url", "Where records go", "127.0.0.1:1"),
            self.param("token", "Bearer token", secret=True),
            self.param("field", "Field sent as the body"),
            self.param("labels", "Labels, ;-separated", list_separator=";"),
        )

    def check(self, values: Mapping[str, Any],
              schemas: tuple[DataSourceSchema, ...]) -> tuple[str, str] | None:
        body = str(self.own(values).get("field") or "")
        if body and not has_field(schemas, body):
            return self.key("field"), f"no data source has a field {body!r}"
        return None

    def endpoints(self, values: Mapping[str, Any]) -> tuple[Endpoint, ...]:
        url = str(self.own(values).get("url") or "")
        return (Endpoint(self.key("url"), url, (url,), 80),)

    def build(self, values: Mapping[str, Any], context: SinkContext) -> _MemorySink:
        return _MemorySink()


@pytest.fixture
def sinks() -> SinkManager:
    return SinkManager(Ledger(), types={"webhook": WebhookSinkType})


@pytest.fixture
def listening() -> Iterator[int]:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        yield srv.getsockname()[1]


def _yaml(settings: str) -> str:
    return ("instances:\n  - name: a\n    gadget: trace_exec\n    sinks:\n      webhook:\n"
            + settings)


def test_the_loader_expands_its_settings_to_its_params(sinks: SinkManager) -> None:
    loaded = ConfigLoader(sinks=sinks).load_text(_yaml(
        "        url: 127.0.0.1:8080\n        field: proc.comm\n        token: s3cret\n"
        "        labels: [a, b]\n"), "c.yaml")
    params = dict(loaded.instances[0].request.gadgetInstance.gadgetConfig.paramValues)
    assert params == {"operator.webhook.webhook-enable": "true",
                      "operator.webhook.webhook-url": "127.0.0.1:8080",
                      "operator.webhook.webhook-field": "proc.comm",
                      "operator.webhook.webhook-token": "s3cret",
                      "operator.webhook.webhook-labels": "a;b"}
    assert "operator.webhook.webhook-token" in loaded.secret_keys


def test_the_param_key_is_accepted_as_the_setting_and_both_is_an_error(
        sinks: SinkManager) -> None:
    loaded = ConfigLoader(sinks=sinks).load_text(_yaml("        webhook-url: h:1\n"))
    params = loaded.instances[0].request.gadgetInstance.gadgetConfig.paramValues
    assert params["operator.webhook.webhook-url"] == "h:1"
    with pytest.raises(ConfigError) as e:
        ConfigLoader(sinks=sinks).load_text(_yaml("        url: h:1\n        webhook-url: h:2\n"),
                                            "c.yaml")
    assert str(e.value) == ("c.yaml:7:9: instances[0].sinks.webhook.webhook-url: sets "
                            "'operator.webhook.webhook-url' again (first set at "
                            "instances[0].sinks.webhook.url)")


def test_its_own_check_is_reported_at_the_setting(sinks: SinkManager) -> None:
    with pytest.raises(ConfigError) as e:
        ConfigLoader(sinks=sinks).load_text(_yaml("        field: proc.com\n"), "c.yaml")
    assert str(e.value) == ("c.yaml:6:16: instances[0].sinks.webhook.field: "
                            "operator.webhook.webhook-field: no data source has a field "
                            "'proc.com'; did you mean 'proc.comm'?")


def test_an_unknown_setting_names_its_settings(sinks: SinkManager) -> None:
    with pytest.raises(ConfigError) as e:
        ConfigLoader(sinks=sinks).load_text(_yaml("        urll: x\n"), "c.yaml")
    assert str(e.value) == ("c.yaml:6:9: instances[0].sinks.webhook.urll: unknown webhook "
                            "setting 'urll'; did you mean 'url'? (known: enable, field, "
                            "labels, max-batch, overflow, queue-capacity, retry-timeout, "
                            "token, url)")


def test_its_endpoints_are_probed_with_its_probe(sinks: SinkManager, listening: int) -> None:
    ConfigLoader(sinks=sinks, reachability=Reachability.ERROR).load_text(
        _yaml(f"        url: 127.0.0.1:{listening}\n"))
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
        with pytest.raises(ConfigError) as e:
            ConfigLoader(sinks=sinks, reachability=Reachability.ERROR).load_text(
                _yaml(f"        url: 127.0.0.1:{closed}\n"), "c.yaml")
    assert str(e.value).startswith(f"c.yaml:6:14: instances[0].sinks.webhook.url: webhook: "
                                   f"unreachable: 127.0.0.1:{closed}: ")


def test_daemon_defaults_take_its_settings(sinks: SinkManager) -> None:
    loaded = ConfigLoader(sinks=sinks).load_text(
        "daemon:\n  sinks:\n    webhook:\n      url: d:1\n      labels: [x, y]\n")
    assert loaded.sink_defaults == {"webhook": {"url": "d:1", "labels": "x;y"}}
    with pytest.raises(ConfigError) as e:
        ConfigLoader(sinks=sinks).load_text("daemon:\n  sinks:\n    webhok: {}\n", "c.yaml")
    assert "unknown sink 'webhok'; did you mean 'webhook'? (sinks: webhook)" in str(e.value)


def test_the_schema_describes_its_settings(sinks: SinkManager) -> None:
    schema = json_schema(sinks.types)
    webhook = schema["$defs"]["sink-webhook"]
    assert set(webhook["properties"]) == {"enable", "queue-capacity", "overflow",
                                          "retry-timeout", "max-batch", "url", "token",
                                          "field", "labels"}
    assert webhook["properties"]["url"]["default"] == "127.0.0.1:1"
    assert webhook["additionalProperties"] is False
    assert webhook["patternProperties"] == {"^webhook-": {}}
    daemon_sinks = schema["$defs"]["DaemonSection"]["properties"]["sinks"]
    assert daemon_sinks["properties"] == {"webhook": {"$ref": "#/$defs/sink-webhook"}}
    inst_sinks = schema["$defs"]["InstanceSection"]["properties"]["sinks"]
    assert set(inst_sinks["properties"]) == {"webhook"}


def test_render_shows_its_secret_redacted(sinks: SinkManager) -> None:
    loaded = ConfigLoader(sinks=sinks).load_text(_yaml("        token: s3cret\n"))
    out = rendered(loaded, OWNER_APPLY)
    values = out[0]["gadgetInstance"]["gadgetConfig"]["paramValues"]
    assert values["operator.webhook.webhook-token"] == REDACTED
    assert "s3cret" not in repr(out)
    # The request itself (what apply sends) keeps the value.
    req = loaded.requests()[0].gadgetInstance.gadgetConfig.paramValues
    assert req["operator.webhook.webhook-token"] == "s3cret"


def test_a_module_in_a_package_is_a_sink_type(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "extra_sinks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "pager.py").write_text(
        "from pipeline.sinks.base import SinkTypeBase, register_sink\n\n\n"
        "@register_sink('pager')\nclass PagerSinkType(SinkTypeBase):\n"
        "    def own_params(self):\n        return (self.param('number', 'Who to page'),)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    found = discover_sink_types(importlib.import_module("extra_sinks"))
    assert list(found) == ["pager"]
    manager = SinkManager(Ledger(), {"pager": {"number": "555"}}, types=found)
    assert {p.full_key: p.default for p in manager.params()}[
        "operator.pager.pager-number"] == "555"
    sys.modules.pop("extra_sinks.pager", None)
    sys.modules.pop("extra_sinks", None)
