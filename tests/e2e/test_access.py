"""Who may talk to the daemon: the unix socket's owner and mode, TCP only with TLS (or an
explicit ``--insecure``), TLS and mutual TLS with certificates made here (``openssl``), the Go
client over mutual TLS, and the gRPC health and reflection services.

The listener tests start their own daemons (the listeners are what is tested); health and
reflection ask the session's shared one. The certificates are made once for the module.
"""

from __future__ import annotations

import grp
import json
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpclib.health.v1 import health_pb2
from grpclib.reflection.v1 import reflection_pb2 as reflection_v1
from grpclib.reflection.v1alpha import reflection_pb2 as reflection_v1alpha

from api.cli import build_parser
from api.client import GadgetClient, TLSFiles
from api.daemon import DaemonSettings
from api.serve_config import settings_from_args
from bench.peers import goclient_path
from tests.daemon import DaemonProcess
from tests.e2e.helpers import keep_running, unique_binary
from tests.e2e.pki import SERVER_NAME, Certs, make_certs
from tests.peers.ports import free_port

pytestmark = pytest.mark.bpf

CONNECT_TIMEOUT = 10.0
REFUSED_WITHIN = 2.0
"""Seconds a refused client is given: a handshake that can succeed does in milliseconds."""
# Connects to a unix socket and says how it went; run as another user by the system Python
# (the venv's lives under /root, which other users cannot enter).
CONNECT = ("import socket, sys\n"
           "s = socket.socket(socket.AF_UNIX)\n"
           "try:\n"
           "    s.connect(sys.argv[1])\n"
           "except OSError as e:\n"
           "    sys.exit(f'refused: {e}')\n")
NOBODY = 65534


# -- certificates ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("pki"))


def tcp_daemon(*args: str) -> tuple[DaemonProcess, str]:
    """A daemon that also listens on a fresh loopback port; returns it (not started) and the
    address."""
    address = f"tcp://127.0.0.1:{free_port()}"
    return DaemonProcess("--listen", address, *args), address


def can_read(address: str, tls: TLSFiles | None, timeout: float = CONNECT_TIMEOUT) -> bool:
    """Whether a grpcio client gets a GetGadgetInfo answer over ``address``."""
    try:
        with GadgetClient(address, tls, connect_timeout=timeout) as c:
            return bool(c.info("trace_exec").dataSources)
    except (grpc.FutureTimeoutError, grpc.RpcError):
        return False


# -- the unix socket ------------------------------------------------------------------------------


@pytest.fixture
def test_group() -> Iterator[tuple[str, int]]:
    name = f"gpt{uuid.uuid4().hex[:8]}"
    subprocess.run(["groupadd", name], check=True)
    try:
        yield name, grp.getgrnam(name).gr_gid
    finally:
        subprocess.run(["groupdel", name], check=False)


def connect_as(path: Path, uid: int, gid: int) -> subprocess.CompletedProcess[str]:
    # setpriv rather than Popen(user=, group=): those make Popen fork() this
    # grpcio-threaded process, and grpc's atfork child handler can crash before exec.
    argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
            "/usr/bin/python3", "-c", CONNECT, str(path)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def test_unix_socket_is_0660_root_and_the_socket_group(test_group: tuple[str, int]) -> None:
    name, gid = test_group
    # A socket in a directory the daemon creates, under one everybody may enter, so the test
    # sees what the group can reach (the harness's own socket dir is private to root).
    base = Path(tempfile.mkdtemp(prefix="gp-access-", dir="/tmp"))
    base.chmod(0o755)
    sock = base / "run" / "gadgetpipe" / "gp.sock"
    try:
        with DaemonProcess("--listen", f"unix://{sock}", "--socket-group", name) as d:
            for path in (d.socket, sock):
                st = path.stat()
                assert (oct(st.st_mode & 0o777), st.st_uid, st.st_gid) == (oct(0o660), 0, gid)
            st = sock.parent.stat()  # made by the daemon: the group may enter, no one else
            assert (oct(st.st_mode & 0o777), st.st_uid, st.st_gid) == (oct(0o710), 0, gid)
            member = connect_as(sock, NOBODY, gid)
            assert member.returncode == 0, member.stderr
            outsider = connect_as(sock, NOBODY, NOBODY)
            assert outsider.returncode != 0 and "Permission denied" in outsider.stderr
            with GadgetClient(f"unix://{sock}") as c:  # root still reads
                assert c.info("trace_exec").dataSources
        assert not sock.exists(), "the socket outlived the daemon"
    finally:
        shutil.rmtree(base)


def test_an_unknown_socket_group_stops_the_daemon_with_the_reason() -> None:
    d = DaemonProcess("--socket-group", "gp-no-such-group")
    with pytest.raises(RuntimeError, match="socket group 'gp-no-such-group' does not exist"):
        d.start(timeout=30)
    d.close()


# -- TCP, TLS, mutual TLS -------------------------------------------------------------------------


def test_tcp_without_tls_is_refused_unless_insecure() -> None:
    d, _ = tcp_daemon()
    with pytest.raises(RuntimeError) as e:
        d.start(timeout=30)
    d.close()
    assert "TCP needs TLS (--tls-cert/--tls-key) or an explicit --insecure" in str(e.value)
    assert "Traceback" not in str(e.value)  # a message, not a crash

    d, address = tcp_daemon("--insecure")
    with d:
        assert can_read(address, None)


def test_tls_server_certificate(certs: Certs) -> None:
    d, address = tcp_daemon("--tls-cert", str(certs.server_cert), "--tls-key",
                            str(certs.server_key))
    with d:
        assert can_read(address, TLSFiles(str(certs.ca), server_name=SERVER_NAME))
        assert can_read(address, TLSFiles(str(certs.ca)))  # the certificate names 127.0.0.1
        assert not can_read(address, TLSFiles(str(certs.other_ca), server_name=SERVER_NAME),
                            REFUSED_WITHIN)
        assert not can_read(address, None, REFUSED_WITHIN)  # plain text to a TLS port


def test_unreadable_tls_files_stop_the_daemon_with_the_path(certs: Certs,
                                                            tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    d, _ = tcp_daemon("--tls-cert", str(missing), "--tls-key", str(certs.server_key))
    with pytest.raises(RuntimeError) as e:
        d.start(timeout=30)
    d.close()
    assert f"TLS certificate {missing}" in str(e.value) and "Traceback" not in str(e.value)


def test_mutual_tls_refuses_a_client_without_a_certificate(certs: Certs, tmp_path: Path) -> None:
    d, address = tcp_daemon("--tls-cert", str(certs.server_cert), "--tls-key",
                            str(certs.server_key), "--tls-client-ca", str(certs.ca))
    with d:
        assert not can_read(address, TLSFiles(str(certs.ca), server_name=SERVER_NAME),
                            REFUSED_WITHIN)
        mtls = TLSFiles(str(certs.ca), str(certs.client_cert), str(certs.client_key),
                        SERVER_NAME)
        assert can_read(address, mtls)
        # ... and it reads records, not only the gadget's description
        binary = unique_binary(tmp_path)
        with GadgetClient(address, mtls) as c:
            stream = c.run("trace_exec", {"operator.oci.ebpf.comm": binary.name[:15]},
                           timeout_s=30)
            stream.wait_ready()
            with keep_running([str(binary)]):
                got = next(ev for ev in stream if ev.records)
            stream.stop()
            list(stream.raw())
        assert got.records[0]["proc"]["comm"] == binary.name[:15]


def test_go_client_reads_over_mutual_tls(certs: Certs, tmp_path: Path) -> None:
    goclient = goclient_path()
    d, address = tcp_daemon("--tls-cert", str(certs.server_cert), "--tls-key",
                            str(certs.server_key), "--tls-client-ca", str(certs.ca))
    binary = unique_binary(tmp_path)
    base = [str(goclient), "-addr", address.removeprefix("tcp://"), "-image", "trace_exec",
            "-param", f"operator.oci.ebpf.comm={binary.name[:15]}", "-timeout", "30s",
            "-quiet", "-tls-ca", str(certs.ca), "-tls-server-name", SERVER_NAME]
    with d:
        with keep_running([str(binary)]):
            done = subprocess.run([*base, "-tls-cert", str(certs.client_cert), "-tls-key",
                                   str(certs.client_key), "-stop-after", "2"],
                                  capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        assert summary["status"] == "OK" and summary["records"] >= 2
        assert [ds["name"] for ds in summary["datasources"]] == ["exec"]
        refused = subprocess.run([*base, "-connect-timeout", f"{REFUSED_WITHIN}s"],
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0


# -- health and reflection ------------------------------------------------------------------------


def test_health_reports_serving(daemon: DaemonProcess) -> None:
    with grpc.insecure_channel(daemon.address) as ch:
        check = ch.unary_unary("/grpc.health.v1.Health/Check",
                               request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                               response_deserializer=health_pb2.HealthCheckResponse.FromString)
        resp = check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("proto", [reflection_v1, reflection_v1alpha],
                         ids=["v1", "v1alpha"])
def test_reflection_lists_and_describes_the_gadget_services(daemon: DaemonProcess,
                                                            proto: object) -> None:
    pkg = "grpc.reflection.v1" if proto is reflection_v1 else "grpc.reflection.v1alpha"
    req_type = proto.ServerReflectionRequest  # type: ignore[attr-defined]
    resp_type = proto.ServerReflectionResponse  # type: ignore[attr-defined]
    with grpc.insecure_channel(daemon.address) as ch:
        info = ch.stream_stream(f"/{pkg}.ServerReflection/ServerReflectionInfo",
                                request_serializer=req_type.SerializeToString,
                                response_deserializer=resp_type.FromString)
        listed, described = info(iter([
            req_type(list_services=""),
            req_type(file_containing_symbol="api.GadgetManager")]), timeout=10)
    names = {s.name for s in listed.list_services_response.service}
    assert {"api.GadgetManager", "api.BuiltInGadgetManager", "api.GadgetInstanceManager",
            "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto, described


# -- flags over the config ------------------------------------------------------------------------


def test_serve_flags_reach_the_settings(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("daemon:\n  listen: [tcp://127.0.0.1:1]\n  tls:\n    cert: /c.pem\n"
                      "    key: /c.key\n    clientCA: /ca.pem\ninstances: []\n")

    def settings(*flags: str) -> DaemonSettings:
        return settings_from_args(build_parser().parse_args(["serve", "--config", str(config),
                                                              *flags]))

    s = settings()
    assert s.tls is not None and (str(s.tls.cert), str(s.tls.client_ca)) == ("/c.pem", "/ca.pem")
    assert s.insecure is False
    s = settings("--tls-cert", "/s.pem", "--tls-key", "/s.key", "--insecure")
    assert s.tls is not None and (str(s.tls.cert), str(s.tls.key), str(s.tls.client_ca)) == (
        "/s.pem", "/s.key", "/ca.pem")  # the config's client CA is kept
    assert s.insecure is True
    s = settings("--tls-client-ca", "/other-ca.pem")  # alone: mutual TLS over the config's pair
    assert s.tls is not None
    assert (str(s.tls.cert), str(s.tls.client_ca)) == ("/c.pem", "/other-ca.pem")
    with pytest.raises(SystemExit, match="--tls-cert and --tls-key go together"):
        settings("--tls-cert", "/s.pem")
    config.write_text("instances: []\n")
    with pytest.raises(SystemExit, match="--tls-client-ca needs --tls-cert and --tls-key"):
        settings("--tls-client-ca", "/ca.pem")
    s = settings("--tls-cert", "/s.pem", "--tls-key", "/s.key", "--tls-client-ca", "/ca.pem")
    assert s.tls is not None and (str(s.tls.cert), str(s.tls.client_ca)) == ("/s.pem", "/ca.pem")


def test_daemon_keys_for_containers_and_the_compile_queue_reach_the_settings(
        tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("daemon:\n  containerdSocket: /tmp/ctd.sock\n  containerdNamespace: ns1\n"
                      "  compileQueue: 7\n  compileQueuePerClient: 3\ninstances: []\n")

    def settings(*flags: str) -> DaemonSettings:
        return settings_from_args(build_parser().parse_args(["serve", "--config", str(config),
                                                              *flags]))

    s = settings()
    assert (s.containerd_socket, s.containerd_namespace) == ("/tmp/ctd.sock", "ns1")
    assert (s.compile_queue, s.compile_queue_per_client) == (7, 3)
    s = settings("--containerd-socket", "", "--compile-queue", "9")
    assert (s.containerd_socket, s.compile_queue) == ("", 9)  # flags win over the file
    config.write_text("daemon:\n  compileQueue: 0\ninstances: []\n")
    with pytest.raises(SystemExit, match="compileQueue"):
        settings()
