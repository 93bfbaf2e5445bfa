"""Secrets stay secret: a secret param (the OTLP sink's ``headers``) set as a daemon-wide
default, on a declared instance and on a run is never announced, never logged (to a client at
debug level or to the daemon's log), never listed, and ``apply`` still sees the instance as
unchanged. Real daemon, real BPF (the runs start), no peer: the sink is never enabled."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.reconcile import OWNER_CONFIG, ActionKind, plan, stamp
from config.loader import ConfigLoader
from pipeline._gen import gadget_service_pb2 as pb
from pipeline.params import REDACTED
from tests.daemon import DaemonProcess

pytestmark = [pytest.mark.bpf]

HEADERS = "operator.otel-logs.otel-logs-headers"
DAEMON_SECRET = "authorization=Bearer daemon-8c1f"
INSTANCE_SECRET = "x-api-key=instance-77e2"
RUN_SECRET = "x-api-key=run-3b9d"
LEGACY_SECRET = "x-api-key=legacy-5a0c"
SECRETS = ("daemon-8c1f", "instance-77e2", "run-3b9d", "legacy-5a0c")
LOG_DEBUG = 5
EVENT_LOG = 1 << 16

CONFIG = f"""
daemon:
  sinks:
    otel-logs:
      headers: "{DAEMON_SECRET}"
instances:
  - name: with-secret
    gadget: trace_exec
    sinks:
      otel-logs:
        enable: false
        headers: "{INSTANCE_SECRET}"
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    cfg = tmp_path_factory.mktemp("secrets") / "config.yaml"
    cfg.write_text(CONFIG)
    with DaemonProcess(config=cfg) as d:
        yield d


def _shown(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def test_the_announced_default_is_redacted_and_echoing_it_keeps_the_secret(
        daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        info = c.info("trace_exec")
        [p] = [p for p in info.params if p.prefix + p.key == HEADERS]
        assert p.defaultValue == REDACTED
        assert not _shown(str(info))
        # gadgetctl sends every announced param back with its flag's value: the default.
        again = c.info("trace_exec", {HEADERS: REDACTED})
        assert not _shown(str(again))


def test_a_direct_runs_debug_logs_show_params_without_secrets(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        stream = c.run("trace_exec", {HEADERS: RUN_SECRET}, timeout_s=1, log_level=LOG_DEBUG)
        events = list(stream.raw())
    logs = [e.payload.decode() for e in events if e.type >= EVENT_LOG]
    assert f"param {HEADERS}: {REDACTED}" in logs, logs
    assert not _shown("\n".join(logs))
    assert not _shown(str(events))


def test_a_legacy_runs_debug_logs_show_resolved_params_without_secrets(
        daemon: DaemonProcess) -> None:
    first = threading.Event()
    events: list[pb.GadgetEvent] = []

    def requests() -> Iterator[pb.BuiltInGadgetControlRequest]:
        yield pb.BuiltInGadgetControlRequest(runRequest=pb.BuiltInGadgetRunRequest(
            gadgetCategory="trace", gadgetName="exec", logLevel=LOG_DEBUG,
            params={HEADERS: LEGACY_SECRET}, timeout=int(2e9)))
        first.wait(60)

    with daemon.client() as c:
        for ev in c.builtin.RunBuiltInGadget(requests(), timeout=120):
            events.append(ev)
            first.set()
    logs = [e.payload.decode() for e in events if e.type >= EVENT_LOG]
    assert f"param {HEADERS}: {REDACTED}" in logs, logs
    assert not _shown(str(events))


def test_instances_are_listed_redacted_and_apply_sees_them_unchanged(
        daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        listed = list(c.instances.ListGadgetInstances(
            pb.ListGadgetInstancesRequest()).gadgetInstances)
        [gi] = [i for i in listed if i.name == "with-secret"]
        assert gi.gadgetConfig.paramValues[HEADERS] == REDACTED
        got = c.instances.GetGadgetInstance(pb.GadgetInstanceId(id=gi.id))
        assert got.gadgetConfig.paramValues[HEADERS] == REDACTED
        assert not _shown(str(listed) + str(got))
    declared = ConfigLoader().load_text(CONFIG).requests()
    actions = plan(declared, listed, OWNER_CONFIG, prune=False)
    assert [a.kind for a in actions] == [ActionKind.KEEP]
    # A changed secret is still a change: the digest tag covers the real value.
    changed = ConfigLoader().load_text(CONFIG.replace("instance-77e2", "other")).requests()
    assert [a.kind for a in plan(changed, listed, OWNER_CONFIG, prune=False)] == [
        ActionKind.REPLACE]
    assert stamp(declared[0], OWNER_CONFIG).gadgetInstance.gadgetConfig.paramValues[
        HEADERS] == INSTANCE_SECRET


def test_the_daemon_log_holds_no_secret(daemon: DaemonProcess, tmp_path: Path) -> None:
    with daemon.client() as c:
        list(c.run("trace_exec", {HEADERS: RUN_SECRET}, timeout_s=1,
                   log_level=LOG_DEBUG).raw())
    log = daemon.log()
    assert "param operator." in log  # the daemon does log params at debug level
    assert not _shown(log)
