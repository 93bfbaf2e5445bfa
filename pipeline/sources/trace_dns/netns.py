"""trace_dns in containers' network namespaces: one packet socket per namespace.

An AF_PACKET socket sees the interfaces of the network namespace it was created in, so the
daemon's own socket misses traffic inside containers (each has its own namespace, often only a
loopback). For each container network namespace the source opens another socket there and
attaches a tiny dispatcher program to it, as upstream's network tracer does
(``pkg/networktracer``): the dispatcher writes the namespace's inode into ``skb->cb[0]`` and
tail-calls the gadget's filter through a one-entry program array, and the filter copies
``cb[0]`` into the record, so each record names its namespace. (The kernel zeroes ``cb`` before a
filter that reads it runs, so on the daemon's own socket, where the filter is attached
directly, it reads 0 and the record gets the daemon's namespace.)

The dispatcher is seven instructions, assembled here and loaded with the bpf() syscall, once
per namespace: the inode is an immediate, so nothing is compiled per container. A socket is
created inside a namespace by a short-lived thread that enters it (setns affects only the
calling thread), so the event loop's thread never leaves the daemon's namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable

from pipeline.containers.collection import ContainerCollection, ContainerEvent, EventKind
from pipeline.containers.model import Container
from pipeline.containers.selector import ContainerSelector
from pipeline.severity import Severity

_logger = logging.getLogger(__name__)

SO_ATTACH_BPF = 50  # include/uapi/asm-generic/socket.h
ETH_P_ALL = 0x0003
CLONE_NEWNET = 0x40000000
_SYS_BPF = 321  # x86_64
_BPF_PROG_LOAD = 5
_PROG_TYPE_SOCKET_FILTER = 1
_CB0_OFFSET = 48  # offsetof(struct __sk_buff, cb[0])
_FN_TAIL_CALL = 12
_PSEUDO_MAP_FD = 1

_libc = ctypes.CDLL(None, use_errno=True)


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def dispatcher_insns(prog_array_fd: int, netns: int) -> bytes:
    """``cb[0] = netns; tail_call(ctx, prog_array, 0); return 0``."""
    imm = struct.unpack("<i", struct.pack("<I", netns & 0xFFFFFFFF))[0]
    return b"".join((
        _insn(0xB4, dst=2, imm=imm),  # w2 = netns (32-bit move, zero-extended)
        _insn(0x63, dst=1, src=2, off=_CB0_OFFSET),  # *(u32 *)(r1 + cb[0]) = w2
        _insn(0x18, dst=2, src=_PSEUDO_MAP_FD, imm=prog_array_fd),  # r2 = map (ld_imm64 ...
        _insn(0x00),  # ... second half)
        _insn(0xB7, dst=3, imm=0),  # r3 = 0
        _insn(0x85, imm=_FN_TAIL_CALL),  # tail_call(r1, r2, r3)
        _insn(0xB7, dst=0, imm=0),  # r0 = 0: drop (the socket itself never queues)
        _insn(0x95),  # exit
    ))


def load_dispatcher(prog_array_fd: int, netns: int) -> int:
    """A loaded dispatcher program's fd for namespace ``netns``.

    Raises:
        OSError: the kernel refused it (the verifier's log is in the message).
    """
    insns = dispatcher_insns(prog_array_fd, netns)
    code = ctypes.create_string_buffer(insns, len(insns))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = ctypes.create_string_buffer(128)  # union bpf_attr, zeroed past what is set
    name = b"gp_dns_disp"
    struct.pack_into("<IIQQIIQII16s", attr, 0, _PROG_TYPE_SOCKET_FILTER, len(insns) // 8,
                     ctypes.addressof(code), ctypes.addressof(license_), 1, len(log),
                     ctypes.addressof(log), 0, 0, name)
    fd = _libc.syscall(_SYS_BPF, _BPF_PROG_LOAD, attr, len(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"loading the trace_dns dispatcher: {os.strerror(err)}: "
                      f"{log.value.decode(errors='replace').strip()}")
    return int(fd)


def packet_socket_in(ns_path: str, prog_fd: int) -> socket.socket:
    """An AF_PACKET socket created inside the network namespace ``ns_path`` (a
    ``/proc/<pid>/ns/net``), with program ``prog_fd`` attached.

    Raises:
        OSError: the namespace is gone or the socket could not be made.
    """
    out: list[socket.socket] = []
    errors: list[BaseException] = []

    def enter_and_open() -> None:
        try:
            ns = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(ns, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns_path}): {os.strerror(err)}")
            finally:
                os.close(ns)
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                 socket.htons(ETH_P_ALL))
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, prog_fd)
            except OSError:
                sock.close()
                raise
            out.append(sock)
        except BaseException as e:
            errors.append(e)

    # A thread of its own: it ends in the container's namespace, and nothing else runs there.
    t = threading.Thread(target=enter_and_open, name="trace_dns:netns")
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return out[0]


class NetnsTaps:
    """Packet sockets in the network namespaces of the containers a run follows.

    Args:
        prog_array_fd: the program array whose entry 0 is the gadget's filter.
        host_netns: the daemon's namespace (its own socket covers it).
        log: the run's log (severity, message).
    """

    def __init__(self, prog_array_fd: int, host_netns: int,
                 log: Callable[[Severity, str], None]) -> None:
        self._prog_array_fd = prog_array_fd
        self._host_netns = host_netns
        self._log = log
        self._taps: dict[int, tuple[socket.socket, int, set[str]]] = {}  # netns -> (sock, fd, ids)
        self._failed: set[int] = set()

    @property
    def namespaces(self) -> list[int]:
        return sorted(self._taps)

    def add(self, c: Container) -> None:
        ns = c.netns
        if not ns or ns == self._host_netns or c.host_network or not c.pid:
            return
        tap = self._taps.get(ns)
        if tap is not None:
            tap[2].add(c.id)
            return
        prog = -1
        try:
            prog = load_dispatcher(self._prog_array_fd, ns)
            sock = packet_socket_in(f"/proc/{c.pid}/ns/net", prog)
        except OSError as e:
            if prog >= 0:
                os.close(prog)
            if ns not in self._failed:  # once per namespace, not per container event
                self._failed.add(ns)
                self._log(Severity.WARN, "trace_dns: cannot watch the network namespace of "
                          f"container {c.name} ({c.id[:12]}): {e}")
            return
        self._taps[ns] = (sock, prog, {c.id})

    def remove(self, c: Container) -> None:
        tap = self._taps.get(c.netns)
        if tap is None:
            return
        tap[2].discard(c.id)
        if not tap[2]:
            self._close(c.netns)

    def _close(self, ns: int) -> None:
        sock, prog, _ = self._taps.pop(ns)
        sock.close()
        with contextlib.suppress(OSError):
            os.close(prog)

    def close(self) -> None:
        for ns in list(self._taps):
            self._close(ns)


def follow(taps: NetnsTaps, collection: ContainerCollection,
           selector: ContainerSelector) -> Callable[[], None]:
    """Keeps ``taps`` on the namespaces of the running containers the selection wants (all
    of them without a selection); returns the function that stops following."""

    def wanted(c: Container) -> bool:
        return not selector.active or selector.matches(c)

    for c in collection.containers():
        if wanted(c):
            taps.add(c)

    def on_event(ev: ContainerEvent) -> None:
        if ev.kind is EventKind.REMOVED:
            taps.remove(ev.container)
        elif wanted(ev.container):
            taps.add(ev.container)

    unsubscribe = collection.subscribe(on_event)

    def stop() -> None:
        unsubscribe()
        taps.close()

    return stop
