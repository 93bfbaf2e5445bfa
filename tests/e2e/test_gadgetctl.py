"""Upstream's own client, ``gadgetctl`` (built from upstream's source by ``scripts/setup
upstream``), against our daemon: every gadget with ``-o json`` and ``-o columns`` showing a
workload's record; ``run --detach --name``, ``list``, ``attach``, ``delete``; a sink's param
given as a gadgetctl flag; mutual TLS on TCP.

Each test waits for the workload's record in gadgetctl's output stream (tests/peers/
upstream_workloads.py), never for a time. Without an upstream source on the machine these tests
are the suite's one skip, reported in its summary (tests/conftest.py).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess
from tests.e2e.pki import SERVER_NAME, Certs, make_certs
from tests.e2e.test_access import tcp_daemon
from tests.peers.upstream import UPSTREAM_GADGETS, Gadgetctl, GadgetctlProcess, TLSClient
from tests.peers.upstream_workloads import Workload, leaves, running

pytestmark = [pytest.mark.bpf, pytest.mark.upstream]

RECORD_WITHIN = 60.0
"""Seconds a workload's record may take to show (compile + attach on a busy 2-core machine)."""
BACKSTOP = "180"
"""gadgetctl --timeout: a run nobody stops still ends."""


@pytest.fixture
def gadgetctl(daemon: DaemonProcess) -> Iterator[Gadgetctl]:
    with Gadgetctl(daemon.address) as g:
        yield g


def assert_clean_exit(p: GadgetctlProcess, code: int) -> None:
    """gadgetctl stopped by SIGINT (or ending by itself) exits 0 and logs no error."""
    err = p.stderr()
    assert code == 0, f"gadgetctl exited with {code}\n{p.describe()}"
    assert "panic" not in err and "level=error" not in err and "Error:" not in err, p.describe()


def run_until(gadgetctl: Gadgetctl, gadget: str, output: str, w: Workload,
              *flags: str) -> tuple[GadgetctlProcess, str | dict[str, object]]:
    p = gadgetctl.start("run", gadget, "-o", output, "--timeout", BACKSTOP, *flags)
    try:
        if output == "json":
            found: str | dict[str, object] = p.wait_for_json(
                w.json_match, RECORD_WITHIN, f"the {gadget} record carrying {w.token!r}")
        else:
            found = p.wait_for(w.columns_match, RECORD_WITHIN,
                               f"a {gadget} row showing {w.token!r}")
    except BaseException:
        p.stop()
        raise
    return p, found


@pytest.mark.parametrize("gadget", UPSTREAM_GADGETS)
def test_run_json_shows_the_workload(gadgetctl: Gadgetctl, gadget: str) -> None:
    with running(gadget) as w:
        p, record = run_until(gadgetctl, gadget, "json", w)
        code = p.stop()  # snapshot_process too: upstream's run does not end after one
    assert_clean_exit(p, code)
    assert isinstance(record, dict)
    # Every printed line is JSON (wait_for_json fails on any other), nested by field path as
    # upstream's JSON formatter does (``proc`` holds ``comm``), so no key has a dot in it.
    assert not [path for path, _ in leaves(record) if "." in path.rsplit(".", 1)[-1]]
    assert not any("." in k for k in record), sorted(record)


@pytest.mark.parametrize("gadget", UPSTREAM_GADGETS)
def test_run_columns_shows_the_workload(gadgetctl: Gadgetctl, gadget: str) -> None:
    with running(gadget) as w:
        p, row = run_until(gadgetctl, gadget, "columns", w)
        code = p.stop()  # snapshot_process too: upstream's run does not end after one
    assert_clean_exit(p, code)
    assert isinstance(row, str)
    # The first line is the header: upper-case column names, none of them in the row's place.
    header = next(line for line in p.lines if line.strip())
    names = header.replace("\x1b[H\x1b[2J", "").split()
    assert names and all(n == n.upper() for n in names), header
    assert not w.columns_match(header)


def _list_rows(gadgetctl: Gadgetctl) -> dict[str, list[str]]:
    """``gadgetctl list``: instance name -> its columns (ID NAME TAGS GADGET STATUS)."""
    done = gadgetctl.call("list")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines and lines[0].split() == ["ID", "NAME", "TAGS", "GADGET", "STATUS"], done.stdout
    return {cols[1]: cols for cols in (line.split() for line in lines[1:])}


def test_detach_list_attach_delete(gadgetctl: Gadgetctl) -> None:
    name = f"gp-{uuid.uuid4().hex[:8]}"
    done = gadgetctl.call("run", "trace_exec", "--detach", "--name", name, "--tags", "gp,upstream")
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "installed as" in done.stderr, done.stderr
    instance_id = done.stderr.split("installed as", 1)[1].split('"')[1].strip('\\')
    assert len(instance_id) == 32, done.stderr
    try:
        row = _list_rows(gadgetctl).get(name)
        assert row is not None, f"{name} not listed"
        assert instance_id.startswith(row[0]) and row[2:4] == ["gp,upstream", "trace_exec"], row

        with running("trace_exec") as w:
            p = gadgetctl.start("attach", name, "-o", "json")
            try:
                p.wait_for_json(w.json_match, RECORD_WITHIN,
                                f"the trace_exec record carrying {w.token!r} via attach")
            finally:
                code = p.stop()
        assert_clean_exit(p, code)
        # It delivered a record, so it traces: upstream's list shows that as Running.
        assert _list_rows(gadgetctl)[name][4] == "Running"
    finally:
        deleted = gadgetctl.call("delete", name)
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.split() == [instance_id]
    assert name not in _list_rows(gadgetctl)
    again = gadgetctl.call("delete", name)  # upstream's client reports it and exits 0
    assert f"not found names/ids: {name}" in again.stderr, again.stderr


def _sink_flag(daemon: DaemonProcess, sink: str, setting: str) -> str:
    """The gadgetctl flag of a sink setting: ``--<key>`` of the param our daemon announces."""
    with daemon.client() as c:
        params = c.info("trace_exec").params
    keys = [p.key for p in params if p.prefix == f"operator.{sink}." and
            (p.key == setting or p.key.endswith(f"-{setting}"))]
    assert len(keys) == 1, f"no single {sink} {setting} param among {[p.key for p in params]}"
    return f"--{keys[0]}"


def test_a_sink_param_given_as_gadgetctl_flags(daemon: DaemonProcess, gadgetctl: Gadgetctl,
                                               tmp_path: Path) -> None:
    # gadgetctl makes a flag of every param GetGadgetInfo announces, so our sinks are
    # configured from it like any upstream operator: here the JSON-lines sink to a file.
    out = tmp_path / "records.jsonl"
    flags = [_sink_flag(daemon, "jsonl", "enable"), _sink_flag(daemon, "jsonl", "path"),
             str(out)]
    with running("trace_exec") as w:
        p, _ = run_until(gadgetctl, "trace_exec", "json", w, *flags)
        try:
            deadline = time.monotonic() + RECORD_WITHIN
            while not (out.exists() and w.token in out.read_text()):
                # The sink writes the same batches the stream carried; its file is flushed per
                # batch, so the record follows the one already seen on the stream.
                assert time.monotonic() < deadline, \
                    f"the record never reached {out}\n{p.describe()}"
                time.sleep(0.05)
        finally:
            code = p.stop()
    assert_clean_exit(p, code)
    lines = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert any(w.json_match(rec) for rec in lines)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA, a server certificate for gadgetpipe.test and 127.0.0.1, a client certificate."""
    return make_certs(tmp_path_factory.mktemp("pki"))


def test_mutual_tls_over_tcp(certs: Certs) -> None:
    d, address = tcp_daemon("--tls-cert", str(certs.server_cert), "--tls-key",
                            str(certs.server_key), "--tls-client-ca", str(certs.ca))
    # gadgetctl's TLS dialer url-parses the bare "host:port" it connects to, which fails for a
    # numeric host ("first path segment in URL cannot contain colon", pkg/runtime/grpc/
    # grpc-runtime.go): address the daemon by name and give the certificate's name.
    address = address.replace("tcp://127.0.0.1:", "tcp://localhost:")
    with d:
        tls = TLSClient(certs.client_cert, certs.client_key, certs.ca, SERVER_NAME)
        with Gadgetctl(address, tls=tls) as gc, running("trace_exec") as w:
            p, _ = run_until(gc, "trace_exec", "json", w)
            code = p.stop()
        assert_clean_exit(p, code)
        # Without a client certificate the daemon refuses the connection.
        with Gadgetctl(address, extra=["--connection-timeout", "5"]) as plain:
            refused = plain.call("list", timeout=60)
        assert refused.returncode != 0
