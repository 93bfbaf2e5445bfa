"""A decoder written from the spec (sections 3.5, 4.1 and 4.3), independent of pipeline/ and
api/decode.py: tests use it to check what the server puts on the wire."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from pipeline._gen import gadget_service_pb2 as pb

_WIDTH_FMT = {1: "?", 2: "b", 3: "h", 4: "i", 5: "q", 6: "B", 7: "H", 8: "I", 9: "Q",
              10: "f", 11: "d"}


def split_frames(data: bytes | bytearray) -> list[bytes]:
    """gRPC length-prefixed messages: 1 byte compressed flag (0), 4 bytes big-endian length."""
    data = bytes(data)
    out = []
    i = 0
    while i < len(data):
        if data[i] != 0:
            raise ValueError(f"compressed flag set at {i}")
        n = int.from_bytes(data[i + 1: i + 5], "big")
        out.append(data[i + 5: i + 5 + n])
        i += 5 + n
    if i != len(data):
        raise ValueError("trailing bytes")
    return out


def field_value(f: pb.Field, element: pb.DataElement, big_endian: bool = False) -> Any:
    """Spec 4.3's reading rule for one field of one element."""
    if f.flags & 1:  # Empty
        return None
    b = element.payload[f.payloadIndex]
    if f.size > 0:
        b = b[f.offs: f.offs + f.size]
    order = ">" if big_endian else "<"
    kind = f.kind & ~0x10000000
    if f.kind & 0x10000000:
        fmt = _WIDTH_FMT[kind]
        w = struct.calcsize(fmt)
        assert len(b) % w == 0
        return [struct.unpack(order + fmt, b[i: i + w])[0] for i in range(0, len(b), w)]
    if kind == 1:
        assert len(b) == 1
        return b[0] == 1
    if kind in _WIDTH_FMT:
        fmt = _WIDTH_FMT[kind]
        assert len(b) == struct.calcsize(fmt), (f.fullName, len(b))
        return struct.unpack(order + fmt, b)[0]
    if kind == 13:  # CString: up to the first NUL
        return b.split(b"\0", 1)[0]
    return bytes(b)  # String, Bytes


@dataclass
class Packet:
    seq: int
    ds_id: int
    elements: list[pb.DataElement]


def payload_packets(frames: list[bytes], ds_types: dict[int, int]) -> list[Packet]:
    out = []
    for fr in frames:
        ev = pb.GadgetEvent.FromString(fr)
        if ev.type != 0:
            continue
        if ds_types[ev.dataSourceID] == 2:
            els = list(pb.GadgetDataArray.FromString(ev.payload).dataArray)
        else:
            els = [pb.GadgetData.FromString(ev.payload).data]
        out.append(Packet(ev.seq, ev.dataSourceID, els))
    return out
