"""Data sources and fields, shaped exactly like the gadget service's ``DataSource``/``Field``.

The in-memory layout of a record is its wire layout: payload 0 is the fixed-size C struct the
BPF program writes, byte for byte; every static field addresses it by ``offs``/``size``. Fields
added in user space would live in further payloads (``payload_index`` > 0) with ``size == 0``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import IntEnum, IntFlag
from types import MappingProxyType

from pipeline._gen import gadget_service_pb2 as pb

KIND_FLAG_ARRAY = 0x10000000
"""Set on ``Field.kind`` for arrays of the base kind (an open enum on the wire)."""

DATASOURCE_FLAG_BIG_ENDIAN = 1


class Kind(IntEnum):
    """Field kinds, numbered as the proto's ``Kind`` enum."""

    INVALID = 0
    BOOL = 1
    INT8 = 2
    INT16 = 3
    INT32 = 4
    INT64 = 5
    UINT8 = 6
    UINT16 = 7
    UINT32 = 8
    UINT64 = 9
    FLOAT32 = 10
    FLOAT64 = 11
    STRING = 12
    CSTRING = 13
    BYTES = 14


KIND_WIDTH: Mapping[Kind, int] = MappingProxyType({
    Kind.BOOL: 1, Kind.INT8: 1, Kind.UINT8: 1, Kind.INT16: 2, Kind.UINT16: 2,
    Kind.INT32: 4, Kind.UINT32: 4, Kind.FLOAT32: 4, Kind.INT64: 8, Kind.UINT64: 8,
    Kind.FLOAT64: 8,
})
"""Byte width of the fixed-width kinds; the others take the whole slice."""

NUMPY_DTYPE: Mapping[Kind, str] = MappingProxyType({
    Kind.BOOL: "u1", Kind.INT8: "i1", Kind.UINT8: "u1", Kind.INT16: "<i2", Kind.UINT16: "<u2",
    Kind.INT32: "<i4", Kind.UINT32: "<u4", Kind.FLOAT32: "<f4", Kind.INT64: "<i8",
    Kind.UINT64: "<u8", Kind.FLOAT64: "<f8",
})
"""Little-endian numpy dtypes for the fixed-width kinds (data sources are little-endian)."""


class FieldFlag(IntFlag):
    """``Field.flags`` bits (docs/gadget-service.md §4.3)."""

    NONE = 0
    EMPTY = 1
    CONTAINER = 2
    HIDDEN = 4
    HAS_PARENT = 8
    STATIC_MEMBER = 16
    UNREFERENCED = 32


class DataSourceType(IntEnum):
    """``DataSource.type``: one record per packet, or one batch (``GadgetDataArray``) per packet."""

    SINGLE = 1
    ARRAY = 2


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a data source; ``kind`` may carry :data:`KIND_FLAG_ARRAY`."""

    name: str
    full_name: str
    index: int
    kind: int
    payload_index: int = 0
    offs: int = 0
    size: int = 0
    flags: FieldFlag = FieldFlag.NONE
    tags: tuple[str, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    parent: int | None = None
    order: int = 0

    @property
    def base_kind(self) -> Kind:
        return Kind(self.kind & ~KIND_FLAG_ARRAY)

    @property
    def is_array(self) -> bool:
        return bool(self.kind & KIND_FLAG_ARRAY)

    @property
    def hidden(self) -> bool:
        return bool(self.flags & FieldFlag.HIDDEN)

    @property
    def has_value(self) -> bool:
        """False for grouping nodes (``Empty``) and superseded fields."""
        return not self.flags & (FieldFlag.EMPTY | FieldFlag.UNREFERENCED)

    def to_proto(self) -> pb.Field:
        return pb.Field(
            name=self.name, fullName=self.full_name, index=self.index,
            payloadIndex=self.payload_index, offs=self.offs, size=self.size,
            flags=int(self.flags), kind=self.kind,  # type: ignore[arg-type]
            tags=list(self.tags), annotations=dict(self.annotations),
            parent=self.parent or 0, order=self.order,
        )


@dataclass(frozen=True, slots=True)
class DataSourceSchema:
    """A data source: its name, packet type, fields and the size of its static block.

    Args:
        name: data source name as clients see it (``exec``, ``open``).
        type: one record per packet or arrays.
        fields: all fields, ``index`` equal to their position.
        record_size: size in bytes of payload 0 (the BPF struct).
        payload_count: how many payload entries each record carries.
    """

    name: str
    type: DataSourceType
    fields: tuple[Field, ...]
    record_size: int
    payload_count: int = 1
    tags: tuple[str, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    flags: int = 0

    def field(self, full_name: str) -> Field:
        """The field named ``full_name``; raises KeyError naming the known fields."""
        for f in self.fields:
            if f.full_name == full_name and not f.flags & FieldFlag.UNREFERENCED:
                return f
        known = ", ".join(f.full_name for f in self.value_fields())
        raise KeyError(f"data source {self.name!r} has no field {full_name!r} (fields: {known})")

    def value_fields(self) -> Iterable[Field]:
        return (f for f in self.fields if f.has_value)

    def with_fields(self, fields: Iterable[Field]) -> DataSourceSchema:
        """A copy with another field list; indexes and parents are renumbered."""
        kept = list(fields)
        renumber = {f.index: i for i, f in enumerate(kept)}
        out = []
        for i, f in enumerate(kept):
            parent = renumber.get(f.parent) if f.parent is not None else None
            flags = f.flags if parent is not None else f.flags & ~FieldFlag.HAS_PARENT
            out.append(replace(f, index=i, parent=parent, flags=flags))
        return replace(self, fields=tuple(out))

    def to_proto(self, ds_id: int = 0) -> pb.DataSource:
        return pb.DataSource(
            id=ds_id, name=self.name, type=int(self.type),
            fields=[f.to_proto() for f in self.fields], tags=list(self.tags),
            annotations=dict(self.annotations), flags=self.flags,
        )
