"""trace_bind end to end: IPv4 and IPv6 binds with socket options, and a failed bind."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import threading

import pytest

from tests.daemon import DaemonProcess
from tests.e2e.gadget_fields import assert_upstream_fields
from tests.e2e.gadget_run import Record, collect

pytestmark = pytest.mark.bpf

OPT_FREEBIND, OPT_REUSEADDRESS, OPT_REUSEPORT = 0x1, 0x8, 0x10
IP_FREEBIND = 15


def by_port(records: list[Record], port: int, version: int) -> list[Record]:
    return [r for r in records if r["addr.port"] == port and r["addr.version"] == version]


def test_ipv4_and_ipv6_binds_carry_address_port_protocol_and_options(
        daemon: DaemonProcess) -> None:
    bound: list[tuple[int, int, int]] = []  # (tcp v4 port, udp v6 port, freebind port)
    tids: set[int] = set()

    def trigger() -> None:
        tids.add(threading.get_native_id())
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp4, \
                socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp6, \
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as free:
            tcp4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp4.bind(("127.0.0.1", 0))  # port 0: the record shows the port the kernel chose
            udp6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            udp6.bind(("::1", 0))
            free.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            free.bind(("192.0.2.77", 0))  # TEST-NET-1: not local, allowed only with FREEBIND
            bound.append((tcp4.getsockname()[1], udp6.getsockname()[1], free.getsockname()[1]))

    def done(rs: list[Record]) -> bool:
        return any(by_port(rs, a, 4) and by_port(rs, b, 6) and by_port(rs, c, 4)
                   for a, b, c in list(bound))

    _, records = collect(daemon, "trace_bind", {"operator.oci.ebpf.pid": str(os.getpid())},
                         trigger, done)
    assert done(records), f"missing binds for {bound[:3]} in {len(records)} records"
    a, b, c = next(p for p in bound if by_port(records, p[0], 4) and by_port(records, p[1], 6)
                   and by_port(records, p[2], 4))

    tcp4 = by_port(records, a, 4)[0]
    assert bytes(tcp4["addr.addr_raw.v6"][:4]) == ipaddress.IPv4Address("127.0.0.1").packed
    assert tcp4["addr.proto_raw"] == socket.IPPROTO_TCP
    assert tcp4["opts_raw"] == OPT_REUSEADDRESS
    udp6 = by_port(records, b, 6)[0]
    assert bytes(udp6["addr.addr_raw.v6"]) == ipaddress.IPv6Address("::1").packed
    assert udp6["addr.proto_raw"] == socket.IPPROTO_UDP
    assert udp6["opts_raw"] == OPT_REUSEPORT
    free = by_port(records, c, 4)[0]
    assert bytes(free["addr.addr_raw.v6"][:4]) == ipaddress.IPv4Address("192.0.2.77").packed
    assert free["opts_raw"] == OPT_FREEBIND
    for r in (tcp4, udp6, free):
        assert r["error_raw"] == 0 and r["bound_dev_if"] == 0
        assert r["proc.pid"] == os.getpid() and r["proc.tid"] in tids

    # The readable fields upstream derives: the address as text with its protocol, the
    # endpoint, the option names (a bit set joined by "|"), no error.
    assert (tcp4["addr.addr"], tcp4["addr.proto"], tcp4["opts"]) == \
        (b"127.0.0.1", b"TCP", b"REUSEADDRESS")
    assert tcp4["addr.endpoint"] == f"127.0.0.1:{a}".encode()
    assert (udp6["addr.addr"], udp6["addr.proto"], udp6["opts"]) == (b"::1", b"UDP", b"REUSEPORT")
    assert udp6["addr.endpoint"] == f"::1:{b}".encode()
    assert (free["addr.addr"], free["opts"]) == (b"192.0.2.77", b"FREEBIND")
    assert all(r["error"] == b"" for r in (tcp4, udp6, free))


def test_several_options_are_joined_in_enum_order(daemon: DaemonProcess) -> None:
    ports: list[int] = []

    def trigger() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])

    _, records = collect(daemon, "trace_bind", {"operator.oci.ebpf.pid": str(os.getpid())},
                         trigger, lambda rs: any(by_port(rs, p, 4) for p in list(ports)))
    r = next(by_port(records, p, 4)[0] for p in ports if by_port(records, p, 4))
    assert r["opts_raw"] == OPT_FREEBIND | OPT_REUSEADDRESS | OPT_REUSEPORT
    assert r["opts"] == b"FREEBIND|REUSEADDRESS|REUSEPORT"


def test_announces_upstreams_fields(daemon: DaemonProcess) -> None:
    assert_upstream_fields(daemon, "trace_bind",
                           ["addr", "error_raw", "opts_raw", "opts", "bound_dev_if"])


def test_failed_bind_reported_with_ignore_errors_false(daemon: DaemonProcess) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    taken = holder.getsockname()[1]

    def trigger() -> None:
        with socket.socket() as s, pytest.raises(OSError) as e:
            s.bind(("127.0.0.1", taken))
        assert e.value.errno == errno.EADDRINUSE

    try:
        _, records = collect(daemon, "trace_bind",
                             {"operator.oci.ebpf.pid": str(os.getpid()),
                              "operator.oci.ebpf.ignore-errors": "false"},
                             trigger, lambda rs: bool(by_port(rs, taken, 4)))
    finally:
        holder.close()
    failed = by_port(records, taken, 4)
    assert failed, "the failed bind was not reported"
    assert failed[0]["error_raw"] == errno.EADDRINUSE == 98
    assert bytes(failed[0]["addr.addr_raw.v6"][:4]) == bytes([127, 0, 0, 1])
    assert failed[0]["addr.proto_raw"] == socket.IPPROTO_TCP
    assert failed[0]["error"] == b"EADDRINUSE"
    assert failed[0]["addr.endpoint"] == f"127.0.0.1:{taken}".encode()
