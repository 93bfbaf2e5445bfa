"""Client-side decoding of payload events by the field table a server announced
(docs/gadget-service.md §4.3)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline._gen import gadget_service_pb2 as pb

KIND_FLAG_ARRAY = 0x10000000
FLAG_EMPTY, FLAG_HAS_PARENT, FLAG_UNREFERENCED, FLAG_HIDDEN = 1, 8, 32, 4
_FMT = {1: "?", 2: "b", 3: "h", 4: "i", 5: "q", 6: "B", 7: "H", 8: "I", 9: "Q", 10: "f",
        11: "d"}
_STRING, _CSTRING, _BYTES = 12, 13, 14


@dataclass(frozen=True)
class _Accessor:
    path: tuple[str, ...]
    payload_index: int
    offs: int
    size: int
    kind: int
    hidden: bool


class DataSourceDecoder:
    """Decodes ``DataElement``s of one announced data source into nested dicts."""

    def __init__(self, ds: pb.DataSource) -> None:
        self.id = ds.id
        self.name = ds.name
        self.type = ds.type
        self.order = "<" if not ds.flags & 1 else ">"
        by_index = {f.index: f for f in ds.fields}
        self._acc: list[_Accessor] = []
        for f in ds.fields:
            if f.flags & (FLAG_EMPTY | FLAG_UNREFERENCED):
                continue
            if any(c.flags & FLAG_HAS_PARENT and c.parent == f.index for c in ds.fields):
                continue  # a container: its members carry the values
            path = [f.name]
            p = f
            while p.flags & FLAG_HAS_PARENT and p.parent in by_index:
                p = by_index[p.parent]
                path.insert(0, p.name)
            self._acc.append(_Accessor(tuple(path), f.payloadIndex, f.offs, f.size, f.kind,
                                       bool(f.flags & FLAG_HIDDEN)))

    def fields(self, include_hidden: bool = False) -> list[str]:
        return [".".join(a.path) for a in self._acc if include_hidden or not a.hidden]

    def decode(self, element: pb.DataElement) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for a in self._acc:
            b = element.payload[a.payload_index] if a.payload_index < len(element.payload) else b""
            if a.size:
                b = b[a.offs: a.offs + a.size]
            node = out
            for part in a.path[:-1]:
                node = node.setdefault(part, {})
            node[a.path[-1]] = self._value(a.kind, b)
        return out

    def _value(self, kind: int, b: bytes) -> Any:
        base = kind & ~KIND_FLAG_ARRAY
        if kind & KIND_FLAG_ARRAY:
            fmt = _FMT.get(base)
            if fmt is None:
                return b.hex()
            width = struct.calcsize(fmt)
            return list(struct.unpack(f"{self.order}{len(b) // width}{fmt}", b[: len(b) -
                                                                             len(b) % width]))
        if base == _CSTRING:
            return b.split(b"\0", 1)[0].decode("utf-8", "replace")
        if base == _STRING:
            return b.decode("utf-8", "replace")
        if base == _BYTES:
            return b.hex()
        fmt = _FMT.get(base)
        if fmt is None or len(b) != struct.calcsize(fmt):
            return None
        value = struct.unpack(self.order + fmt, b)[0]
        return value

    def records(self, payload: bytes) -> Iterator[dict[str, Any]]:
        """The records of one payload event (one for single, many for array sources)."""
        if self.type == 2:
            arr = pb.GadgetDataArray.FromString(payload)
            for el in arr.dataArray:
                yield self.decode(el)
        else:
            yield self.decode(pb.GadgetData.FromString(payload).data)


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
