"""Daemon-to-daemon connections are secured like any client's: config/examples/multi-node.yaml
as written (its addresses, files and group made real here), with three daemons on this host:
a front daemon and two TCP peers that listen with mutual TLS only."""

from __future__ import annotations

import grp
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from api.client import GadgetClient, RunStream, TLSFiles
from pipeline._gen import gadget_service_pb2 as pb
from tests.daemon import DaemonProcess, instance_tracing
from tests.e2e.helpers import keep_running, unique_binary
from tests.e2e.pki import Certs, make_certs
from tests.peers.ports import free_port

pytestmark = pytest.mark.bpf

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "examples" / "multi-node.yaml"
NODE_B_ONLY_ID = "0123456789abcdef0123456789abcdef"


@dataclass(frozen=True)
class Peer:
    daemon: DaemonProcess
    tcp: str  # host:port


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def socket_group() -> Iterator[str]:
    name = f"gpt{uuid.uuid4().hex[:8]}"
    subprocess.run(["groupadd", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["groupdel", name], check=False)


def _peer(node: str, certs: Certs, tmp: Path) -> Peer:
    """A peer as the example describes them: TCP with mutual TLS (no plaintext TCP)."""
    hostport = f"127.0.0.1:{free_port()}"
    config = tmp / f"{node}.yaml"
    config.write_text(f"daemon:\n  node: {node}\n  tls:\n    cert: {certs.server_cert}\n"
                      f"    key: {certs.server_key}\n    clientCA: {certs.ca}\ninstances: []\n")
    return Peer(DaemonProcess("--listen", f"tcp://{hostport}", config=config).start(), hostport)


@pytest.fixture(scope="module")
def peers(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Peer, Peer]]:
    tmp = tmp_path_factory.mktemp("peers")
    b = _peer("node-b", certs, tmp)
    try:
        c = _peer("node-c", certs, tmp)
    except BaseException:
        b.daemon.close()
        raise
    try:
        yield b, c
    finally:
        b.daemon.close()
        c.daemon.close()


def front_config(front: DaemonProcess, tcp: str, peers: tuple[Peer, Peer], certs: Certs,
                 group: str, path: Path) -> Path:
    """The example, with its deployment values (addresses, files, group) made real."""
    text = EXAMPLE.read_text()
    b, c = peers
    for old, new in (("unix:///var/run/gadgetpipe/gadgetpipe.sock", front.address),
                     ("tcp://10.0.0.1:8080", f"tcp://{tcp}"),
                     ("10.0.0.2:8080", b.tcp), ("10.0.0.3:8080", c.tcp),
                     ("/etc/gadgetpipe/tls/server.crt", str(certs.server_cert)),
                     ("/etc/gadgetpipe/tls/server.key", str(certs.server_key)),
                     ("/etc/gadgetpipe/tls/clients-ca.crt", str(certs.ca)),
                     ("/etc/gadgetpipe/tls/ca.crt", str(certs.ca)),
                     ("/etc/gadgetpipe/tls/client.crt", str(certs.client_cert)),
                     ("/etc/gadgetpipe/tls/client.key", str(certs.client_key)),
                     ("socketGroup: gadget ", f"socketGroup: {group} ")):
        assert old in text, f"{EXAMPLE.name} no longer says {old!r}"
        text = text.replace(old, new)
    path.write_text(text)
    return path


def instances(c: GadgetClient) -> dict[str, pb.GadgetInstance]:
    listed = c.instances.ListGadgetInstances(pb.ListGadgetInstancesRequest()).gadgetInstances
    return {gi.name: gi for gi in listed}


def nodes_seen(stream: RunStream, comm: str, want: set[str]) -> set[str]:
    """Reads an attach stream until records of ``comm`` came from every node in ``want``."""
    seen: set[str] = set()
    for ev in stream.raw():
        if ev.type != 0:
            continue
        node = pb.GadgetData.FromString(ev.payload).node
        dec = stream.decoders[ev.dataSourceID]
        if any(r["proc"]["comm"] == comm for r in dec.records(ev.payload)):
            seen.add(node)
            if seen >= want:
                break
    return seen


def test_the_multi_node_example_runs_over_mutual_tls(peers: tuple[Peer, Peer], certs: Certs,
                                                     socket_group: str, tmp_path: Path) -> None:
    b, c = peers
    tcp = f"127.0.0.1:{free_port()}"
    front = DaemonProcess("--listen", f"tcp://{tcp}", config=tmp_path / "front.yaml")
    front_config(front, tcp, peers, certs, socket_group, tmp_path / "front.yaml")
    with front:
        assert front.socket.stat().st_gid == grp.getgrnam(socket_group).gr_gid
        with front.client() as fc:
            instance_tracing(fc, "exec-cluster")  # traces here and on both peers
            instance_tracing(fc, "exec-node-b")  # on node-b alone: its own ready event
            here = instances(fc)
            assert {n: gi.state.status for n, gi in here.items()} == {
                "exec-cluster": pb.StatusRunning, "exec-node-b": pb.StatusRunning}
            assert "node" not in here["exec-cluster"].state.message  # no peer is missing
            cluster = here["exec-cluster"].id
            # The peers got the instances the example places on them, with the same ids.
            with b.daemon.client() as bc:
                on_b = instances(bc)
            with c.daemon.client() as cc:
                on_c = instances(cc)
            assert {gi.id for gi in on_b.values()} == {cluster, NODE_B_ONLY_ID}
            assert {gi.id for gi in on_c.values()} == {cluster}
            binary = unique_binary(tmp_path)
            stream = fc.attach(cluster)
            stream.wait_ready()
            found: list[set[str]] = []
            reader = threading.Thread(target=lambda: found.append(nodes_seen(
                stream, binary.name[:15], {"node-a", "node-b", "node-c"})), daemon=True)
            with keep_running([str(binary)]):
                reader.start()
                reader.join(120)
            stream.cancel()
            assert found == [{"node-a", "node-b", "node-c"}]
        # The front's own TCP listener takes mutual TLS clients, as its peers do.
        with GadgetClient(f"tcp://{tcp}", TLSFiles(str(certs.ca), str(certs.client_cert),
                                                   str(certs.client_key))) as tc:
            assert set(instances(tc)) == {"exec-cluster", "exec-node-b"}


def first_log(stream: RunStream, words: tuple[str, ...]) -> str | None:
    """The first log line of ``stream`` holding all ``words`` (None if it ended first)."""
    for ev in stream:
        if ev.log is not None and all(w in ev.log for w in words):
            return ev.log
    return None


def test_a_peer_that_wants_a_client_certificate_refuses_a_front_without_one(
        peers: tuple[Peer, Peer], certs: Certs, tmp_path: Path) -> None:
    b, _ = peers
    config = tmp_path / "front.yaml"
    config.write_text(f"daemon:\n  node: node-x\n  nodes:\n    node-b: {b.tcp}\n"
                      f"  nodeTLS:\n    ca: {certs.ca}\n"
                      "instances:\n  - name: only-b\n    gadget: trace_exec\n    nodes: [node-b]\n")
    with DaemonProcess(config=config) as front, front.client() as fc:
        stream = fc.attach(instances(fc)["only-b"].id)
        found: list[str | None] = []
        reader = threading.Thread(target=lambda: found.append(first_log(
            stream, ("node 'node-b'", "is unavailable"))), daemon=True)
        reader.start()
        reader.join(60)
        stream.cancel()
        assert found and found[0] is not None, front.log()[-3000:]
        assert "does it require a client certificate (nodeTLS cert and key)?" in found[0]
        state = instances(fc)["only-b"].state
        assert state.message.startswith("node node-b: "), state
    with b.daemon.client() as bc:
        assert "only-b" not in instances(bc)  # mutual TLS kept it out


def test_a_tcp_peer_without_tls_needs_insecure(tmp_path: Path) -> None:
    config = tmp_path / "front.yaml"
    config.write_text("daemon:\n  nodes:\n    node-b: 127.0.0.1:1\ninstances: []\n")
    with pytest.raises(RuntimeError) as e:
        DaemonProcess(config=config).start()
    assert ("node 'node-b': TCP peer 127.0.0.1:1 needs TLS (nodeTLS, or tls under the node) or "
            "an explicit insecure") in str(e.value)
    config.write_text("daemon:\n  insecure: true\n  nodes:\n    node-b: 127.0.0.1:1\n"
                      "instances: []\n")
    with DaemonProcess(config=config) as d, d.client() as c:
        assert c.instances.ListGadgetInstances(pb.ListGadgetInstancesRequest())
