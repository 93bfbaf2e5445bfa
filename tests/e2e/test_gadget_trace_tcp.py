"""trace_tcp end to end: a loopback server and client over IPv4 and IPv6, and a refused
connect; records must carry the exact ports, addresses, fds and the connecting process."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import threading
from dataclasses import dataclass
from datetime import datetime

import pytest

from tests.daemon import DaemonProcess
from tests.e2e.gadget_fields import assert_upstream_fields
from tests.e2e.gadget_run import Record, collect

pytestmark = pytest.mark.bpf


@dataclass(frozen=True)
class Conn:
    """One trigger round: the ports and fds each side used."""

    client_port: int
    server_port: int
    client_fd: int
    listen_fd: int
    accepted_fd: int
    tid: int


def addr_bytes(record: Record, endpoint: str, version: int) -> bytes:
    raw = bytes(record[f"{endpoint}.addr_raw.v6"])
    return raw[:4] if version == 4 else raw


def find(records: list[Record], type_: str, src_port: int, dst_port: int) -> Record | None:
    for r in records:
        if r["type"] == type_.encode() and r["src.port"] == src_port and \
                r["dst.port"] == dst_port:
            return r
    return None


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"),
                                               (socket.AF_INET6, "::1")], ids=["ipv4", "ipv6"])
def test_connect_accept_close_carry_endpoints_fds_and_pid(
        daemon: DaemonProcess, family: socket.AddressFamily, host: str) -> None:
    version = 4 if family == socket.AF_INET else 6
    loopback = ipaddress.ip_address(host).packed
    rounds: list[Conn] = []

    def trigger() -> None:
        with socket.socket(family, socket.SOCK_STREAM) as server:
            server.bind((host, 0))
            server.listen()
            client = socket.socket(family, socket.SOCK_STREAM)
            client.connect(server.getsockname()[:2])
            accepted, _ = server.accept()
            rounds.append(Conn(client.getsockname()[1], server.getsockname()[1],
                               client.fileno(), server.fileno(), accepted.fileno(),
                               threading.get_native_id()))
            client.close()
            # The peer closes once the client's FIN reached it (its read sees the end of the
            # stream): a clean close on both sides, in this order.
            accepted.settimeout(10)
            assert accepted.recv(1) == b""
            accepted.close()

    def complete(rs: list[Record]) -> Conn | None:
        for c in list(rounds):
            if find(rs, "connect", c.client_port, c.server_port) and \
                    find(rs, "accept", c.server_port, c.client_port) and \
                    find(rs, "close", c.client_port, c.server_port) and \
                    find(rs, "close", c.server_port, c.client_port):
                return c
        return None

    _, records = collect(daemon, "trace_tcp", {"operator.oci.ebpf.pid": str(os.getpid())},
                         trigger, lambda rs: complete(rs) is not None)
    c = complete(records)
    assert c is not None, f"no full round in {len(records)} records for {rounds[:3]}"

    connect = find(records, "connect", c.client_port, c.server_port)
    accept = find(records, "accept", c.server_port, c.client_port)
    assert connect is not None and accept is not None
    for r in (connect, accept):
        assert r["src.version"] == r["dst.version"] == version
        assert addr_bytes(r, "src", version) == addr_bytes(r, "dst", version) == loopback
        assert r["src.proto_raw"] == r["dst.proto_raw"] == socket.IPPROTO_TCP
        assert r["proc.pid"] == os.getpid()
        assert r["proc.tid"] == c.tid
        assert r["error_raw"] == 0
        assert r["netns_id"] == os.stat("/proc/self/ns/net").st_ino
    assert connect["type_raw"] == 0 and connect["fd"] == c.client_fd
    assert connect["accept_fd"] == -1
    assert accept["type_raw"] == 1 and accept["fd"] == c.listen_fd
    assert accept["accept_fd"] == c.accepted_fd
    for src, dst in ((c.client_port, c.server_port), (c.server_port, c.client_port)):
        close = find(records, "close", src, dst)
        assert close is not None
        assert close["type_raw"] == 2 and close["proc.pid"] == os.getpid()
        assert addr_bytes(close, "dst", version) == loopback

    # The readable fields upstream derives: addresses as text with their protocol, the
    # endpoint as columns show it, the type's name, no error, the timestamp and user names.
    text = host.encode()
    for r, (src, dst) in ((connect, (c.client_port, c.server_port)),
                          (accept, (c.server_port, c.client_port))):
        assert r["src.addr"] == r["dst.addr"] == text
        assert r["src.proto"] == r["dst.proto"] == b"TCP"
        # As upstream prints it: address, colon, port (no brackets around IPv6 addresses).
        assert r["src.endpoint"] == f"{host}:{src}".encode()
        assert r["dst.endpoint"] == f"{host}:{dst}".encode()
        assert r["error"] == b""
        assert r["proc.creds.user"] == b"root" and r["proc.creds.group"] == b"root"
        # RFC 3339 with nanoseconds (datetime keeps microseconds of them).
        stamp = datetime.fromisoformat(r["timestamp"].decode())
        assert stamp.timestamp() == pytest.approx(r["timestamp_raw"] / 1e9, abs=1e-5)
    assert connect["type"] == b"connect" and accept["type"] == b"accept"


def test_announces_upstreams_fields(daemon: DaemonProcess) -> None:
    assert_upstream_fields(daemon, "trace_tcp", ["src", "dst", "type_raw", "type", "error_raw",
                                                 "fd", "accept_fd", "netns_id"])


def test_refused_connect_reports_econnrefused(daemon: DaemonProcess) -> None:
    # A port nobody listens on: bound and closed again, so the kernel answers with a reset.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    ports: list[int] = []

    def trigger() -> None:
        with socket.socket() as c:
            c.bind(("127.0.0.1", 0))
            ports.append(c.getsockname()[1])
            assert c.connect_ex(("127.0.0.1", dead_port)) == errno.ECONNREFUSED

    _, records = collect(daemon, "trace_tcp", {"operator.oci.ebpf.pid": str(os.getpid()),
                                               "operator.oci.ebpf.failure-only": "true"},
                         trigger, lambda rs: bool(rs))
    assert records, "no failed connect reported"
    r = records[0]
    assert r["type"] == b"connect" and r["error_raw"] == errno.ECONNREFUSED == 111
    assert r["error"] == b"ECONNREFUSED"
    assert r["dst.endpoint"] == f"127.0.0.1:{dead_port}".encode()
    assert r["dst.port"] == dead_port and r["src.port"] in ports
    assert r["proc.pid"] == os.getpid()
    assert all(x["error_raw"] != 0 for x in records), "failure-only let a success through"
