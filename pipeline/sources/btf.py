"""Member offsets and type sizes read from the running kernel's BTF.

bcc compiles gadgets against whatever kernel headers Debian ships (6.1), while the kernel that runs
them can be much newer, so struct layouts taken from those headers are wrong.  Gadgets therefore
never dereference kernel structs through header definitions: user space reads the offsets from
``/sys/kernel/btf/vmlinux`` with :class:`KernelBTF`, :func:`gadget_cflags` turns them into ``-D``
flags, and ``bpf/gadget_types.h`` reads raw memory at those offsets with
``bpf_probe_read_kernel``.

The parser follows the format in the kernel's ``Documentation/bpf/btf.rst`` and needs nothing but
:mod:`struct`.  Loading walks the type section once (record lengths vary by kind, so type ids can
only be located by walking) and indexes struct and union names; members and all other names are
decoded only when a lookup needs them.  Only base BTF (vmlinux) is supported, not split module BTF.
"""

from __future__ import annotations

import functools
import struct
from array import array
from collections.abc import Iterator

__all__ = ["BTFError", "KernelBTF", "gadget_cflags", "task_offsets"]

_MAGIC = 0xEB9F

# BTF_KIND_* values from include/uapi/linux/btf.h.
_INT, _PTR, _ARRAY, _STRUCT, _UNION, _ENUM, _FWD, _TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
_VOLATILE, _CONST, _RESTRICT, _FUNC, _FUNC_PROTO, _VAR, _DATASEC = 9, 10, 11, 12, 13, 14, 15
_FLOAT, _DECL_TAG, _TYPE_TAG, _ENUM64 = 16, 17, 18, 19

_KIND_NAMES = {
    _INT: "int", _PTR: "pointer", _ARRAY: "array", _STRUCT: "struct", _UNION: "union",
    _ENUM: "enum", _FWD: "forward declaration", _TYPEDEF: "typedef", _VOLATILE: "volatile",
    _CONST: "const", _RESTRICT: "restrict", _FUNC: "function", _FUNC_PROTO: "function prototype",
    _VAR: "variable", _DATASEC: "data section", _FLOAT: "float", _DECL_TAG: "decl tag",
    _TYPE_TAG: "type tag", _ENUM64: "enum64",
}

# Bytes that follow the 12-byte btf_type record, per kind: (fixed part, part per vlen item).
_RECORD_TAIL: dict[int, tuple[int, int]] = {
    _INT: (4, 0), _PTR: (0, 0), _ARRAY: (12, 0), _STRUCT: (0, 12), _UNION: (0, 12),
    _ENUM: (0, 8), _FWD: (0, 0), _TYPEDEF: (0, 0), _VOLATILE: (0, 0), _CONST: (0, 0),
    _RESTRICT: (0, 0), _FUNC: (0, 0), _FUNC_PROTO: (0, 8), _VAR: (4, 0), _DATASEC: (0, 12),
    _FLOAT: (0, 0), _DECL_TAG: (4, 0), _TYPE_TAG: (0, 0), _ENUM64: (0, 12),
}

_MODIFIERS = frozenset({_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG})
_COMPOSITES = frozenset({_STRUCT, _UNION})
_SIZED = frozenset({_INT, _STRUCT, _UNION, _ENUM, _ENUM64, _FLOAT})
# Kinds whose names sizeof() can look up besides structs and unions.
_NAMED_TYPES = frozenset({_TYPEDEF, _INT, _ENUM, _ENUM64, _FLOAT})
# Deeper modifier chains or anonymous nesting than this mean a corrupt (cyclic) blob.
_MAX_DEPTH = 64


class BTFError(Exception):
    """The BTF blob is malformed, or it lacks a type or member that was asked for."""


class KernelBTF:
    """A parsed BTF blob: look up struct member offsets and type sizes by name.

    Build one with :meth:`load`.  Lookups are by C name; names of structs and unions may be
    written with or without their ``struct``/``union`` keyword.
    """

    def __init__(self, data: bytes) -> None:
        """Parse the header and index the type section of the BTF blob ``data``.

        Raises :class:`BTFError` when ``data`` is not a well-formed BTF blob.
        """
        if len(data) < 24:
            raise BTFError(f"BTF blob is {len(data)} bytes, too short for a header")
        # The magic is written in the producer's byte order; reading it decides ours.
        if struct.unpack_from("<H", data)[0] == _MAGIC:
            endian = "<"
        elif struct.unpack_from(">H", data)[0] == _MAGIC:
            endian = ">"
        else:
            raise BTFError(f"not a BTF blob: magic {data[:2].hex()} (want 0x{_MAGIC:x})")
        version, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            endian + "BBIIIII", data, 2)
        if version != 1:
            raise BTFError(f"unsupported BTF version {version}")
        types_start, self._str_start = hdr_len + type_off, hdr_len + str_off
        types_end, self._str_end = types_start + type_len, self._str_start + str_len
        if types_end > len(data) or self._str_end > len(data) or hdr_len < 24:
            raise BTFError("BTF header describes sections beyond the end of the blob")
        self._data = data
        self._type_rec = struct.Struct(endian + "III")
        self._member_rec = struct.Struct(endian + "III")
        self._starts, composites = self._walk(types_start, types_end)
        self._composites: dict[str, list[int]] = {}
        for tid in composites:
            self._composites.setdefault(self._name_at(self._read(tid)[0]), []).append(tid)
        self._named: dict[str, list[int]] | None = None  # built by the first sizeof() needing it
        self._ptr_size: int | None = None

    @classmethod
    def load(cls, path: str = "/sys/kernel/btf/vmlinux") -> KernelBTF:
        """Read and parse the BTF blob at ``path`` (by default the running kernel's).

        Raises :class:`OSError` when the file cannot be read and :class:`BTFError` when it is
        not well-formed BTF.
        """
        with open(path, "rb") as f:
            return cls(f.read())

    def offsetof(self, struct: str, member_path: str) -> int:
        """Byte offset of ``member_path`` inside struct (or union) ``struct``.

        ``member_path`` is one member name or a dotted path through embedded (not pointed-to)
        structs and unions, e.g. ``offsetof("mnt_namespace", "ns.inum")``.  Members of anonymous
        structs and unions are found as if they were direct members, as in C.  Typedefs and
        const/volatile qualifiers on the way are followed.

        Raises :class:`BTFError` naming the struct and the member when the struct is unknown, a
        member is absent, a path step is not a struct or union, the member is a bitfield (which
        has no byte offset), or same-named structs disagree on the offset.
        """
        parts = member_path.split(".")
        if not member_path or not all(parts):
            raise BTFError(f"malformed member path {member_path!r} for struct {struct!r}")
        candidates = self._struct_ids(struct)
        if not candidates:
            raise BTFError(f"no struct or union named {struct!r} in BTF")
        found: set[int] = set()
        first_error: BTFError | None = None
        for tid in candidates:
            try:
                bits, _, bitfield = self._member_path(tid, struct, parts)
            except BTFError as e:
                first_error = first_error or e
                continue
            if bitfield or bits % 8:
                raise BTFError(f"member {member_path!r} of struct {struct!r} is a bitfield "
                               f"at bit {bits}; it has no byte offset")
            found.add(bits // 8)
        if not found:
            assert first_error is not None
            raise first_error
        if len(found) > 1:
            raise BTFError(f"{len(candidates)} structs named {struct!r} disagree on the offset "
                           f"of {member_path!r}: {sorted(found)}")
        return found.pop()

    def sizeof(self, type_name: str) -> int:
        """Size in bytes of the type called ``type_name``.

        ``"struct x"``, ``"union x"`` and ``"enum x"`` name tagged types; a bare name matches a
        struct or union first (so ``sizeof("task_struct")`` works), then a typedef or a base type
        such as ``"unsigned int"``.  Raises :class:`BTFError` when no such type exists, it has no
        size (a forward declaration, a function) or same-named types disagree on the size.
        """
        name = " ".join(type_name.split())
        keyword, _, tag = name.partition(" ")
        if keyword in ("struct", "union"):
            kinds = {_STRUCT} if keyword == "struct" else {_UNION}
            ids = [t for t in self._composites.get(tag, []) if self._kind(t) in kinds]
        elif keyword == "enum":
            ids = [t for t in self._named_ids().get(tag, []) if self._kind(t) in (_ENUM, _ENUM64)]
        else:
            ids = self._composites.get(name) or self._named_ids().get(name, [])
        if not ids:
            raise BTFError(f"no type named {type_name!r} in BTF")
        sizes = {self._size(tid, type_name) for tid in ids}
        if len(sizes) > 1:
            raise BTFError(f"{len(ids)} types named {type_name!r} disagree on the size: "
                           f"{sorted(sizes)}")
        return sizes.pop()

    def enum_value(self, enum: str, member: str) -> int | None:
        """The value of ``member`` of ``enum enum``, or None when there is no such enum or
        member (e.g. ``enum_value("bpf_func_id", "BPF_FUNC_task_pt_regs")``: whether the
        kernel has that BPF helper)."""
        endian = "<" if self._type_rec.format.startswith("<") else ">"
        want = member.encode() + b"\0"
        for tid in self._named_ids().get(enum, []):
            _, info, _ = self._read(tid)
            kind = (info >> 24) & 0x1F
            if kind not in (_ENUM, _ENUM64):
                continue
            width = 8 if kind == _ENUM else 12
            pos = self._starts[tid] + 12
            for i in range(info & 0xFFFF):
                at = pos + width * i
                (off,) = struct.unpack_from(endian + "I", self._data, at)
                if self._data.startswith(want, self._str_start + off):
                    if kind == _ENUM:
                        return int(struct.unpack_from(endian + "i", self._data, at + 4)[0])
                    lo, hi = struct.unpack_from(endian + "II", self._data, at + 4)
                    return int(lo | (hi << 32))
        return None

    def _member_size(self, struct: str, member_path: str) -> int:
        """Byte size of the member at ``member_path`` (for checking what C will read)."""
        sizes = set()
        for tid in self._struct_ids(struct):
            try:
                _, member_tid, _ = self._member_path(tid, struct, member_path.split("."))
            except BTFError:
                continue
            sizes.add(self._size(member_tid, f"{struct}.{member_path}"))
        if len(sizes) != 1:
            raise BTFError(f"cannot size member {member_path!r} of struct {struct!r}")
        return sizes.pop()

    # -- walking the type section -------------------------------------------------------------

    def _walk(self, pos: int, end: int) -> tuple[array[int], list[int]]:
        """Return the byte position of every type record (index = type id) and the ids of
        named structs and unions."""
        starts = array("I", [0])  # id 0 is void and has no record
        composites: list[int] = []
        unpack = self._type_rec.unpack_from
        # Flat lists indexed by kind are the fastest lookup in the loop; unknown kinds get -1 so
        # the walk stops instead of mis-locating every later type.
        fixed_tail, vlen_tail = [-1] * 32, [0] * 32
        for kind, (fixed, per_item) in _RECORD_TAIL.items():
            fixed_tail[kind], vlen_tail[kind] = fixed, per_item
        data = self._data
        append = starts.append
        tid = 0
        # The hot loop of load(): ~150k records, so it avoids attribute lookups and calls.
        while pos < end:
            name_off, info, _ = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            fixed = fixed_tail[kind]
            if fixed < 0:
                raise BTFError(f"unknown BTF kind {kind} at type id {tid + 1}")
            tid += 1
            append(pos)
            if name_off and kind in (_STRUCT, _UNION):
                composites.append(tid)
            pos += 12 + fixed + vlen_tail[kind] * (info & 0xFFFF)
        if pos != end:
            raise BTFError("BTF type section ends in the middle of a type record")
        return starts, composites

    def _read(self, tid: int) -> tuple[int, int, int]:
        """(name_off, info, size_or_type) of type ``tid``."""
        if not 0 < tid < len(self._starts):
            raise BTFError(f"type id {tid} out of range (split BTF is not supported)")
        name_off, info, size_or_type = self._type_rec.unpack_from(self._data, self._starts[tid])
        return name_off, info, size_or_type

    def _kind(self, tid: int) -> int:
        return (self._read(tid)[1] >> 24) & 0x1F

    def _name_at(self, off: int) -> str:
        start = self._str_start + off
        if off and start < self._str_end:
            end = self._data.find(b"\0", start, self._str_end)
            if end >= 0:
                return self._data[start:end].decode("utf-8", "replace")
        return ""

    def _named_ids(self) -> dict[str, list[int]]:
        """Ids of typedefs, base types and enums by name, indexed on first use because only
        sizeof() on such names needs them."""
        if self._named is None:
            named: dict[str, list[int]] = {}
            for tid in range(1, len(self._starts)):
                name_off, info, _ = self._read(tid)
                if name_off and (info >> 24) & 0x1F in _NAMED_TYPES:
                    named.setdefault(self._name_at(name_off), []).append(tid)
            self._named = named
        return self._named

    def _struct_ids(self, name: str) -> list[int]:
        """Structs or unions called ``name`` (keyword optional), or a typedef naming one."""
        keyword, _, tag = name.strip().partition(" ")
        if keyword in ("struct", "union"):
            want = _STRUCT if keyword == "struct" else _UNION
            return [t for t in self._composites.get(tag.strip(), []) if self._kind(t) == want]
        ids = self._composites.get(name.strip())
        if ids:
            return ids
        resolved = (self._strip(t) for t in self._named_ids().get(name.strip(), []))
        return [t for t in resolved if self._kind(t) in _COMPOSITES]

    def _strip(self, tid: int) -> int:
        """Follow typedefs and qualifiers to the underlying type."""
        for _ in range(_MAX_DEPTH):
            if tid == 0:
                return tid
            _, info, ref = self._read(tid)
            if (info >> 24) & 0x1F not in _MODIFIERS:
                return tid
            tid = ref
        raise BTFError(f"typedef/qualifier chain through type id {tid} is too deep (cyclic?)")

    def _size(self, tid: int, what: str) -> int:
        tid = self._strip(tid)
        if tid == 0:
            raise BTFError(f"{what!r} is void and has no size")
        _, info, size_or_type = self._read(tid)
        kind = (info >> 24) & 0x1F
        if kind in _SIZED:
            return size_or_type
        if kind == _PTR:
            return self._pointer_size()
        if kind != _ARRAY:
            raise BTFError(f"{what!r} is a {_KIND_NAMES.get(kind, kind)} and has no size")
        elem, _, nelems = self._type_rec.unpack_from(self._data, self._starts[tid] + 12)
        # Recursion depth is bounded by array nesting, which the kernel keeps shallow.
        return int(nelems) * self._size(elem, what)

    def _pointer_size(self) -> int:
        # BTF does not record pointer width; like libbpf, take it from the size of "long".
        if self._ptr_size is None:
            named = self._named_ids()
            sizes = {self._read(t)[2] for n in ("long int", "long unsigned int")
                     for t in named.get(n, []) if self._kind(t) == _INT}
            self._ptr_size = sizes.pop() if len(sizes) == 1 else 8
        return self._ptr_size

    def _members(self, tid: int) -> Iterator[tuple[int, int, int, int]]:
        """(name_off, type id, bit offset, bitfield size) of each member of struct ``tid``."""
        _, info, _ = self._read(tid)
        kind_flag = info >> 31
        pos = self._starts[tid] + 12
        unpack = self._member_rec.unpack_from
        for i in range(info & 0xFFFF):
            name_off, mtype, offset = unpack(self._data, pos + 12 * i)
            # With kind_flag set the high 8 bits hold the bitfield size, the low 24 the offset.
            if kind_flag:
                yield name_off, mtype, offset & 0xFFFFFF, offset >> 24
            else:
                yield name_off, mtype, offset, 0

    def _find(self, tid: int, name: bytes, depth: int = 0) -> tuple[int, int, int] | None:
        """(bit offset, type id, bitfield size) of member ``name`` of composite ``tid``,
        looking inside anonymous struct/union members too."""
        if depth > _MAX_DEPTH:
            raise BTFError(f"anonymous members of type id {tid} nest too deeply (cyclic?)")
        data, str_start = self._data, self._str_start
        for name_off, mtype, bits, bitfield in self._members(tid):
            if name_off:
                # Compare in the string table itself rather than decoding every member name.
                if data.startswith(name, str_start + name_off):
                    return bits, mtype, bitfield
            else:
                inner = self._strip(mtype)
                if inner and self._kind(inner) in _COMPOSITES:
                    hit = self._find(inner, name, depth + 1)
                    if hit is not None:
                        return bits + hit[0], hit[1], hit[2]
        return None

    def _member_path(self, tid: int, struct: str, parts: list[str]) -> tuple[int, int, int]:
        """(bit offset, type id, bitfield size) of the dotted member ``parts`` in ``tid``."""
        bits, bitfield = 0, 0
        current = tid
        for i, part in enumerate(parts):
            if i:
                current = self._strip(current)
                if not current or self._kind(current) not in _COMPOSITES:
                    kind = _KIND_NAMES.get(self._kind(current), "void") if current else "void"
                    raise BTFError(
                        f"member {'.'.join(parts[:i])!r} of struct {struct!r} is a {kind}, not an "
                        f"embedded struct or union, so {'.'.join(parts)!r} cannot be resolved "
                        "(offsetof does not follow pointers)")
            hit = self._find(current, part.encode() + b"\0")
            if hit is None:
                where = f"struct {struct!r}" if not i else f"{'.'.join(parts[:i])!r} of {struct!r}"
                raise BTFError(f"{where} has no member {part!r} (looking up "
                               f"{'.'.join(parts)!r} in the running kernel's BTF)")
            bits, current, bitfield = bits + hit[0], hit[1], hit[2]
        return bits, current, bitfield


# (macro, struct, member path, byte size the C code reads (None: a pointer; 0: an embedded struct
# whose offset only is used), required)
_TASK_FIELDS: tuple[tuple[str, str, str, int | None, bool], ...] = (
    ("GADGET_OFF_TASK_PID", "task_struct", "pid", 4, True),
    ("GADGET_OFF_TASK_TGID", "task_struct", "tgid", 4, True),
    ("GADGET_OFF_TASK_COMM", "task_struct", "comm", 16, True),
    ("GADGET_OFF_TASK_REAL_PARENT", "task_struct", "real_parent", None, True),
    ("GADGET_OFF_TASK_NSPROXY", "task_struct", "nsproxy", None, True),
    ("GADGET_OFF_NSPROXY_MNT_NS", "nsproxy", "mnt_ns", None, True),
    ("GADGET_OFF_MNT_NS_INUM", "mnt_namespace", "ns.inum", 4, True),
    # Only with CONFIG_AUDIT (or CONFIG_AUDITSYSCALL on older kernels).
    ("GADGET_OFF_TASK_LOGINUID", "task_struct", "loginuid.val", 4, False),
    ("GADGET_OFF_TASK_SESSIONID", "task_struct", "sessionid", 4, False),
    # Optional: gadgets that read them #error without them (snapshot_process, trace_capabilities,
    # top_file); a kernel lacking one must still run the gadgets that do not.
    ("GADGET_OFF_TASK_REAL_CRED", "task_struct", "real_cred", None, False),
    ("GADGET_OFF_TASK_START_BOOTTIME", "task_struct", "start_boottime", 8, False),
    ("GADGET_OFF_TASK_FILES", "task_struct", "files", None, False),
    ("GADGET_OFF_CRED_UID", "cred", "uid", 4, False),
    ("GADGET_OFF_CRED_GID", "cred", "gid", 4, False),
    ("GADGET_OFF_CRED_CAP_EFFECTIVE", "cred", "cap_effective", 8, False),
    ("GADGET_OFF_CRED_USER_NS", "cred", "user_ns", None, False),
    ("GADGET_OFF_USER_NS_INUM", "user_namespace", "ns.inum", 4, False),
    ("GADGET_OFF_FILES_FDT", "files_struct", "fdt", None, False),
    ("GADGET_OFF_FDTABLE_MAX_FDS", "fdtable", "max_fds", 4, False),
    ("GADGET_OFF_FDTABLE_FD", "fdtable", "fd", None, False),
    ("GADGET_OFF_FILE_INODE", "file", "f_inode", None, False),
    ("GADGET_OFF_FILE_DENTRY", "file", "f_path.dentry", None, False),
    ("GADGET_OFF_DENTRY_NAME", "dentry", "d_name.name", None, False),
    # Optional, for bpf/gadget_path.h (a file's absolute path: dentries up to the mount root,
    # then the parent mount's mount point; struct mount is private to fs/, but in BTF).
    ("GADGET_OFF_FILE_MNT", "file", "f_path.mnt", None, False),
    ("GADGET_OFF_DENTRY_NAME_LEN", "dentry", "d_name.len", 4, False),
    ("GADGET_OFF_DENTRY_PARENT", "dentry", "d_parent", None, False),
    ("GADGET_OFF_VFSMOUNT_MNT_ROOT", "vfsmount", "mnt_root", None, False),
    ("GADGET_OFF_MOUNT_MNT", "mount", "mnt", 0, False),
    ("GADGET_OFF_MOUNT_PARENT", "mount", "mnt_parent", None, False),
    ("GADGET_OFF_MOUNT_MOUNTPOINT", "mount", "mnt_mountpoint", None, False),
    ("GADGET_OFF_INODE_INO", "inode", "i_ino", 8, False),
    ("GADGET_OFF_INODE_MODE", "inode", "i_mode", 2, False),
    ("GADGET_OFF_INODE_SB", "inode", "i_sb", None, False),
    ("GADGET_OFF_SB_DEV", "super_block", "s_dev", 4, False),
    ("GADGET_OFF_TASK_FLAGS", "task_struct", "flags", 4, False),
    # x86_64 only: the syscall number in the registers saved at syscall entry.
    ("GADGET_OFF_PT_REGS_ORIG_AX", "pt_regs", "orig_ax", 8, False),
    # Optional, for the socket gadgets (bpf/gadget_net.h: trace_tcp, trace_bind): fd -> file ->
    # socket -> sock, and the sock's addresses, ports, netns and options.
    ("GADGET_OFF_FILE_PRIVATE_DATA", "file", "private_data", None, False),
    ("GADGET_OFF_SOCKET_FILE", "socket", "file", None, False),
    ("GADGET_OFF_SOCKET_SK", "socket", "sk", None, False),
    ("GADGET_OFF_SK_DADDR", "sock", "__sk_common.skc_daddr", 4, False),
    ("GADGET_OFF_SK_RCV_SADDR", "sock", "__sk_common.skc_rcv_saddr", 4, False),
    ("GADGET_OFF_SK_DPORT", "sock", "__sk_common.skc_dport", 2, False),
    ("GADGET_OFF_SK_NUM", "sock", "__sk_common.skc_num", 2, False),
    ("GADGET_OFF_SK_FAMILY", "sock", "__sk_common.skc_family", 2, False),
    ("GADGET_OFF_SK_BOUND_DEV_IF", "sock", "__sk_common.skc_bound_dev_if", 4, False),
    ("GADGET_OFF_SK_NET", "sock", "__sk_common.skc_net.net", None, False),
    ("GADGET_OFF_SK_V6_DADDR", "sock", "__sk_common.skc_v6_daddr", 16, False),
    ("GADGET_OFF_SK_V6_RCV_SADDR", "sock", "__sk_common.skc_v6_rcv_saddr", 16, False),
    ("GADGET_OFF_SK_PROTOCOL", "sock", "sk_protocol", 2, False),
    ("GADGET_OFF_SK_ERR", "sock", "sk_err", 4, False),
    ("GADGET_OFF_INET_SPORT", "inet_sock", "inet_sport", 2, False),
    ("GADGET_OFF_INET_FLAGS", "inet_sock", "inet_flags", 8, False),  # since 6.6
    ("GADGET_OFF_NET_NS_INUM", "net", "ns.inum", 4, False),
    # Optional, for trace_oomkill: the victim's resident pages (task->mm->rss_stat[]).
    ("GADGET_OFF_TASK_MM", "task_struct", "mm", None, False),
    # Optional, for bpf/gadget_user_stack.h: the executable (mm->exe_file's inode, device and
    # mtime), the address-space hash (mm, start_code, start_stack) and the pid in the first
    # two pid namespaces (task->thread_pid->numbers[]).
    ("GADGET_OFF_MM_EXE_FILE", "mm_struct", "exe_file", None, False),
    ("GADGET_OFF_MM_START_CODE", "mm_struct", "start_code", 8, False),
    ("GADGET_OFF_MM_START_STACK", "mm_struct", "start_stack", 8, False),
    ("GADGET_OFF_INODE_MTIME_SEC", "inode", "i_mtime_sec", 8, False),  # since 6.11
    ("GADGET_OFF_INODE_MTIME_NSEC", "inode", "i_mtime_nsec", 4, False),
    ("GADGET_OFF_TASK_THREAD_PID", "task_struct", "thread_pid", None, False),
    ("GADGET_OFF_PID_LEVEL", "pid", "level", 4, False),
    ("GADGET_OFF_PID_NUMBERS", "pid", "numbers", 0, False),
    ("GADGET_OFF_UPID_NR", "upid", "nr", 4, False),
    ("GADGET_OFF_UPID_NS", "upid", "ns", None, False),
    ("GADGET_OFF_PID_NS_INUM", "pid_namespace", "ns.inum", 4, False),
    # Optional, for paths of `struct path`s and executables (bpf/gadget_path.h,
    # bpf/gadget_exe.h: trace_open's fpath, trace_exec's cwd/exepath/file/tty/ctime/upper layer,
    # trace_dns's cwd/exepath).
    ("GADGET_OFF_TASK_FS", "task_struct", "fs", None, False),
    ("GADGET_OFF_FS_ROOT", "fs_struct", "root", 16, False),
    ("GADGET_OFF_FS_PWD", "fs_struct", "pwd", 16, False),
    ("GADGET_OFF_PATH_MNT", "path", "mnt", None, False),
    ("GADGET_OFF_PATH_DENTRY", "path", "dentry", None, False),
    ("GADGET_OFF_FILE_PATH", "file", "f_path", 16, False),
    ("GADGET_OFF_SB_MAGIC", "super_block", "s_magic", 8, False),
    ("GADGET_OFF_TASK_SIGNAL", "task_struct", "signal", None, False),
    ("GADGET_OFF_SIGNAL_TTY", "signal_struct", "tty", None, False),
    ("GADGET_OFF_TTY_INDEX", "tty_struct", "index", 4, False),
    ("GADGET_OFF_TTY_DRIVER", "tty_struct", "driver", None, False),
    ("GADGET_OFF_TTY_DRIVER_MAJOR", "tty_driver", "major", 4, False),
    ("GADGET_OFF_TTY_DRIVER_MINOR_START", "tty_driver", "minor_start", 4, False),
)

# Optional members that moved between kernel versions: macro -> (struct, [(path, sizes the C
# code can read)]), the first that exists wins. An inode's change time: i_ctime_sec and
# i_ctime_nsec since 6.11, __i_ctime (timespec64) in 6.6-6.10, i_ctime before (nanoseconds are
# read as their low 32 bits, which hold all of them).
_MOVED_FIELDS: tuple[tuple[str, str, tuple[tuple[str, tuple[int, ...]], ...]], ...] = (
    ("GADGET_OFF_INODE_CTIME_SEC", "inode", (("i_ctime_sec", (8,)), ("__i_ctime.tv_sec", (8,)),
                                             ("i_ctime.tv_sec", (8,)))),
    ("GADGET_OFF_INODE_CTIME_NSEC", "inode", (("i_ctime_nsec", (4,)),
                                              ("__i_ctime.tv_nsec", (4, 8)),
                                              ("i_ctime.tv_nsec", (4, 8)))),
)

# Optional type sizes: (macro, type) -> GADGET_SIZE_<macro>.
_SIZES: tuple[tuple[str, str], ...] = (
    ("GADGET_SIZE_UPID", "struct upid"),
    # An overlayfs inode's upper dentry follows the VFS inode (ovl_inode).
    ("GADGET_SIZE_INODE", "struct inode"),
)

NR_MM_COUNTERS = 4  # MM_FILEPAGES, MM_ANONPAGES, MM_SWAPENTS, MM_SHMEMPAGES


def _mm_rss(btf: KernelBTF) -> dict[str, int]:
    """Where ``mm_struct.rss_stat[i]``'s count is: ``GADGET_OFF_MM_RSS_STAT`` (the array),
    ``GADGET_MM_RSS_STRIDE`` (bytes per counter) and ``GADGET_OFF_MM_RSS_COUNT`` (the count's
    offset in one). Since 6.2 the counters are ``struct percpu_counter`` (their global ``count``
    is what get_mm_counter() reads); before, ``atomic_long_t``. Empty when the kernel has
    neither shape."""
    try:
        base = btf.offsetof("mm_struct", "rss_stat")
        size = btf._member_size("mm_struct", "rss_stat")
    except BTFError:
        return {}
    stride, rem = divmod(size, NR_MM_COUNTERS)
    if rem:
        return {}
    if stride == 8:
        count = 0  # struct mm_rss_stat { atomic_long_t count[NR_MM_COUNTERS]; }
    else:
        try:
            if btf.sizeof("struct percpu_counter") != stride:
                return {}
            count = btf.offsetof("percpu_counter", "count")
        except BTFError:
            return {}
    return {"GADGET_OFF_MM_RSS_STAT": base, "GADGET_MM_RSS_STRIDE": stride,
            "GADGET_OFF_MM_RSS_COUNT": count}

# Optional bitfields: (macro suffix, struct, member path) -> GADGET_BIT_<suffix> (bit offset from
# the struct's start) and GADGET_BITS_<suffix> (width); gadget_net.h reads the enclosing byte.
_BITFIELDS: tuple[tuple[str, str, str], ...] = (
    ("SK_REUSE", "sock", "__sk_common.skc_reuse"),
    ("SK_REUSEPORT", "sock", "__sk_common.skc_reuseport"),
)


def _bitfield(btf: KernelBTF, struct_name: str, path: str) -> tuple[int, int] | None:
    """(bit offset, width) of a bitfield member, or None when no struct has it."""
    for tid in btf._struct_ids(struct_name):
        try:
            bits, _, width = btf._member_path(tid, struct_name, path.split("."))
        except BTFError:
            continue
        if width:
            return bits, width
    return None


# The user registers a syscall's arguments arrive in, as members of the kernel's pt_regs: the
# registers are saved at syscall entry and still hold the arguments at sys_exit (arm64 keeps
# the first argument in orig_x0, since x0 takes the return value).
_SYSCALL_ARG_REGS: tuple[tuple[str, ...], ...] = (
    ("di", "si", "dx", "r10"),  # x86_64
    ("orig_x0", "regs", "regs", "regs"),  # arm64: regs[1], regs[2], regs[3]
)


def syscall_arg_offsets(btf: KernelBTF) -> dict[str, int]:
    """``GADGET_OFF_SYSCALL_ARG0..3`` (offsets in ``struct pt_regs`` of a syscall's first four
    arguments) and ``GADGET_SYSCALL_ARGS_AT_EXIT``, when the kernel has the helpers that reach
    the current task's saved registers (``bpf_get_current_task_btf``, ``bpf_task_pt_regs``:
    Linux 5.15) and its pt_regs is one of the known layouts; else nothing, and programs keep the
    arguments from sys_enter in a map (see bpf/gadget_syscall.h)."""
    if (btf.enum_value("bpf_func_id", "BPF_FUNC_task_pt_regs") is None
            or btf.enum_value("bpf_func_id", "BPF_FUNC_get_current_task_btf") is None):
        return {}
    for names in _SYSCALL_ARG_REGS:
        try:
            offs = [btf.offsetof("pt_regs", n) for n in names]
            if any(btf._member_size("pt_regs", n) != 8 for n in set(names) - {"regs"}):
                continue
        except BTFError:
            continue
        if names[1] == "regs":  # an array: the arguments are its elements 1..3
            offs = [offs[0], offs[1] + 8, offs[2] + 16, offs[3] + 24]
        out = {f"GADGET_OFF_SYSCALL_ARG{i}": o for i, o in enumerate(offs)}
        out["GADGET_SYSCALL_ARGS_AT_EXIT"] = 1
        return out
    return {}


def task_offsets(btf: KernelBTF) -> dict[str, int]:
    """Offsets ``bpf/gadget_types.h`` needs, keyed by the macro name it expects.

    ``GADGET_OFF_TASK_LOGINUID`` and ``GADGET_OFF_TASK_SESSIONID`` are left out when the kernel
    lacks those members (no CONFIG_AUDIT); every other key is always present.  Raises
    :class:`BTFError` when a required member is missing or any member's size differs from what
    the C code reads (pointers must be 8 bytes), since the gadget would then read garbage.
    """
    offsets: dict[str, int] = {}
    for macro, struct_name, path, size, required in _TASK_FIELDS:
        try:
            offset = btf.offsetof(struct_name, path)
        except BTFError:
            if required:
                raise
            continue
        want = 8 if size is None else size  # None = a pointer, read as a u64
        actual = btf._member_size(struct_name, path) if want else 0  # 0: an embedded struct
        if actual != want:
            raise BTFError(f"{struct_name}.{path} is {actual} bytes in the running kernel; "
                           f"gadget_types.h reads {want}")
        offsets[macro] = offset
    offsets.update(_mm_rss(btf))
    for macro, struct_name, choices in _MOVED_FIELDS:
        for path, sizes in choices:
            try:
                offset = btf.offsetof(struct_name, path)
            except BTFError:
                continue
            if btf._member_size(struct_name, path) in sizes:
                offsets[macro] = offset
            break
    for macro, type_name in _SIZES:
        try:
            offsets[macro] = btf.sizeof(type_name)
        except BTFError:
            continue
    for suffix, struct_name, path in _BITFIELDS:
        bit = _bitfield(btf, struct_name, path)
        if bit is not None:
            offsets[f"GADGET_BIT_{suffix}"], offsets[f"GADGET_BITS_{suffix}"] = bit
    offsets.update(syscall_arg_offsets(btf))
    return offsets


@functools.cache
def _running_kernel_cflags() -> tuple[str, ...]:
    # Cached per process: the running kernel's BTF cannot change under us.
    return tuple(_cflags(task_offsets(KernelBTF.load())))


def _cflags(offsets: dict[str, int]) -> list[str]:
    return [f"-D{macro}={offset}" for macro, offset in offsets.items()]


def gadget_cflags(btf: KernelBTF | None = None) -> list[str]:
    """``-D`` flags defining every ``GADGET_OFF_*`` macro, to pass to ``bcc.BPF(cflags=...)``.

    With no ``btf`` the running kernel's BTF is loaded once per process and the result reused.
    Raises :class:`BTFError` (or :class:`OSError` when the BTF file is unreadable) as
    :func:`task_offsets` does.  Returns a new list each call, so callers may extend it.
    """
    if btf is None:
        return list(_running_kernel_cflags())
    return _cflags(task_offsets(btf))
