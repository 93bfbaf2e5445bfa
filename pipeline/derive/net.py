"""Network endpoints as text: ``struct gadget_l3endpoint_t`` / ``gadget_l4endpoint_t`` members
(``addr_raw`` as 16 bytes, ``version``, ``port``, ``proto_raw``) turned into what upstream's
formatters send: ``addr`` (Go's ``net.IP.String()``), ``endpoint`` (``addr:port``, no brackets
for IPv6, as upstream writes it) and ``proto`` (the IANA name, ``proto#<n>`` when unknown).

An address is formatted once per distinct (version, address) of a batch. A version other than
4 or 6 leaves all three empty, as upstream (which fails that record's conversion).
"""

from __future__ import annotations

import ipaddress

import numpy as np
import numpy.typing as npt

from pipeline.batch import Coded
from pipeline.derive.formatters import by_unique, by_unique_rows
from pipeline.derive.tables import PROTOCOL_NAMES


def ip_text(version: int, addr: bytes) -> bytes:
    """Go's ``net.IP.String()`` of the address a version names; b"" for another version."""
    if version == 4:
        return str(ipaddress.IPv4Address(addr[:4])).encode()
    if version == 6:
        ip6 = ipaddress.IPv6Address(addr[:16])
        mapped = ip6.ipv4_mapped
        # Go prints an IPv4-mapped IPv6 address in dotted form.
        return str(mapped if mapped is not None else ip6).encode()
    return b""


def addresses(version: npt.NDArray[np.uint8], addr: npt.NDArray[np.uint8]) -> Coded:
    """Each record's address text; ``addr`` is the (n, 16) block of ``addr_raw``."""
    key = np.concatenate([version.reshape(-1, 1).astype(np.uint8), addr], axis=1)
    return by_unique_rows(key, lambda k: ip_text(k[0], k[1:]))


def endpoints(addr: Coded, version: npt.NDArray[np.uint8],
              port: npt.NDArray[np.uint16]) -> Coded:
    """``addr:port`` per record, empty where the address is (an unknown version)."""
    # Distinct (address, port) pairs: the address code and the port fit one int64 key.
    key = addr.codes.astype(np.int64) << 16 | port.astype(np.int64)
    table = addr.table

    def fmt(k: int) -> bytes:
        a = table[k >> 16]
        return a + b":" + str(k & 0xFFFF).encode() if a else b""
    return by_unique(key, fmt)


def protocol_name(n: int) -> bytes:
    name = PROTOCOL_NAMES.get(n)
    return name.encode() if name is not None else f"proto#{n}".encode()


def protocols(proto: npt.NDArray[np.uint16], version: npt.NDArray[np.uint8]) -> Coded:
    """The protocol name per record, empty where the version is unknown."""
    key = proto.astype(np.int64) | ((version == 4) | (version == 6)).astype(np.int64) << 16
    return by_unique(key, lambda k: protocol_name(k & 0xFFFF) if k >> 16 else b"")
