"""trace_dns end to end: A queries for a unique name against a dnsmasq the test starts on
127.0.0.1:53; the query and the response must carry the name, type, code, address, latency and
the querying process."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess
from tests.e2e.gadget_run import Record, collect, ipv4
from tests.e2e.upstream_fields import upstream_field_diff

pytestmark = pytest.mark.bpf

ANSWER = "10.1.2.3"


def query(name: str, ident: int, qtype: int = 1) -> bytes:
    """A DNS query (RD set) for ``name``."""
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split("."))
    return struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0) + qname + b"\0" + \
        struct.pack(">HH", qtype, 1)


def ask(name: str, ident: int) -> tuple[int, bytes]:
    """Sends one query to 127.0.0.1:53; returns our port and the response."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(query(name, ident), ("127.0.0.1", 53))
        resp, _ = s.recvfrom(4096)
        return s.getsockname()[1], resp


@pytest.fixture()
def dns_name() -> Iterator[str]:
    """A unique name that a dnsmasq on 127.0.0.1:53 answers with ANSWER; fails (never skips)
    when dnsmasq is missing or cannot serve."""
    name = f"gp-{uuid.uuid4().hex[:12]}.test"
    exe = shutil.which("dnsmasq")
    assert exe, "dnsmasq is not installed (apt-get install -y dnsmasq-base)"
    proc = subprocess.Popen(
        [exe, "--no-daemon", "--port=53", "--listen-address=127.0.0.1", "--bind-interfaces",
         "--no-resolv", "--no-hosts", f"--address=/{name}/{ANSWER}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                raise AssertionError(f"dnsmasq exited with {proc.returncode}: {out}")
            try:
                _, resp = ask(name, 1)
                if resp[3] & 0xF == 0:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "dnsmasq did not answer within 10 s"
            time.sleep(0.1)
        yield name
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_query_and_response_carry_name_type_code_addresses_latency_and_pid(
        daemon: DaemonProcess, dns_name: str) -> None:
    fqdn = (dns_name + ".").encode()
    asked: list[tuple[int, int]] = []  # (our port, id)
    tids: set[int] = set()
    counter = iter(range(0x100, 0x10000))

    def trigger() -> None:
        ident = next(counter)
        tids.add(threading.get_native_id())
        port, resp = ask(dns_name, ident)
        assert resp[:2] == struct.pack(">H", ident)
        asked.append((port, ident))

    def pair(rs: list[Record]) -> tuple[Record, Record] | None:
        for port, ident in list(asked):
            q = [r for r in rs if r["src.port"] == port and r["qr"] == b"Q" and
                 r["pkt_type"] == b"OUTGOING" and r["id"] == f"{ident:04x}".encode()]
            a = [r for r in rs if r["dst.port"] == port and r["qr"] == b"R" and
                 r["pkt_type"] == b"HOST" and r["id"] == f"{ident:04x}".encode()]
            if q and a:
                return q[0], a[0]
        return None

    _, records = collect(daemon, "trace_dns", {"operator.oci.ebpf.pid": str(os.getpid())},
                         trigger, lambda rs: pair(rs) is not None)
    found = pair(records)
    assert found, f"no query/response pair among {len(records)} records for {asked[:3]}"
    q, a = found
    for r in (q, a):
        assert r["name"] == fqdn
        assert r["qtype_raw"] == 1 and r["qtype"] == b"A"
        assert r["proc.pid"] == os.getpid()  # the response too: attributed to the asker
        assert r["proc.tid"] in tids
        assert ipv4(r, "nameserver") == "127.0.0.1" and r["nameserver.version"] == 4
        assert r["src.proto_raw"] == socket.IPPROTO_UDP
    assert q["dst.port"] == 53 and ipv4(q, "dst") == "127.0.0.1"
    assert q["qr_raw"] is False and q["rd"] is True and q["latency_ns_raw"] == 0
    assert a["src.port"] == 53
    assert a["qr_raw"] is True
    assert a["rcode_raw"] == 0 and a["rcode"] == b"Success"  # NOERROR
    assert ANSWER in a["addresses"].decode().split(",")
    assert a["num_answers"] == 1
    assert 0 < a["latency_ns_raw"] < 2_000_000_000
    assert a["latency_ns"].endswith((b"s",))
    assert a["timestamp_raw"] >= q["timestamp_raw"]
    assert abs(a["timestamp_raw"] / 1e9 - time.time()) < 60, "timestamp is not wall-clock"
    # What upstream's formatters derive: addresses as text, protocols, endpoints, the
    # direction's name, the latency as text.
    assert q["src.addr"] == q["dst.addr"] == a["nameserver.addr"] == b"127.0.0.1"
    assert q["src.proto"] == a["dst.proto"] == b"UDP"
    assert q["dst.endpoint"] == b"127.0.0.1:53" and a["src.endpoint"] == b"127.0.0.1:53"
    assert q["src.endpoint"] == f"127.0.0.1:{q['src.port']}".encode()
    assert q["pkt_type"] == b"OUTGOING" and a["pkt_type"] == b"HOST"
    ms = a["latency_ns_raw"] / 1e6
    assert a["latency_ns"] == (f"{ms:.2f}ms".encode() if ms >= 1 else
                               f"{a['latency_ns_raw'] / 1e3:.2f}µs".encode())
    assert q["latency_ns"] == b"0ns"
    # The packet itself, from its IP header (json.skip and hidden, as upstream's).
    assert a["data"][0] >> 4 == 4 and len(a["data"]) == a["data_len"]
    assert a["data"][a["dns_off"]:a["dns_off"] + 2] == struct.pack(">H", int(a["id"], 16))
    assert a["proc.creds.user"] == b"root" and a["cwd"] == b"" and a["exepath"] == b""
    # The pid filter applies to the attributed process: dnsmasq's own packets never pass.
    assert {r["proc.pid"] for r in records} == {os.getpid()}


def test_paths_name_the_querying_process_cwd_and_executable(daemon: DaemonProcess,
                                                           dns_name: str) -> None:
    counter = iter(range(0x100, 0x10000))
    asked: list[int] = []

    def trigger() -> None:
        port, _ = ask(dns_name, next(counter))
        asked.append(port)

    def mine(rs: list[Record]) -> list[Record]:
        return [r for r in rs if r["src.port"] in asked or r["dst.port"] in asked]

    _, records = collect(daemon, "trace_dns", {"operator.oci.ebpf.pid": str(os.getpid()),
                                               "operator.oci.ebpf.paths": "true"},
                         trigger, lambda rs: len({r["qr"] for r in mine(rs)}) == 2)
    got = mine(records)
    assert {r["qr"] for r in got} == {b"Q", b"R"}
    for r in got:  # the response too: attributed to the asker, paths included
        assert r["cwd"] == os.getcwd().encode()
        assert r["exepath"] == str(Path(sys.executable).resolve()).encode()


def test_announces_every_field_upstream_does(daemon: DaemonProcess) -> None:
    diff = upstream_field_diff("trace_dns", daemon)
    assert not diff.sources_only_upstream and not diff.sources_only_ours, diff.report()
    d = diff.sources["dns"]
    # k8s.* and runtime.* come from the container enrichment (pipeline/operators/enrich.py).
    missing = [n for n in d.only_upstream if not n.startswith(("k8s", "runtime"))]
    assert not missing and not d.only_ours, diff.report()
    assert not d.kinds and not d.flags and not d.annotations, diff.report()
