"""Kernel BTF offsets (pipeline.sources.btf) and the shared gadget C headers, on the real kernel.

The offsets are cross-checked against bpftool's own BTF dump; the headers are compiled with bcc
into real programs on the ``syscalls:sys_enter_getppid`` tracepoint, triggered by ``os.getppid()``
from this process, its threads and child processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.sources.btf import BTFError, KernelBTF, gadget_cflags, task_offsets

VMLINUX = "/sys/kernel/btf/vmlinux"
BPF_DIR = Path(__file__).resolve().parents[2] / "pipeline" / "sources" / "bpf"
# bcc 0.26 warns (DeprecationWarning) on str names and source text, so pass bytes.
TRACEPOINT_FN = b"tracepoint__syscalls__sys_enter_getppid"

pytestmark = [
    pytest.mark.bpf,
]


# -- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def btf() -> KernelBTF:
    return KernelBTF.load()


@pytest.fixture(scope="module")
def bpftool_types() -> dict[str, list[dict[str, Any]]]:
    """bpftool's raw JSON dump of the kernel BTF, as name -> types with that name."""
    if shutil.which("bpftool") is None:
        pytest.fail("bpftool is not installed: run scripts/setup base")
    out = subprocess.run(["bpftool", "-j", "btf", "dump", "file", VMLINUX],
                         check=True, capture_output=True).stdout
    by_name: dict[str, list[dict[str, Any]]] = {}
    types = json.loads(out)["types"]
    for t in types:
        by_name.setdefault(t.get("name") or "", []).append(t)
    by_name["#by_id"] = types  # ids are 1-based and dense
    return by_name


def _bpftool_struct(types: dict[str, list[dict[str, Any]]], name: str) -> dict[str, Any]:
    [t] = [t for t in types[name] if t["kind"] in ("STRUCT", "UNION")]
    return t


def _flat_members(types: dict[str, list[dict[str, Any]]], struct: dict[str, Any],
                  base_bits: int = 0) -> Iterator[tuple[str, int, int]]:
    """(name, bit offset, bitfield size) of every named member, descending into anonymous
    struct/union members (the lookup offsetof() must do)."""
    by_id = types["#by_id"]
    for m in struct["members"]:
        bits = base_bits + m["bits_offset"]
        if m["name"] != "(anon)":
            yield m["name"], bits, m.get("bitfield_size", 0)
            continue
        t = by_id[m["type_id"] - 1]
        while t["kind"] in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
            t = by_id[t["type_id"] - 1]
        if t["kind"] in ("STRUCT", "UNION"):
            yield from _flat_members(types, t, bits)


BPFCompiler = Callable[..., Any]


@pytest.fixture
def compile_bpf() -> Iterator[BPFCompiler]:
    """Compile (and attach) bcc programs with the gadget offsets and include path; detached at
    the end of the test."""
    bcc = __import__("bcc")
    loaded: list[Any] = []

    def build(text: str, *extra_cflags: str) -> Any:
        b = bcc.BPF(text=text.encode(), cflags=[*gadget_cflags(), f"-I{BPF_DIR}", *extra_cflags])
        loaded.append(b)
        return b

    yield build
    for b in loaded:
        b.cleanup()


def _child_python() -> str:
    # A system interpreter, so children that drop to another uid can still execute it.
    return shutil.which("python3", path="/usr/bin:/bin") or sys.executable


def _run_child(comm: str | None = None, prefix: tuple[str, ...] = (),
               **popen: Any) -> int:
    """Run a child process that optionally renames itself to ``comm``, then calls getppid().
    Returns its pid (which is also the tgid the tracepoint sees: exec keeps the pid)."""
    code = ("import os,sys\n"
            "if len(sys.argv) > 1: open('/proc/self/comm', 'w').write(sys.argv[1])\n"
            "os.getppid()\n")
    argv = [*prefix, _child_python(), "-S", "-c", code, *([comm] if comm else [])]
    proc = subprocess.Popen(argv, **popen)
    assert proc.wait(timeout=30) == 0, argv
    return proc.pid


def _in_thread(fn: Callable[[], None]) -> int:
    """Run ``fn`` in a new thread; return that thread's kernel tid."""
    tid: list[int] = []
    errors: list[BaseException] = []

    def body() -> None:
        tid.append(threading.get_native_id())
        try:
            fn()
        except BaseException as e:  # re-raised in the caller
            errors.append(e)

    t = threading.Thread(target=body)
    t.start()
    t.join(timeout=30)
    if errors:
        raise errors[0]
    return tid[0]


def _getppid() -> None:
    os.getppid()


def _comm(path: str) -> str:
    return Path(path).read_text().rstrip("\n")


# -- the BTF parser -------------------------------------------------------------------------------


def test_load_is_fast() -> None:
    start = time.perf_counter()
    KernelBTF.load()
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"loading {VMLINUX} took {elapsed:.3f}s"


@pytest.mark.parametrize("struct", ["task_struct", "nsproxy", "mnt_namespace", "ns_common", "cred"])
def test_every_member_offset_matches_bpftool(
        btf: KernelBTF, bpftool_types: dict[str, list[dict[str, Any]]], struct: str) -> None:
    members = list(_flat_members(bpftool_types, _bpftool_struct(bpftool_types, struct)))
    assert members
    checked = 0
    for name, bits, bitfield in members:
        if bitfield or bits % 8:
            with pytest.raises(BTFError, match="bitfield"):
                btf.offsetof(struct, name)
        else:
            assert btf.offsetof(struct, name) == bits // 8, (struct, name)
            checked += 1
    assert checked > 0


def test_sizeof_matches_bpftool(btf: KernelBTF,
                                bpftool_types: dict[str, list[dict[str, Any]]]) -> None:
    for name in ("task_struct", "nsproxy", "mnt_namespace"):
        assert btf.sizeof(name) == _bpftool_struct(bpftool_types, name)["size"], name
        assert btf.sizeof(f"struct {name}") == btf.sizeof(name)
    assert btf.sizeof("pid_t") == 4          # typedef -> int
    assert btf.sizeof("kuid_t") == 4         # typedef -> anonymous struct
    assert btf.sizeof("unsigned int") == 4
    assert btf.sizeof("long unsigned int") == 8


def test_member_order_matches_bpftool_c_dump(btf: KernelBTF) -> None:
    """Members of task_struct, in the order bpftool's C dump declares them, have increasing
    offsets, and the well-known ones sit in the documented order."""
    if shutil.which("bpftool") is None:
        pytest.fail("bpftool is not installed: run scripts/setup base")
    c = subprocess.run(["bpftool", "btf", "dump", "file", VMLINUX, "format", "c"],
                       check=True, capture_output=True, text=True).stdout
    body = re.search(r"^struct task_struct \{\n(.*?)^\};", c, re.M | re.S)
    assert body is not None
    names = []
    depth = 0
    for line in body.group(1).splitlines():
        # Only direct members (depth 0); skip nested anonymous struct bodies and bitfields.
        if depth == 0 and ":" not in line and (m := re.search(r"(\w+)(\[\d+\])*;\s*$", line)):
            names.append(m.group(1))
        depth += line.count("{") - line.count("}")
    offsets = [btf.offsetof("task_struct", n) for n in names]
    assert len(names) > 50
    assert offsets == sorted(offsets)
    order = [names.index(n) for n in ("pid", "tgid", "real_parent", "cred", "comm", "nsproxy")]
    assert order == sorted(order)


def test_dotted_paths_typedefs_and_anonymous_members(btf: KernelBTF) -> None:
    ns = btf.offsetof("mnt_namespace", "ns")
    assert btf.offsetof("mnt_namespace", "ns.inum") == ns + btf.offsetof("ns_common", "inum")
    # loginuid is a kuid_t: a typedef of an anonymous struct holding 'val'.
    if "GADGET_OFF_TASK_LOGINUID" in task_offsets(btf):
        assert btf.offsetof("task_struct", "loginuid.val") == btf.offsetof("task_struct",
                                                                           "loginuid")
    # 'mounts' lives in an anonymous struct inside mnt_namespace on recent kernels; either way
    # it must be found as a direct member.
    assert btf.offsetof("mnt_namespace", "mounts") > ns


def test_missing_member_raises_clear_error(btf: KernelBTF) -> None:
    with pytest.raises(BTFError, match=r"'task_struct'.*no member 'no_such_member'"):
        btf.offsetof("task_struct", "no_such_member")
    with pytest.raises(BTFError, match=r"'ns'.*'mnt_namespace'.*no member 'nope'"):
        btf.offsetof("mnt_namespace", "ns.nope")
    with pytest.raises(BTFError, match=r"no struct or union named 'no_such_struct'"):
        btf.offsetof("no_such_struct", "pid")
    with pytest.raises(BTFError, match=r"'real_parent'.*pointer.*does not follow pointers"):
        btf.offsetof("task_struct", "real_parent.pid")
    with pytest.raises(BTFError, match="no type named 'no_such_type'"):
        btf.sizeof("no_such_type")


def test_malformed_blob_raises() -> None:
    with pytest.raises(BTFError, match="magic"):
        KernelBTF(b"\0" * 64)
    with pytest.raises(BTFError, match="too short"):
        KernelBTF(b"\x9f\xeb")


def test_task_offsets_and_cflags(btf: KernelBTF) -> None:
    offsets = task_offsets(btf)
    assert offsets["GADGET_OFF_TASK_PID"] == btf.offsetof("task_struct", "pid")
    assert offsets["GADGET_OFF_TASK_TGID"] == offsets["GADGET_OFF_TASK_PID"] + 4
    assert offsets["GADGET_OFF_MNT_NS_INUM"] == btf.offsetof("mnt_namespace", "ns.inum")
    assert {"GADGET_OFF_TASK_COMM", "GADGET_OFF_TASK_REAL_PARENT", "GADGET_OFF_TASK_NSPROXY",
            "GADGET_OFF_NSPROXY_MNT_NS"} <= offsets.keys()
    flags = gadget_cflags(btf)
    assert flags == [f"-D{k}={v}" for k, v in offsets.items()]
    again = gadget_cflags()
    assert again == flags == gadget_cflags()
    again.append("-DX")  # callers own the list they get back
    assert gadget_cflags() == flags


# -- gadget_types.h -------------------------------------------------------------------------------


POPULATE_PROG = r"""
#include "gadget_types.h"

struct out {
    struct gadget_process in_map;   /* populated in place in the map value */
    struct gadget_process on_stack; /* populated on the stack, then copied */
    u64 mntns_id;
    u32 loginuid;
    u32 sessionid;
};
BPF_ARRAY(result, struct out, 1);
BPF_ARRAY(sizes, u32, 1);

TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    int zero = 0;
    struct gadget_process p = {};
    struct out *o;
    u32 size = sizeof(struct gadget_process);

    if ((u32)(bpf_get_current_pid_tgid() >> 32) != TARGET_PID)
        return 0;
    o = result.lookup(&zero);
    if (!o)
        return 0;
    gadget_process_populate(&o->in_map);
    gadget_process_populate(&p);
    __builtin_memcpy(&o->on_stack, &p, sizeof(p));
    o->mntns_id = gadget_get_mntns_id();
    o->loginuid = gadget_loginuid();
    o->sessionid = gadget_sessionid();
    sizes.update(&zero, &size);
    return 0;
}
"""


def test_gadget_process_populate(compile_bpf: BPFCompiler) -> None:
    b = compile_bpf(POPULATE_PROG, f"-DTARGET_PID={os.getpid()}")
    worker_comm = "gp-btf-worker"
    seen: dict[str, Any] = {}

    def trigger() -> None:
        # A distinct thread comm and tid != pid make comm and tid assertions meaningful.
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(worker_comm)
        seen["ppid"] = os.getppid()

    tid = _in_thread(trigger)
    assert tid != os.getpid()
    ppid = seen["ppid"]
    out = b[b"result"][0]
    assert b[b"sizes"][0].value == 64
    for p in (out.in_map, out.on_stack):
        assert p.pid == os.getpid()
        assert p.tid == tid
        assert p.comm.decode() == worker_comm
        assert p.creds.uid == os.getuid()
        assert p.creds.gid == os.getgid()
        assert p.mntns_id == os.stat("/proc/self/ns/mnt").st_ino
        assert p.parent.pid == ppid
        # The parent's main thread (tid == tgid) unless it is itself multithreaded and forked
        # us from another thread; either way it is one of its threads.
        assert str(p.parent.tid) in os.listdir(f"/proc/{ppid}/task")
        assert p.parent.comm.decode() == _comm(f"/proc/{ppid}/comm")
    assert out.mntns_id == os.stat("/proc/self/ns/mnt").st_ino
    if "GADGET_OFF_TASK_LOGINUID" in task_offsets(KernelBTF.load()):
        assert out.loginuid == int(_comm("/proc/self/loginuid"))
        assert out.sessionid == int(_comm("/proc/self/sessionid"))
    else:
        assert out.loginuid == out.sessionid == 0xFFFFFFFF


def test_gadget_process_layout(compile_bpf: BPFCompiler) -> None:
    """The struct as bcc laid it out, seen through the ctypes class bcc built from it."""
    import ctypes

    b = compile_bpf(POPULATE_PROG, f"-DTARGET_PID={os.getpid()}")
    cls = type(b[b"result"][0].in_map)
    assert ctypes.sizeof(cls) == 64
    offsets = {name: getattr(cls, name).offset for name, *_ in cls._fields_}
    assert offsets == {"comm": 0, "pid": 16, "tid": 20, "mntns_id": 24, "creds": 32,
                       "parent": 40}
    parent = type(b[b"result"][0].in_map.parent)
    assert {name: getattr(parent, name).offset for name, *_ in parent._fields_} == {
        "comm": 0, "pid": 16, "tid": 20}


def test_missing_offsets_fail_to_compile() -> None:
    bcc = __import__("bcc")
    with pytest.raises(Exception, match="compile"):
        bcc.BPF(text=b'#include "gadget_types.h"\n', cflags=[f"-I{BPF_DIR}"])


# -- gadget_filter.h ------------------------------------------------------------------------------


FILTER_PROG = r"""
#include "gadget_filter.h"

BPF_HASH(seen, u32, u32, 10240);    /* tid -> tgid of every getppid() */
BPF_HASH(passed, u32, u32, 10240);  /* tid -> tgid of those the filters let through */

TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tid = pid_tgid, tgid = pid_tgid >> 32;

    seen.update(&tid, &tgid);
    if (gadget_should_discard())
        return 0;
    passed.update(&tid, &tgid);
    return 0;
}
"""


class Events:
    def __init__(self, b: Any) -> None:
        self.seen_tgids = {v.value for v in b[b"seen"].values()}
        self.passed_tgids = {v.value for v in b[b"passed"].values()}
        self.seen_tids = {k.value for k in b[b"seen"]}
        self.passed_tids = {k.value for k in b[b"passed"]}

    def passed(self, tgid: int) -> bool:
        assert tgid in self.seen_tgids, f"tgid {tgid} never reached the tracepoint"
        return tgid in self.passed_tgids


def test_no_filter_passes_everything(compile_bpf: BPFCompiler) -> None:
    b = compile_bpf(FILTER_PROG)
    os.getppid()
    child = _run_child()
    ev = Events(b)
    assert ev.passed(os.getpid())
    assert ev.passed(child)


def test_no_filter_compiles_to_nothing(compile_bpf: BPFCompiler) -> None:
    with_filter = compile_bpf(FILTER_PROG).dump_func(TRACEPOINT_FN)
    without = compile_bpf(FILTER_PROG.replace("if (gadget_should_discard())", "if (0)"))
    assert len(with_filter) == len(without.dump_func(TRACEPOINT_FN))


def test_pid_filter(compile_bpf: BPFCompiler) -> None:
    b = compile_bpf(FILTER_PROG, f"-DGADGET_FILTER_PID={os.getpid()}")
    os.getppid()
    worker = _in_thread(_getppid)
    child = _run_child()
    ev = Events(b)
    assert ev.passed(os.getpid())
    assert not ev.passed(child)
    # Threads share their process's pid (the tgid), so the worker passes as well.
    assert worker in ev.passed_tids
    assert ev.passed_tgids == {os.getpid()}


def test_tid_filter(compile_bpf: BPFCompiler) -> None:
    ready, go, done = threading.Event(), threading.Event(), threading.Event()
    tid: list[int] = []

    def worker() -> None:
        tid.append(threading.get_native_id())
        ready.set()
        go.wait(30)
        os.getppid()
        done.set()

    t = threading.Thread(target=worker)
    t.start()
    ready.wait(30)
    try:
        b = compile_bpf(FILTER_PROG, f"-DGADGET_FILTER_TID={tid[0]}")
    finally:
        go.set()
        t.join(30)
    assert done.is_set()
    os.getppid()
    ev = Events(b)
    assert tid[0] in ev.passed_tids
    assert os.getpid() in ev.seen_tids
    assert os.getpid() not in ev.passed_tids
    assert ev.passed_tids == {tid[0]}


def test_comm_filter(compile_bpf: BPFCompiler) -> None:
    b = compile_bpf(FILTER_PROG, '-DGADGET_FILTER_COMM="gp-comm-yes"')
    os.getppid()
    yes = _run_child("gp-comm-yes")
    no = _run_child("gp-comm-no")
    prefix = _run_child("gp-comm-ye")       # a prefix of the filter is not a match
    longer = _run_child("gp-comm-yes-and")  # the filter is a prefix of it: no match either
    ev = Events(b)
    assert ev.passed(yes)
    assert not ev.passed(no)
    assert not ev.passed(prefix)
    assert not ev.passed(longer)
    assert not ev.passed(os.getpid())


def test_comm_filter_longer_than_task_comm(compile_bpf: BPFCompiler) -> None:
    # The kernel truncates comm to 15 characters; a longer filter matches the truncated name.
    name = "gp-a-very-long-process-name"
    b = compile_bpf(FILTER_PROG, f'-DGADGET_FILTER_COMM="{name}"')
    match = _run_child(name)
    other = _run_child("gp-a-very-long")  # a prefix of the truncated name
    ev = Events(b)
    assert ev.passed(match)
    assert not ev.passed(other)


def test_comm_filter_needs_a_string_literal(compile_bpf: BPFCompiler) -> None:
    with pytest.raises(Exception, match="compile"):
        compile_bpf(FILTER_PROG, "-DGADGET_FILTER_COMM=bash")


def test_uid_and_gid_filters(compile_bpf: BPFCompiler) -> None:
    nobody = 65534
    by_uid = compile_bpf(FILTER_PROG, f"-DGADGET_FILTER_UID={nobody}")
    by_gid = compile_bpf(FILTER_PROG, f"-DGADGET_FILTER_GID={nobody}")
    # setpriv drops the ids and execs in place (the pid stays the child's). Popen's own
    # user=/group= would fork() this grpcio-threaded process and run grpc's atfork
    # handlers in the child, which crashed it once in CI (SIGSEGV before exec).
    as_nobody = _run_child(prefix=("setpriv", f"--reuid={nobody}", f"--regid={nobody}",
                                   "--clear-groups"))
    as_us = _run_child()
    for b in (by_uid, by_gid):
        ev = Events(b)
        assert ev.passed(as_nobody)
        assert not ev.passed(as_us)


def test_mntns_filter(compile_bpf: BPFCompiler) -> None:
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is not installed")
    ours = os.stat("/proc/self/ns/mnt").st_ino
    b = compile_bpf(FILTER_PROG, f"-DGADGET_FILTER_MNTNS={ours}")
    os.getppid()
    same = _run_child()
    # unshare execs the child in place (no --fork), so its pid is the Popen pid.
    other = _run_child(prefix=("unshare", "--mount"))
    ev = Events(b)
    assert ev.passed(os.getpid())
    assert ev.passed(same)
    assert not ev.passed(other)


def test_filters_combine(compile_bpf: BPFCompiler) -> None:
    b = compile_bpf(FILTER_PROG, f"-DGADGET_FILTER_PID={os.getpid()}",
                    '-DGADGET_FILTER_COMM="gp-never-this"')
    os.getppid()
    ev = Events(b)
    assert not ev.passed(os.getpid())  # right pid, wrong comm
