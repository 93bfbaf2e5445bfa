"""C struct layouts declared as member lines (``u32 pid``, ``char comm[16]``,
``struct gadget_process proc``) and turned into static fields.

Offsets and sizes come from :mod:`ctypes`, which follows the platform C ABI, so they equal what
clang computes for the same struct in the BPF program; gadget sources check that at load time
against the struct bcc parsed.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from pipeline import annotations as ann
from pipeline.schema import KIND_FLAG_ARRAY, Field, FieldFlag, Kind

_SCALARS: Mapping[str, tuple[type[ctypes._SimpleCData], Kind]] = {  # type: ignore[type-arg]
    "bool": (ctypes.c_bool, Kind.BOOL),
    "u8": (ctypes.c_uint8, Kind.UINT8), "s8": (ctypes.c_int8, Kind.INT8),
    "u16": (ctypes.c_uint16, Kind.UINT16), "s16": (ctypes.c_int16, Kind.INT16),
    "u32": (ctypes.c_uint32, Kind.UINT32), "s32": (ctypes.c_int32, Kind.INT32),
    "u64": (ctypes.c_uint64, Kind.UINT64), "s64": (ctypes.c_int64, Kind.INT64),
    "f32": (ctypes.c_float, Kind.FLOAT32), "f64": (ctypes.c_double, Kind.FLOAT64),
}

_MEMBER = re.compile(r"^\s*(?:(?:struct|union|enum)\s+)?(?P<type>\w+)\s+(?P<name>\w+)\s*"
                     r"(?:\[(?P<n>\d+)\])?\s*$")

DEFAULT_ANNOTATIONS: Mapping[str, str] = ann.DEFAULT_ANNOTATIONS

_DYNAMIC: Mapping[str, Kind] = {"string": Kind.STRING, "bytes": Kind.BYTES}
"""Payload-only member types (gadget.yaml ``payloads:``): a value of any length."""


class LayoutError(ValueError):
    """A struct declaration that cannot be laid out."""


@dataclass(frozen=True, slots=True)
class Member:
    type: str
    name: str
    count: int | None  # array length, None for a scalar


def parse_member(line: str) -> Member:
    m = _MEMBER.match(line)
    if not m:
        raise LayoutError(f"cannot parse struct member {line!r} (expected e.g. 'u32 pid')")
    return Member(m["type"], m["name"], int(m["n"]) if m["n"] else None)


class StructRegistry:
    """Typedefs and structs known to layouts, with their ctypes classes built once."""

    def __init__(self, typedefs: Mapping[str, str] | None = None,
                 structs: Mapping[str, Sequence[str]] | None = None) -> None:
        self._typedefs: dict[str, str] = dict(typedefs or {})
        self._decls: dict[str, list[Member]] = {}
        self._ctypes: dict[str, type[ctypes.Structure | ctypes.Union]] = {}
        self._unions: set[str] = set()
        for name, members in (structs or {}).items():
            self.add_struct(name, members)

    def add_typedef(self, name: str, target: str) -> None:
        self._typedefs[name] = target

    def add_enum(self, name: str, underlying: str) -> None:
        """A C enum of the scalar type ``underlying``: members of type ``enum <name>`` are laid
        out as that scalar and tagged ``type:<name>`` (the enum formatter reads the tag)."""
        if underlying not in _SCALARS:
            raise LayoutError(f"enum {name!r}: underlying type {underlying!r} is not a scalar")
        self._typedefs[name] = underlying

    def add_struct(self, name: str, members: Sequence[str]) -> None:
        """Declares a struct, or a union when ``name`` reads ``union <name>`` (members then
        overlap at offset 0, e.g. upstream's ``union gadget_ip_addr_t { u8 v6[16]; u32 v4; }``)."""
        keyword, _, tag = name.partition(" ")
        if keyword == "union" and tag:
            name = tag.strip()
            self._unions.add(name)
        else:
            self._unions.discard(name)
        self._decls[name] = [parse_member(m) for m in members]
        self._ctypes.pop(name, None)

    def resolve(self, type_name: str) -> tuple[str, list[str]]:
        """Follows typedefs; returns the final type and the typedef chain (for ``type:`` tags)."""
        chain: list[str] = []
        while type_name in self._typedefs:
            chain.append(type_name)
            type_name = self._typedefs[type_name]
            if len(chain) > 16:
                raise LayoutError(f"typedef loop at {type_name!r}")
        return type_name, chain

    def is_struct(self, type_name: str) -> bool:
        return self.resolve(type_name)[0] in self._decls

    def ctype(self, member: Member) -> type[ctypes._CData]:
        base, _ = self.resolve(member.type)
        t: type[ctypes._CData]
        if base == "char":
            t = ctypes.c_char
        elif base in _SCALARS:
            t = _SCALARS[base][0]
        elif base in self._decls:
            t = self.struct(base)
        else:
            raise LayoutError(f"unknown type {member.type!r} of member {member.name!r}")
        return t * member.count if member.count is not None else t

    def struct(self, name: str) -> type[ctypes.Structure | ctypes.Union]:
        if name not in self._ctypes:
            if name not in self._decls:
                raise LayoutError(f"unknown struct {name!r}")
            fields = [(m.name, self.ctype(m)) for m in self._decls[name]]
            base = ctypes.Union if name in self._unions else ctypes.Structure
            self._ctypes[name] = type(name, (base,), {"_fields_": fields})
        return self._ctypes[name]

    def members(self, name: str) -> list[Member]:
        return self._decls[name]

    def payload_fields(self, line: str, payload_index: int, first_index: int) -> list[Field]:
        """The fields of a payload of its own holding one member (``struct
        gadget_user_stack ustack``, ``char fpath[512]``, ``string name``, ``bytes data``): a
        struct's fields lie at their offsets in it; any other member is the whole entry
        (``size`` 0), so a string or an array may be shorter than declared. Indexes start at
        ``first_index``."""
        m = parse_member(line)
        if m.type in _DYNAMIC and m.count is None:
            # A String or Bytes value of any length (a field an operator adds upstream).
            return [Field(name=m.name, full_name=m.name, index=first_index,
                          kind=int(_DYNAMIC[m.type]), payload_index=payload_index,
                          tags=(f"name:{m.name}",), annotations=dict(DEFAULT_ANNOTATIONS))]
        wrapper = f"__payload_{m.name}"
        self.add_struct(wrapper, [line])
        try:
            fields, _ = self.fields(wrapper, payload_index)
        finally:
            self._decls.pop(wrapper, None)
            self._ctypes.pop(wrapper, None)
        if not self.is_struct(m.type) or m.count is not None:
            # The whole entry, not a member of a block: a string may be shorter than declared.
            fields = [replace(fields[0], size=0, flags=fields[0].flags & ~FieldFlag.STATIC_MEMBER)]
        return [replace(f, index=f.index + first_index,
                        parent=None if f.parent is None else f.parent + first_index)
                for f in fields]

    def fields(self, struct_name: str, payload_index: int = 0) -> tuple[list[Field], int]:
        """Static fields of ``struct_name`` in declaration order, and the struct's size.

        Annotations are upstream's for static members: the defaults, then the templates of the
        member's ``gadget_*`` types and process-struct aliases (pipeline/annotations.py).
        """
        out: list[Field] = []
        self._walk(struct_name, 0, None, "", payload_index, out)
        return out, ctypes.sizeof(self.struct(struct_name))

    def _walk(self, struct_name: str, base: int, parent: Field | None, prefix: str,
              payload_index: int, out: list[Field]) -> None:
        cls = self.struct(struct_name)
        for m in self._decls[struct_name]:
            if m.name.startswith("__"):
                continue  # padding and private members, as upstream skips them
            desc = getattr(cls, m.name)
            resolved, chain = self.resolve(m.type)
            types = [*chain, resolved] if resolved in self._decls else list(chain)
            tags = ("src:ebpf", f"name:{m.name}", *(f"type:{t}" for t in types))
            flags = FieldFlag.STATIC_MEMBER | (FieldFlag.HAS_PARENT if parent else FieldFlag.NONE)
            if resolved == "char" and m.count is not None:
                kind: int = Kind.CSTRING
            elif resolved in _SCALARS:
                kind = _SCALARS[resolved][1] | (KIND_FLAG_ARRAY if m.count is not None else 0)
            else:
                kind = Kind.BYTES
            annotations = {**DEFAULT_ANNOTATIONS, **ann.for_types(types, struct_name, m.name)}
            if ann.hidden(annotations):
                flags |= FieldFlag.HIDDEN
            f = Field(
                name=m.name, full_name=prefix + m.name, index=len(out), kind=int(kind),
                payload_index=payload_index, offs=base + desc.offset, size=desc.size,
                flags=flags, tags=tags, annotations=annotations,
                parent=parent.index if parent else None,
            )
            out.append(f)
            if resolved in self._decls and m.count is None:
                self._walk(resolved, base + desc.offset, f, f.full_name + ".", payload_index, out)
