"""trace_dns: DNS queries and responses from a socket filter, parsed in user space per batch.

The BPF program (``program.bpf.c``) runs as a socket filter on an AF_PACKET socket that sees
every packet of the daemon's network namespace, and copies UDP packets from or to port 53 or
5353 into a ring buffer, each behind a fixed header, so records vary in size. This source drains
the ring with :meth:`RingReader.drain_var`, parses IP, UDP and DNS, and builds the ``dns`` data
source's rows (gadget.yaml: the numbers in payload 0) and further payloads: the sender's ``cwd``
and ``exepath`` (``paths=true``), the packet as ``data``, and the texts upstream's WASM module
adds (``id``, ``qr``, ``qtype``, ``name``, ``rcode``, ``addresses``). The readable fields
upstream's formatters add (addresses as text, ``pkt_type``, ``latency_ns``, ...) are derived
(pipeline/derive).

Process attribution: the kernel fills the process (and with ``paths`` its working directory and
executable) only for outgoing packets, which the packet tap sees in the sender's context. Each
outgoing packet teaches which process owns its source endpoint; an incoming packet is
attributed to the owner of its destination endpoint (a response to the querying process, a
query to the server that answered before). Latency is the time from an outgoing query to the
incoming response with the same id to the same endpoint, as upstream measures it. The common
filter params (pid, tid, uid, gid, comm, mntns) are applied here, on the attributed process,
since in the kernel only outgoing packets know theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.batch import Batch
from pipeline.containers.collection import ContainerCollection
from pipeline.containers.selector import ContainerSelector
from pipeline.gadget import BPF_INCLUDE_DIR, EBPF_PREFIX, RUNTIME_PREFIX, GadgetSpec
from pipeline.schema import DataSourceSchema
from pipeline.severity import Severity
from pipeline.sources.base import Emit, Log, SourceError, load_in_thread
from pipeline.sources.drain_pacer import DrainPacer
from pipeline.sources.ringbuf import RingReader, RingWakeups, read_lost
from pipeline.sources.trace_dns.netns import NetnsTaps, follow
from pipeline.sources.tracer import (
    COMPILE_LOCK,
    PAGE,
    boot_to_wall_offset_ns,
    check_environment,
    free_bpf,
    import_bcc,
)

if TYPE_CHECKING:
    from bcc import BPF

_logger = logging.getLogger(__name__)

# struct record's header in program.bpf.c: timestamp, gadget_process, ifindex, copied,
# pkt_type, has_proc, l4_off, version, padding, netns; with paths the sender's cwd and
# executable (PATH_MAX each) follow; then the packet, from its IP header.
RECORD_HEADER = struct.Struct("<Q64sIHBBHBxI")
PATH_MAX = 512  # GADGET_PATH_MAX, bpf/gadget_path.h
SO_ATTACH_BPF = 50  # include/uapi/asm-generic/socket.h; not exported by the socket module
ETH_P_ALL = 0x0003
PKT_OUTGOING = 4
# Upstream's names (its WASM module trims Go's dnsmessage constants).
QTYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
          33: "SRV", 41: "OPT", 11: "WKS", 13: "HINFO", 14: "MINFO", 252: "AXFR", 255: "ALL"}
RCODES = {0: "Success", 1: "FormatError", 2: "ServerFailure", 3: "NameError",
          4: "NotImplemented", 5: "Refused"}
FILTER_KEYS = ("pid", "tid", "uid", "gid", "comm", "mntns")
TABLE_LIMIT = 4096  # endpoints and pending queries remembered, oldest forgotten first
DRAIN_CHUNK = 4096  # records parsed per step of the event loop
_DNS_HEADER = struct.Struct(">HHHHHH")
_RR_FIXED = struct.Struct(">HHIH")  # type, class, ttl, rdlength


class DnsError(ValueError):
    """A packet that does not hold a well-formed DNS message."""


@dataclass(frozen=True, slots=True)
class DnsMessage:
    id: int
    qr: bool
    tc: bool
    rd: bool
    ra: bool
    rcode: int
    qtype: int | None  # of the first question, None without one
    name: bytes  # of the first question, in presentation form with the trailing dot
    addresses: list[str] = field(default_factory=list)  # A and AAAA answers
    num_answers: int = 0


def read_name(buf: bytes, off: int) -> tuple[bytes, int]:
    """The name at ``off`` (following compression pointers) and the offset after it."""
    labels: list[bytes] = []
    end = -1
    jumps = 0
    length = 0
    while True:
        if off >= len(buf):
            raise DnsError("name runs past the message")
        n = buf[off]
        if n & 0xC0 == 0xC0:
            if off + 1 >= len(buf):
                raise DnsError("truncated compression pointer")
            if end < 0:
                end = off + 2
            jumps += 1
            if jumps > 32:
                raise DnsError("compression pointer loop")
            off = ((n & 0x3F) << 8) | buf[off + 1]
            continue
        if n & 0xC0:
            raise DnsError(f"unsupported label type 0x{n:02x}")
        off += 1
        if n == 0:
            break
        label = buf[off: off + n]
        if len(label) != n:
            raise DnsError("label runs past the message")
        length += n + 1
        if length > 255:
            raise DnsError("name longer than 255 bytes")
        labels.append(label)
        off += n
    # As Go's dnsmessage.Name.String(): labels joined by dots, with the root's trailing dot.
    return b".".join(labels) + b".", end if end >= 0 else off


def parse_dns(buf: bytes) -> DnsMessage:
    """The header, first question and A/AAAA answers of the DNS message ``buf``."""
    if len(buf) < _DNS_HEADER.size:
        raise DnsError("shorter than a DNS header")
    ident, flags, qdcount, ancount, _, _ = _DNS_HEADER.unpack_from(buf)
    off = _DNS_HEADER.size
    qtype: int | None = None
    name = b""
    for i in range(qdcount):
        qname, off = read_name(buf, off)
        if off + 4 > len(buf):
            raise DnsError("truncated question")
        if i == 0:
            name, qtype = qname, int.from_bytes(buf[off: off + 2], "big")
        off += 4
    addresses: list[str] = []
    for _ in range(ancount):
        _, off = read_name(buf, off)
        if off + _RR_FIXED.size > len(buf):
            raise DnsError("truncated resource record")
        rtype, _, _, rdlength = _RR_FIXED.unpack_from(buf, off)
        off += _RR_FIXED.size
        rdata = buf[off: off + rdlength]
        if len(rdata) != rdlength:
            raise DnsError("resource data runs past the message")
        off += rdlength
        if rtype == 1 and rdlength == 4:
            addresses.append(str(ipaddress.IPv4Address(rdata)))
        elif rtype == 28 and rdlength == 16:
            addresses.append(str(ipaddress.IPv6Address(rdata)))
    return DnsMessage(id=ident, qr=bool(flags & 0x8000), tc=bool(flags & 0x0200),
                      rd=bool(flags & 0x0100), ra=bool(flags & 0x0080), rcode=flags & 0xF,
                      qtype=qtype, name=name, addresses=addresses, num_answers=ancount)


Endpoint = tuple[int, bytes, int]
"""(IP version, 16-byte address, port): a socket's address as a table key."""


@dataclass(frozen=True, slots=True)
class Packet:
    """One captured packet: the kernel header and what its IP and UDP headers say."""

    boot_ns: int
    proc: bytes  # 64 bytes of struct gadget_process, zeros when unknown
    has_proc: bool
    pkt_type: int
    src: Endpoint
    dst: Endpoint
    dns_off: int
    data_len: int
    dns: bytes
    packet: bytes  # from the IP header on: the ``data`` field
    paths: tuple[bytes, bytes] = (b"", b"")  # the sender's cwd and executable (paths=true)
    netns: int = 0  # the container namespace's socket that saw it; 0: the daemon's


def parse_record(rec: bytes, paths: bool = False) -> Packet:
    """A ring record: the kernel's header (with the sender's paths when ``paths``), then the
    packet from its IP header."""
    boot_ns, proc, _, copied, pkt_type, has_proc, l4_off, version, netns = \
        RECORD_HEADER.unpack_from(rec)
    start = RECORD_HEADER.size
    cwd_exe = (b"", b"")
    if paths:
        cwd_exe = (rec[start: start + PATH_MAX].partition(b"\0")[0],
                   rec[start + PATH_MAX: start + 2 * PATH_MAX].partition(b"\0")[0])
        start += 2 * PATH_MAX
    pkt = rec[start: start + copied]
    if version == 4:
        if len(pkt) < 20:
            raise DnsError("truncated IPv4 header")
        saddr, daddr = pkt[12:16].ljust(16, b"\0"), pkt[16:20].ljust(16, b"\0")
        data_len = int.from_bytes(pkt[2:4], "big")
    else:
        if len(pkt) < 40:
            raise DnsError("truncated IPv6 header")
        saddr, daddr = pkt[8:24], pkt[24:40]
        data_len = 40 + int.from_bytes(pkt[4:6], "big")
    if len(pkt) < l4_off + 8:
        raise DnsError("truncated UDP header")
    sport, dport = struct.unpack_from(">HH", pkt, l4_off)
    dns_off = l4_off + 8
    return Packet(boot_ns=boot_ns, proc=proc if has_proc else bytes(64), has_proc=bool(has_proc),
                  pkt_type=pkt_type, src=(version, saddr, sport), dst=(version, daddr, dport),
                  dns_off=dns_off, data_len=data_len, dns=pkt[dns_off:], packet=pkt,
                  paths=cwd_exe if has_proc else (b"", b""), netns=netns)


class _Bounded(OrderedDict[Any, Any]):
    """A dict that forgets its oldest entries beyond ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


class Correlator:
    """Process attribution and latency, across batches (see the module docstring)."""

    def __init__(self, limit: int = TABLE_LIMIT) -> None:
        self._owners = _Bounded(limit)  # endpoint -> (proc bytes, (cwd, exepath))
        self._queries = _Bounded(limit)  # (client endpoint, id) -> boot ns of the query

    def owner_of(self, p: Packet) -> tuple[bytes, tuple[bytes, bytes]]:
        """The process of the packet (its gadget_process block) and its paths. Endpoints are
        per network namespace: 127.0.0.1:53 in two containers are two."""
        if p.has_proc:
            self._owners.put((p.netns, p.src), (p.proc, p.paths))
            return p.proc, p.paths
        owner: tuple[bytes, tuple[bytes, bytes]] | None = self._owners.get((p.netns, p.dst))
        return owner if owner is not None else (bytes(64), (b"", b""))

    def latency(self, p: Packet, msg: DnsMessage) -> int:
        if not msg.qr and p.pkt_type == PKT_OUTGOING:
            key = (p.netns, p.src, msg.id)
            self._queries.setdefault(key, p.boot_ns)
            self._queries.move_to_end(key)
            while len(self._queries) > self._queries.limit:
                self._queries.popitem(last=False)
        elif msg.qr and p.pkt_type == 0:  # a response arriving (PACKET_HOST)
            sent = self._queries.pop((p.netns, p.dst, msg.id), None)
            if sent is not None and sent < p.boot_ns:
                return int(p.boot_ns - sent)
        return 0


# The row layout, in gadget.yaml's struct order: (field, struct format). The packer below places
# each at the offset the data source announces, so the two cannot drift apart.
ROW_FIELDS: tuple[tuple[str, str], ...] = (
    ("timestamp_raw", "Q"),
    ("src.addr_raw", "16s"), ("src.port", "H"), ("src.proto_raw", "H"), ("src.version", "B"),
    ("dst.addr_raw", "16s"), ("dst.port", "H"), ("dst.proto_raw", "H"), ("dst.version", "B"),
    ("nameserver.addr_raw", "16s"), ("nameserver.version", "B"),
    ("netns_id", "I"), ("proc", "64s"), ("pkt_type_raw", "B"), ("latency_ns_raw", "Q"),
    ("dns_off", "H"), ("data_len", "I"),
    # The numbers the DNS message says (DnsFields.numbers, in this order).
    ("qr_raw", "?"), ("qtype_raw", "H"), ("rcode_raw", "H"), ("num_answers", "i"),
    ("tc", "?"), ("ra", "?"), ("rd", "?"),
)
PAYLOADS = ("cwd", "exepath", "data", "id", "qr", "qtype", "name", "rcode", "addresses")
"""The further payloads the source fills, in gadget.yaml's order (DnsFields.texts after the
process's paths and the packet)."""


def row_struct(schema: DataSourceSchema) -> struct.Struct:
    """One little-endian Struct packing a whole row at the schema's field offsets."""
    fmt = "<"
    pos = 0
    for name, code in ROW_FIELDS:
        f = schema.field(name)
        if f.offs < pos:
            raise ValueError(f"trace_dns: field {name} at {f.offs} overlaps the previous one")
        if struct.calcsize("<" + code) != f.size:
            raise ValueError(f"trace_dns: field {name} is {f.size} bytes, packed as {code!r}")
        fmt += f"{f.offs - pos}x{code}" if f.offs > pos else code
        pos = f.offs + f.size
    if schema.record_size > pos:
        fmt += f"{schema.record_size - pos}x"
    packer = struct.Struct(fmt)
    assert packer.size == schema.record_size
    return packer


class DnsFields:
    """The DNS part of a record, computed once per distinct message (a packet seen leaving and
    arriving on loopback is the same message twice): the numbers that go in the row and the
    texts that are payloads of their own, as upstream's WASM module sets them."""

    __slots__ = ("msg", "numbers", "texts")

    def __init__(self, msg: DnsMessage | None) -> None:
        self.msg = msg
        self.numbers: tuple[Any, ...]
        self.texts: tuple[bytes, ...]
        if msg is None:  # not DNS: upstream still emits the packet, without these fields
            self.numbers = (False, 0, 0, 0, False, False, False)
            self.texts = (b"",) * 6
            return
        qtype = msg.qtype or 0
        self.numbers = (msg.qr, qtype, msg.rcode if msg.qr else 0, msg.num_answers, msg.tc,
                        msg.ra, msg.rd)
        self.texts = (
            f"{msg.id:04x}".encode(), b"R" if msg.qr else b"Q",
            QTYPES.get(qtype, str(qtype)).encode() if msg.qtype is not None else b"",
            msg.name, RCODES.get(msg.rcode, str(msg.rcode)).encode() if msg.qr else b"",
            ",".join(msg.addresses).encode())


class DnsSource:
    """Source for trace_dns: socket filter, variable-size ring records, DNS parsed per batch."""

    def __init__(self, spec: GadgetSpec, values: Mapping[str, Any]) -> None:
        self._paths = bool(values.get(EBPF_PREFIX + "paths"))
        self._spec = spec
        self._schema = spec.datasources[0]
        self._packer = row_struct(self._schema)
        self._interval = float(values.get(RUNTIME_PREFIX + "drain-interval") or 0.01)
        self._pacer = DrainPacer.from_values(self._interval, values)
        ring = _ring_pages(int(values.get(RUNTIME_PREFIX + "ringbuf-size") or 8 << 20))
        fill = int(values.get(RUNTIME_PREFIX + "wakeup-fill") or 25)
        from pipeline.sources.btf import gadget_cflags

        # No GADGET_FILTER_* here: the filters apply to the attributed process, in user space.
        self._cflags = [f"-I{BPF_INCLUDE_DIR}", f"-DGADGET_RING_PAGES={ring}",
                        f"-DGADGET_WAKEUP_BYTES={ring * PAGE * fill // 100}",
                        f"-DGADGET_PATHS={int(self._paths)}", *gadget_cflags()]
        self._keep = _proc_filter({k: values.get(EBPF_PREFIX + k) for k in FILTER_KEYS})
        self._netns = os.stat("/proc/self/ns/net").st_ino
        self._correlator = Correlator()
        self._parsed = _Bounded(1024)  # DNS message bytes -> DnsFields
        self._bpf: BPF | None = None
        self._sock: socket.socket | None = None
        self._reader: RingReader | None = None
        self._wakeups: RingWakeups | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._emit: Emit | None = None
        self._log: Log | None = None
        self._ts_offset = 0
        self._lost_base = 0
        self._malformed = 0
        self._dispatch_fd = -1
        self._follow_stop: Callable[[], None] | None = None

    async def start(self, emit: Emit, log: Log) -> None:
        check_environment()
        self._emit, self._log = emit, log
        self._bpf = await load_in_thread(self._load, self._free_abandoned)
        self._ts_offset = boot_to_wall_offset_ns()
        assert self._reader is not None
        # Forced wake-ups through an edge-triggered epoll, as the tracer does: the ring's own
        # fd stays readable while any record is pending, which would busy-loop the drain.
        self._wakeups = RingWakeups([self._reader.fileno()])
        asyncio.get_running_loop().add_reader(self._wakeups.fileno(), self._on_wakeup)
        self._task = asyncio.create_task(self._pump(), name=f"drain:{self._spec.name}")

    def _free_abandoned(self, bpf: BPF) -> None:
        """Frees a load whose start was cancelled (see load_in_thread)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        free_bpf(bpf)

    def _load(self) -> BPF:
        bcc = import_bcc()
        try:
            with COMPILE_LOCK:  # libbcc's clang is not thread-safe
                bpf = bcc.BPF(src_file=str(self._spec.program).encode(), cflags=self._cflags)
            fn = bpf.load_func(b"dns_filter", bcc.BPF.SOCKET_FILTER)
        except Exception as e:  # bcc raises bare Exception for every failure
            raise SourceError(f"gadget {self._spec.name}: loading {self._spec.program.name} "
                              f"failed: {e} (clang/verifier output is in the daemon log)") from e
        try:
            try:
                # Unbound: the socket sees every interface of the daemon's network namespace.
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                     socket.htons(ETH_P_ALL))
            except OSError as e:
                raise SourceError(f"gadget {self._spec.name}: hook socket filter: cannot open "
                                  f"an AF_PACKET socket: {e}") from e
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, fn.fd)
            except OSError as e:
                sock.close()
                raise SourceError(f"gadget {self._spec.name}: hook socket filter: "
                                  f"SO_ATTACH_BPF failed: {e}") from e
            self._sock = sock
            self._reader = RingReader(bpf[b"events"].get_fd(), None)
            # Containers' namespaces reach the filter through their dispatchers (netns.py).
            dispatch = bpf[b"gadget_dns_dispatch"]
            dispatch[dispatch.Key(0)] = dispatch.Leaf(fn.fd)
            self._dispatch_fd = dispatch.get_fd()
        except BaseException:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            free_bpf(bpf)
            raise
        return bpf

    def follow_containers(self, collection: ContainerCollection,
                          selector: ContainerSelector) -> Callable[[], None]:
        """Also sees the network namespaces of the (selected) containers, as they come and
        go (netns.py); returns the function that stops it."""
        if self._dispatch_fd < 0 or self._log is None:
            return lambda: None
        taps = NetnsTaps(self._dispatch_fd, self._netns, self._log)
        self._follow_stop = follow(taps, collection, selector)
        return self._stop_following

    def _stop_following(self) -> None:
        if self._follow_stop is not None:
            self._follow_stop()
            self._follow_stop = None

    def _on_wakeup(self) -> None:
        if self._wakeups is not None:
            self._wakeups.consume()
        self._pacer.woken()
        self._wake.set()

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._emit is not None
        while not self._stopping:
            self._wake.clear()  # a wake-up while parsing drains again at once
            due = self._reader is None or self._pacer.due((self._reader,), loop.time())
            while due and not self._stopping:
                drained, batch = self._drain_once()
                if batch is not None:
                    await self._emit(batch)
                if drained < DRAIN_CHUNK:
                    break
                # Parsing is Python work on the event loop: let the stream writers run
                # between chunks of a backlog.
                await asyncio.sleep(0)
            handle = loop.call_later(self._interval, self._wake.set)
            await self._wake.wait()
            handle.cancel()

    def _drain_once(self) -> tuple[int, Batch | None]:
        """How many records were drained (at most DRAIN_CHUNK), and the batch they made."""
        if self._reader is None:
            return 0, None
        records = self._reader.drain_var(DRAIN_CHUNK)
        rows, payloads = self.rows(records) if records else ([], ())
        if not rows:
            return len(records), None
        data = np.frombuffer(bytearray(b"".join(rows)), dtype=np.uint8)
        return len(records), Batch(self._schema, data.reshape(len(rows), self._packer.size),
                                   payloads)

    def rows(self, records: list[bytes]) -> tuple[list[bytes], tuple[list[bytes], ...]]:
        """Rows in the data source's layout for the records that pass the filters, and the
        further payloads (PAYLOADS) of each."""
        out = []
        cols: tuple[list[bytes], ...] = tuple([] for _ in PAYLOADS)
        cwd, exepath, data, ident, qr, qtype, name, rcode, addresses = cols
        pack = self._packer.pack
        udp = socket.IPPROTO_UDP
        for rec in records:
            try:
                p = parse_record(rec, self._paths)
            except DnsError as e:
                self._count_malformed(str(e))
                continue
            proc, (proc_cwd, proc_exe) = self._correlator.owner_of(p)
            if not self._keep(proc):
                continue
            dns = self._dns_fields(p.dns)
            latency = self._correlator.latency(p, dns.msg) if dns.msg is not None else 0
            ns = p.src if dns.msg is not None and dns.msg.qr else p.dst
            out.append(pack(
                p.boot_ns + self._ts_offset,
                p.src[1], p.src[2], udp, p.src[0], p.dst[1], p.dst[2], udp, p.dst[0],
                ns[1] if dns.msg is not None else bytes(16), ns[0] if dns.msg is not None else 0,
                p.netns or self._netns, proc, p.pkt_type, latency, p.dns_off, p.data_len,
                *dns.numbers))
            cwd.append(proc_cwd)
            exepath.append(proc_exe)
            data.append(p.packet)
            for col, text in zip((ident, qr, qtype, name, rcode, addresses), dns.texts,
                                 strict=True):
                col.append(text)
        return out, cols

    def _dns_fields(self, payload: bytes) -> DnsFields:
        cached: DnsFields | None = self._parsed.get(payload)
        if cached is not None:
            return cached
        try:
            fields = DnsFields(parse_dns(payload))
        except DnsError as e:
            self._count_malformed(str(e))
            fields = DnsFields(None)
        self._parsed.put(payload, fields)
        return fields

    def _count_malformed(self, why: str) -> None:
        # Port 53/5353 also carries non-DNS traffic now and then: say so, but not per packet.
        self._malformed += 1
        n = self._malformed
        if self._log is not None and (n in (1, 10, 100) or n % 1000 == 0):
            self._log(Severity.WARN, f"trace_dns: {n} packet(s) not parsed as DNS (latest: {why})")

    async def wait(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)

    def lost(self) -> int:
        if self._bpf is None:
            return self._lost_base
        return read_lost(self._bpf[b"gadget_lost"], 1)

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        # Closing the packet sockets detaches the filter; then hand on what the ring holds.
        self._stop_following()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        bpf, self._bpf = self._bpf, None
        if bpf is None:
            return
        try:
            while self._emit is not None:
                drained, batch = self._drain_once()
                if batch is not None:
                    await self._emit(batch)
                if drained < DRAIN_CHUNK:
                    break
            self._lost_base = read_lost(bpf[b"gadget_lost"], 1)
        finally:
            if self._wakeups is not None:
                asyncio.get_running_loop().remove_reader(self._wakeups.fileno())
                self._wakeups.close()
                self._wakeups = None
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            free_bpf(bpf)

    def extra_info(self) -> Mapping[str, tuple[str, bytes]]:
        return {
            "ebpf.source": ("text/plain", self._spec.program.read_bytes()),
            "ebpf.cflags": ("text/plain", " ".join(self._cflags).encode()),
        }


def _ring_pages(size: int) -> int:
    pages = max(1, size // PAGE)
    return 1 << (pages - 1).bit_length()  # the kernel wants a power of two


def _field_equals(fmt: str, offs: int, want: int) -> Callable[[bytes], bool]:
    return lambda proc: bool(struct.unpack_from(fmt, proc, offs)[0] == want)


def _proc_filter(wanted: Mapping[str, Any]) -> Callable[[bytes], bool]:
    """A predicate over a gadget_process block for the common filter params that are set."""
    checks: list[Callable[[bytes], bool]] = []
    for key, fmt, offs in (("pid", "<I", 16), ("tid", "<I", 20), ("mntns", "<Q", 24),
                           ("uid", "<I", 32), ("gid", "<I", 36)):
        value = wanted.get(key)
        if value is None or value == "":
            continue
        checks.append(_field_equals(fmt, offs, int(value)))
    comm = wanted.get("comm")
    if comm:
        # The kernel keeps 15 characters of a comm; a longer filter is compared by its first 15.
        want_comm = str(comm).encode()[:15]
        checks.append(lambda p: p[:16].split(b"\0", 1)[0] == want_comm)
    if not checks:
        return lambda p: True
    return lambda p: all(c(p) for c in checks)


def make_source(spec: GadgetSpec, values: Mapping[str, Any]) -> DnsSource:
    return DnsSource(spec, values)
