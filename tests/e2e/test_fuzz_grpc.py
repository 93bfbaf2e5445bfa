"""Bad input, fuzzed: every request message of the gadget service, hand-encoded on the wire.

One real daemon serves the module. Hypothesis builds each request message field by field with
a small protobuf wire encoder (below), so a ``string`` field can carry bytes that are not UTF-8,
a map thousands of entries, a timeout a negative number, and a body can be bytes that are not
protobuf at all. They go out through grpcio's raw multicallables (identity serializers), as
unary calls and as ``stream_stream`` conversations in any order (stop before run, two runs,
attach then garbage, no message at all, a unary method fed two messages).

Every call must be answered within :data:`CALL_BOUND` seconds, with OK or an error status
carrying a message, never ``UNKNOWN`` (grpclib's answer to an exception a handler did not
expect). A message past the 4 MiB limit must be refused before the daemon buffers it, and bytes
that are not HTTP/2 must not keep it from serving others. After the whole run the daemon must
still answer a normal GetGadgetInfo and run trace_exec, hold no more BPF programs than before,
and its VmRSS must not have grown past :data:`RSS_GROWTH_BOUND`.

``GADGETPIPE_FUZZ_EXAMPLES=N`` runs N examples per test with a random seed (a deeper, slower
search); by default the examples are few and derandomized, so CI sees the same ones each time.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.client import channel_target
from pipeline._gen import gadget_service_pb2 as pb
from tests.daemon import DaemonProcess
from tests.e2e.helpers import bpf_programs_of, keep_running, unique_binary

pytestmark = pytest.mark.bpf

CALL_BOUND = 30.0
"""Seconds a call may take: long enough for a BPF compile on a loaded 2-core machine."""
RSS_GROWTH_BOUND = 256 << 20
"""Bytes the daemon's VmRSS may grow over the whole fuzz run (baseline ~240 MiB, mostly LLVM)."""
MAX_SEND = 64 << 20

GET_GADGET_INFO = "/api.GadgetManager/GetGadgetInfo"
RUN_GADGET = "/api.GadgetManager/RunGadget"
GET_INFO = "/api.BuiltInGadgetManager/GetInfo"
RUN_BUILTIN = "/api.BuiltInGadgetManager/RunBuiltInGadget"
CREATE_INSTANCE = "/api.GadgetInstanceManager/CreateGadgetInstance"
LIST_INSTANCES = "/api.GadgetInstanceManager/ListGadgetInstances"
GET_INSTANCE = "/api.GadgetInstanceManager/GetGadgetInstance"
REMOVE_INSTANCE = "/api.GadgetInstanceManager/RemoveGadgetInstance"
UNARY_METHODS = (GET_GADGET_INFO, GET_INFO, CREATE_INSTANCE, LIST_INSTANCES, GET_INSTANCE,
                 REMOVE_INSTANCE)
TARGET_NAME = "fuzz-target"
EVENT_INFO = 4
T = TypeVar("T")


def fuzz_settings(examples: int) -> settings:
    deep = int(os.environ.get("GADGETPIPE_FUZZ_EXAMPLES", "0") or 0)
    return settings(max_examples=deep or examples, derandomize=not deep, deadline=None,
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


# -- protobuf wire encoding -----------------------------------------------------------------------


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32/int64 go out as ten-byte two's complement, as protobuf
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def f_varint(field: int, value: int) -> bytes:
    return tag(field, 0) + varint(value)


def f_bytes(field: int, value: bytes) -> bytes:
    """A length-delimited field: a string (any bytes, UTF-8 or not), bytes or a message."""
    return tag(field, 2) + varint(len(value)) + value


def f_map(field: int, items: Sequence[tuple[bytes, bytes]]) -> bytes:
    return b"".join(f_bytes(field, f_bytes(1, k) + f_bytes(2, v)) for k, v in items)


def f_repeated(field: int, items: Sequence[bytes]) -> bytes:
    return b"".join(f_bytes(field, v) for v in items)


# -- strategies -----------------------------------------------------------------------------------

INVALID_UTF8 = (b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                b"trace_exec\xff", b"\x80abc")
KNOWN_KEYS = ("operator.filter.filter", "operator.fields.fields", "operator.grpc.batch-max",
              "operator.grpc.batch-linger", "operator.bcc.ringbuf-size",
              "operator.bcc.drain-interval", "operator.bcc.wakeup-fill",
              "operator.bcc.drain-min-bytes", "operator.bcc.drain-max-wait",
              "operator.oci.ebpf.comm", "operator.oci.ebpf.pid", "operator.oci.ebpf.mntns",
              "operator.oci.ebpf.ignore-failed", "operator.enrich.node", "operator.bcc.shed",
              "operator.bcc.shed-low", "operator.bcc.shed-max",
              "operator.kafka.enbale", "operator.jsonl.bogus", "operator.cli.output",
              "operator.sort.sort", "ignore-failed", "runtime.containername")
KEY_PREFIXES = ("operator.oci.ebpf.", "operator.filter.", "operator.cli.", "operator.grpc.",
                "operator.bcc.", "", "operator.x.", "runtime.")
IMAGES = ("trace_exec", "ghcr.io/inspektor-gadget/gadget/trace_exec:latest", "trace_open",
          "snapshot_process", "top_file", "trace_exec:main", "", "no_such_gadget",
          "../../etc/passwd", "trace_exec@sha256:00", "TRACE_EXEC")


def long_bytes(lo: int, hi: int) -> st.SearchStrategy[bytes]:
    """Long values built rather than drawn byte by byte (drawing 100 KiB is slow)."""
    return st.builds(lambda n, b: (b * (n // max(len(b), 1) + 1))[:n],
                     st.integers(lo, hi), st.sampled_from([b"a", b"\xc2\xa0", b"\xff", b"x=y,"]))


def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """One of ``choices``, each drawn in proportion to its weight."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


def strings(max_size: int = 40) -> st.SearchStrategy[bytes]:
    """Mostly valid UTF-8 (so the message parses and a handler sees it), sometimes not, or
    huge."""
    return weighted(
        (20, st.text(max_size=max_size).map(str.encode)),
        (1, st.binary(max_size=max_size)),
        (1, st.sampled_from(INVALID_UTF8)),
        (1, long_bytes(1_000, 300_000)),
    )


def values() -> st.SearchStrategy[bytes]:
    return st.one_of(strings(), st.sampled_from([b"", b"0", b"-1", b"true", b"1s", b"-5s",
                                                 b"4294967296", b"proc.comm==x", b"a~(((",
                                                 b"99999999999999999999999"]))


def keys() -> st.SearchStrategy[bytes]:
    return st.one_of(st.sampled_from(KNOWN_KEYS).map(str.encode),
                     st.builds(lambda p, k: p.encode() + k, st.sampled_from(KEY_PREFIXES),
                               strings(20)))


def huge_map() -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    """Thousands of params, under a prefix that is ignored or one that is checked strictly."""
    return st.builds(lambda n, prefix, v: [(f"{prefix}k{i}".encode(), v) for i in range(n)],
                     st.integers(1_000, 6_000), st.sampled_from(["operator.cli.", "unknown.",
                                                                 "operator.oci.ebpf."]),
                     st.sampled_from([b"", b"v", b"\xff", b"x" * 100]))


VALID_PARAMS = ((b"operator.grpc.batch-max", b"64"), (b"operator.oci.ebpf.comm", b"fuzzcomm"),
                (b"operator.filter.filter", b"proc.comm==x"),
                (b"operator.fields.fields", b"proc.comm,proc.pid"),
                (b"operator.bcc.ringbuf-size", b"65536"), (b"operator.bcc.drain-interval", b"5ms"),
                (b"operator.oci.ebpf.ignore-failed", b"false"), (b"operator.bcc.shed", b"true"))


def param_maps() -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    """Mostly params a run accepts (valid ones, and keys of other operators, which are
    ignored), so requests get past validation; sometimes anything, or thousands."""
    ignored = st.tuples(st.builds(lambda p, k: p + k, st.sampled_from(
        [b"operator.cli.", b"operator.sort.", b"unknown."]), strings(20)), values())
    return weighted(
        (3, st.just([])),
        (4, st.lists(st.one_of(st.sampled_from(VALID_PARAMS), ignored), max_size=6)),
        (3, st.lists(st.tuples(keys(), values()), max_size=6)),
        (1, huge_map()),
    )


def images() -> st.SearchStrategy[bytes]:
    return weighted((3, st.sampled_from(IMAGES).map(str.encode)), (1, strings()))


def ints() -> st.SearchStrategy[int]:
    """Varint values: small ones, edge values, negative ones (timeouts), beyond 32 bits."""
    return st.one_of(st.integers(-3, 3), st.sampled_from([
        1, 2, 4, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 32, -(1 << 31), -(1 << 63), (1 << 63) - 1,
        (1 << 64) - 1, -1_000_000_000, 100_000_000]), st.integers(-(1 << 63), (1 << 64) - 1))


def versions() -> st.SearchStrategy[int]:
    return weighted((4, st.just(1)), (1, ints()))


def timeouts() -> st.SearchStrategy[int]:
    """ns: mostly short or none, so a request that does start a run ends by itself."""
    return st.one_of(st.sampled_from([0, 1, 50_000_000, -1, -(1 << 63), -50_000_000]), ints())


@st.composite
def run_request(draw: st.DrawFn) -> bytes:
    """GadgetRunRequest fields (imageName 1, paramValues 2, args 3, version 4, logLevel 12,
    timeout 13), each present or not, in any order, any field possibly repeated."""
    fields = [
        f_bytes(1, draw(images())),
        f_map(2, draw(param_maps())),
        f_repeated(3, draw(st.one_of(
            st.lists(strings(), max_size=4), st.lists(strings(), max_size=4),
            st.builds(lambda n: [b"arg"] * n, st.integers(1000, 20000)),
            st.builds(lambda b: [b], long_bytes(1 << 20, 3 << 20))))),
        f_varint(4, draw(versions())),
        f_varint(12, draw(ints())),
        f_varint(13, draw(timeouts())),
    ]
    keep = draw(st.lists(st.sampled_from(range(len(fields))), unique=True))
    if draw(st.integers(0, 3)) < 3:  # hypothesis favours 0, the plausible case
        keep = [0, 3, *keep]  # mostly a plausible run: an image and version 1
    return b"".join(fields[i] for i in keep) + draw(junk_fields())


@st.composite
def junk_fields(draw: st.DrawFn) -> bytes:
    """Unknown fields (ignored by protobuf), or known ones with the wrong wire type."""
    return draw(st.one_of(
        st.just(b""), st.just(b""),
        st.builds(lambda f, v: f_varint(f, v), st.integers(1, 60), ints()),
        st.builds(lambda f, v: f_bytes(f, v), st.integers(1, 60), st.binary(max_size=16)),
        st.builds(lambda f: tag(f, 5) + b"\0\0\0\0", st.integers(1, 60)),
    ))


def attach_request(live_id: str) -> st.SearchStrategy[bytes]:
    """GadgetAttachRequest (id 1, version 2)."""
    ids = st.one_of(st.just(live_id.encode()), st.just(live_id[:6].encode()),
                    st.just(TARGET_NAME.encode()), strings(), st.just(b"0" * 32))
    return st.builds(lambda i, v, j: f_bytes(1, i) + f_varint(2, v) + j, ids, versions(),
                     junk_fields())


def control(live_id: str) -> st.SearchStrategy[bytes]:
    """GadgetControlRequest: runRequest 1, stopRequest 2, attachRequest 3, none, or garbage."""
    return st.one_of(
        run_request().map(lambda b: f_bytes(1, b)),
        st.just(f_bytes(2, b"")),
        attach_request(live_id).map(lambda b: f_bytes(3, b)),
        st.just(b""),
        st.binary(min_size=1, max_size=64),
        st.builds(lambda r, a: f_bytes(1, r) + f_bytes(3, a), run_request(),
                  attach_request(live_id)),
    )


@st.composite
def builtin_run(draw: st.DrawFn) -> bytes:
    """BuiltInGadgetRunRequest: gadgetName 1, gadgetCategory 2, params 3, args 4, nodes 10,
    fanOut 11, logLevel 12, timeout 13."""
    name, category = draw(st.one_of(st.just((b"exec", b"trace")),
                                    st.tuples(strings(), strings()),
                                    st.tuples(st.sampled_from(INVALID_UTF8),
                                              st.just(b"trace"))))
    fields = [
        f_bytes(1, name), f_bytes(2, category), f_map(3, draw(param_maps())),
        f_repeated(4, draw(st.lists(strings(), max_size=3))),
        f_repeated(10, draw(st.one_of(st.just([]), st.just([socket.gethostname().encode()]),
                                      st.lists(strings(), max_size=3)))),
        f_varint(11, draw(st.sampled_from([0, 1, 2, 1 << 40]))),
        f_varint(12, draw(ints())),
        f_varint(13, draw(st.one_of(st.just(50_000_000), timeouts()))),
    ]
    keep = draw(st.lists(st.sampled_from(range(len(fields))), unique=True))
    if draw(st.integers(0, 3)) < 3:  # hypothesis favours 0, the plausible case
        keep = [0, 1, 7, *keep]
    return b"".join(fields[i] for i in keep) + draw(junk_fields())


def builtin_control() -> st.SearchStrategy[bytes]:
    return st.one_of(builtin_run().map(lambda b: f_bytes(1, b)), st.just(f_bytes(2, b"")),
                     st.just(b""), st.binary(min_size=1, max_size=64))


def conversation(first: st.SearchStrategy[bytes], any_message: st.SearchStrategy[bytes]
                 ) -> st.SearchStrategy[list[bytes]]:
    """Mostly a proper first message and then anything; sometimes anything at all."""
    return weighted(
        (3, st.builds(lambda f, rest: [f, *rest], first, st.lists(any_message, max_size=3))),
        (1, st.lists(any_message, max_size=4)),
    )


@st.composite
def get_gadget_info(draw: st.DrawFn) -> bytes:
    """GetGadgetInfoRequest: paramValues 1, imageName 2, version 3, flags 4, requestExtraInfo 5."""
    fields = [f_map(1, draw(param_maps())), f_bytes(2, draw(images())),
              f_varint(3, draw(versions())), f_varint(4, draw(st.one_of(st.sampled_from(
                  [0, 1, 2, 3, 0xFFFFFFFF]), ints()))),
              f_varint(5, draw(st.sampled_from([0, 1, 7])))]
    keep = draw(st.lists(st.sampled_from(range(len(fields))), unique=True))
    if draw(st.integers(0, 3)) < 3:  # hypothesis favours 0, the plausible case
        keep = [1, 2, *keep]
    return b"".join(fields[i] for i in keep) + draw(junk_fields())


def instance_ids(live_id: str) -> st.SearchStrategy[bytes]:
    return st.one_of(st.just(live_id.encode()), st.just(live_id[:8].encode()), strings(),
                     st.just(b"f" * 32), st.just(b"F" * 32), st.just(b"../" * 11))


@st.composite
def create_instance(draw: st.DrawFn, live_id: str) -> bytes:
    """CreateGadgetInstanceRequest: gadgetInstance 1 {id 1, gadgetConfig 2, tags 3,
    timeCreated 4, nodes 5, name 6, state 7 {status 1, message 2}}, eventBufferLength 2."""
    names = st.one_of(st.sampled_from([b"", b"fuzz-a", b"fuzz_b", TARGET_NAME.encode(),
                                       b"UPPER", b"a" * 33, b"\xff"]), strings())
    gi_fields = [
        f_bytes(1, draw(st.one_of(st.just(b""), instance_ids(live_id)))),
        f_bytes(2, draw(run_request())),
        f_repeated(3, draw(st.lists(strings(), max_size=3))),
        f_varint(4, draw(ints())),
        f_repeated(5, draw(st.one_of(st.just([]), st.lists(strings(), max_size=2)))),
        f_bytes(6, draw(names)),
        f_bytes(7, f_varint(1, draw(ints())) + f_bytes(2, draw(strings()))),
    ]
    keep = draw(st.lists(st.sampled_from(range(len(gi_fields))), unique=True))
    if draw(st.integers(0, 3)) < 3:  # hypothesis favours 0, the plausible case
        keep = [1, *keep]
    gi = b"".join(gi_fields[i] for i in keep)
    out = f_bytes(1, gi)
    if draw(st.booleans()):
        out += f_varint(2, draw(st.one_of(st.sampled_from([0, 1, 65536, 65537, -1]), ints())))
    return out + draw(junk_fields())


def garbage() -> st.SearchStrategy[bytes]:
    """Bodies that are not protobuf (truncated varints, lengths past the end, group tags)."""
    return st.one_of(st.binary(min_size=1, max_size=256),
                     st.sampled_from([b"\x0a\xff\xff\xff\xff\x0f", b"\x08", b"\x0a\x05ab",
                                      b"\x0b\x0c", b"\x80" * 11, b"\x12\x80\x80\x80\x80\x10"]),
                     long_bytes(5 << 20, 6 << 20))


# -- raw calls ------------------------------------------------------------------------------------


@dataclass
class Answer:
    code: grpc.StatusCode
    details: str
    responses: list[bytes]
    elapsed: float
    cancelled_after_first: bool = False


class RawChannel:
    """grpcio calls that send and receive bytes as they are (no protobuf on our side)."""

    def __init__(self, address: str) -> None:
        self._ch = grpc.insecure_channel(channel_target(address), options=[
            ("grpc.max_send_message_length", MAX_SEND),
            ("grpc.max_receive_message_length", MAX_SEND)])
        grpc.channel_ready_future(self._ch).result(timeout=10)

    def close(self) -> None:
        self._ch.close()

    def unary(self, method: str, body: bytes, timeout: float = CALL_BOUND) -> Answer:
        t0 = time.monotonic()
        try:
            resp, call = self._ch.unary_unary(method).with_call(body, timeout=timeout)
            return Answer(call.code(), call.details() or "", [resp], time.monotonic() - t0)
        except grpc.RpcError as e:
            return Answer(e.code(), e.details() or "", [], time.monotonic() - t0)

    def stream(self, method: str, bodies: Sequence[bytes], timeout: float = CALL_BOUND,
               enough: Callable[[bytes], bool] | None = None) -> Answer:
        """Sends ``bodies`` then half-closes; reads to the end, or cancels once ``enough``
        says a response is all we need (an attach stream never ends by itself)."""
        t0 = time.monotonic()
        call = self._ch.stream_stream(method)(iter(list(bodies)), timeout=timeout)
        got: list[bytes] = []
        try:
            for r in call:
                got.append(r)
                if enough is not None and enough(r):
                    call.cancel()
                    return Answer(grpc.StatusCode.OK, "", got, time.monotonic() - t0, True)
        except grpc.RpcError:
            pass
        return Answer(call.code(), call.details() or "", got, time.monotonic() - t0)


def check(ans: Answer, what: str, seen: Counter[str] | None = None) -> None:
    """Answered in time, with OK or an error that says something, and not a handler crash."""
    if seen is not None:
        seen[f"{what.rsplit('/', 1)[-1]} {ans.code.name}"
             f"{' +events' if ans.responses and what.endswith('Gadget') else ''}"] += 1
    assert ans.elapsed < CALL_BOUND, f"{what}: no answer within {CALL_BOUND}s"
    assert ans.code is not grpc.StatusCode.DEADLINE_EXCEEDED, f"{what}: hung ({ans.details})"
    if ans.code is not grpc.StatusCode.OK:
        assert ans.details, f"{what}: {ans.code.name} without a message"
    assert ans.code is not grpc.StatusCode.UNKNOWN, \
        f"{what}: the daemon failed unexpectedly: {ans.details}"


def is_event(kind: int) -> Callable[[bytes], bool]:
    def pred(raw: bytes) -> bool:
        try:
            return bool(pb.GadgetEvent.FromString(raw).type == kind)
        except Exception:
            return False
    return pred


# -- fixtures -------------------------------------------------------------------------------------


def vm_rss(pid: int, field: str = "VmRSS:") -> int:
    """Bytes of the process's resident set (``VmHWM:``: its peak since the last reset)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


@dataclass
class Fuzz:
    daemon: DaemonProcess
    raw: RawChannel
    live_id: str
    programs: int
    rss: int
    seen: Counter[str]

    def check(self, ans: Answer, what: str) -> None:
        check(ans, what, self.seen)

    @property
    def pid(self) -> int:
        assert self.daemon.proc is not None
        return self.daemon.proc.pid

    def alive(self) -> None:
        assert self.daemon.proc is not None and self.daemon.proc.poll() is None, \
            f"the daemon died:\n{self.daemon.log()[-4000:]}"

    def remove_strays(self) -> None:
        """Removes instances a fuzzed create made (all but the module's target)."""
        with self.daemon.client() as c:
            for gi in c.instances.ListGadgetInstances(pb.ListGadgetInstancesRequest()
                                                      ).gadgetInstances:
                if gi.id != self.live_id:
                    c.instances.RemoveGadgetInstance(pb.GadgetInstanceId(id=gi.id), timeout=30)


@pytest.fixture(scope="module")
def fuzz() -> Iterator[Fuzz]:
    d = DaemonProcess()
    d.start()
    raw = None
    try:
        assert d.proc is not None
        with d.client() as c:
            # Once before the baseline: the first BPF load maps LLVM into the daemon.
            list(c.run("trace_exec", timeout_s=0.05).raw())
            resp = c.instances.CreateGadgetInstance(pb.CreateGadgetInstanceRequest(
                gadgetInstance=pb.GadgetInstance(name=TARGET_NAME, gadgetConfig=pb.GadgetRunRequest(
                    imageName="trace_exec", version=1))))
            live_id = resp.gadgetInstance.id
            c.info(live_id, instance=True)  # waits until it runs
        raw = RawChannel(d.address)
        yield Fuzz(d, raw, live_id, len(bpf_programs_of(d.proc.pid)), vm_rss(d.proc.pid),
                   Counter())
    finally:
        if raw is not None:
            raw.close()
        d.close()


# -- the fuzzing ----------------------------------------------------------------------------------

def test_get_gadget_info(fuzz: Fuzz) -> None:
    @fuzz_settings(100)
    @given(body=st.one_of(get_gadget_info(), garbage()))
    def one(body: bytes) -> None:
        fuzz.check(fuzz.raw.unary(GET_GADGET_INFO, body), GET_GADGET_INFO)
        fuzz.alive()
    one()


def test_run_gadget_conversations(fuzz: Fuzz) -> None:
    attached = is_event(EVENT_INFO)

    first = weighted((3, run_request().map(lambda b: f_bytes(1, b))),
                     (1, attach_request(fuzz.live_id).map(lambda b: f_bytes(3, b))))

    @fuzz_settings(80)
    @given(msgs=conversation(first, control(fuzz.live_id)))
    def one(msgs: list[bytes]) -> None:
        # An attach that reached its instance streams until the client leaves
        # (docs/gadget-service.md §3.3): its GadgetInfo event is the answer. Runs end by the
        # half-close, so read them out.
        ans = fuzz.raw.stream(RUN_GADGET, msgs, enough=lambda r: attached(r) and _is_attach(r))
        fuzz.check(ans, RUN_GADGET)
        fuzz.alive()
    one()


def _is_attach(raw: bytes) -> bool:
    info = pb.GadgetInfo.FromString(pb.GadgetEvent.FromString(raw).payload)
    return bool(info.id)


def test_run_builtin_conversations(fuzz: Fuzz) -> None:
    @fuzz_settings(40)
    @given(msgs=conversation(builtin_run().map(lambda b: f_bytes(1, b)), builtin_control()))
    def one(msgs: list[bytes]) -> None:
        fuzz.check(fuzz.raw.stream(RUN_BUILTIN, msgs), RUN_BUILTIN)
        fuzz.alive()
    one()


def test_get_info(fuzz: Fuzz) -> None:
    @fuzz_settings(30)
    @given(body=st.one_of(strings().map(lambda s: f_bytes(1, s)), garbage()))
    def one(body: bytes) -> None:
        fuzz.check(fuzz.raw.unary(GET_INFO, body), GET_INFO)
    one()


def test_instance_requests(fuzz: Fuzz) -> None:
    @fuzz_settings(80)
    @given(method=st.sampled_from([CREATE_INSTANCE, GET_INSTANCE, REMOVE_INSTANCE,
                                   LIST_INSTANCES]),
           body=st.data())
    def one(method: str, body: st.DataObject) -> None:
        if method == CREATE_INSTANCE:
            msg = body.draw(st.one_of(create_instance(fuzz.live_id), garbage()))
        elif method == LIST_INSTANCES:
            msg = body.draw(st.one_of(junk_fields(), garbage()))
        else:
            ids = instance_ids(fuzz.live_id)
            if method == REMOVE_INSTANCE:  # the attach target must stay
                ids = ids.filter(lambda i: i != fuzz.live_id.encode())
            msg = body.draw(st.one_of(ids.map(lambda i: f_bytes(1, i)), garbage()))
        fuzz.check(fuzz.raw.unary(method, msg), method)
        fuzz.alive()
        if method == CREATE_INSTANCE:
            fuzz.remove_strays()
    one()


def test_unary_methods_fed_zero_or_two_messages(fuzz: Fuzz) -> None:
    """A client that breaks unary cardinality (a raw HTTP/2 peer can) gets an error status."""
    for method in UNARY_METHODS:
        for bodies in ([], [b"", b""]):
            fuzz.check(fuzz.raw.stream(method, bodies), method)
    fuzz.alive()
    fuzz.remove_strays()


def test_oversized_messages_are_refused_before_they_are_buffered(fuzz: Fuzz) -> None:
    """A message past the 4 MiB limit is refused from its length prefix: the daemon's peak
    memory does not grow by its size."""
    big = f_bytes(2, b"x" * (48 << 20))  # GetGadgetInfoRequest.imageName of 48 MiB
    Path(f"/proc/{fuzz.pid}/clear_refs").write_text("5")  # resets VmHWM, the peak RSS
    base = vm_rss(fuzz.pid)
    for ans in (fuzz.raw.unary(GET_GADGET_INFO, big),
                fuzz.raw.unary(CREATE_INSTANCE, big),
                fuzz.raw.stream(RUN_GADGET, [big])):
        fuzz.check(ans, "oversized")
        assert ans.code is grpc.StatusCode.RESOURCE_EXHAUSTED, ans
        assert "larger than the 4194304 bytes accepted" in ans.details
    peak = vm_rss(fuzz.pid, "VmHWM:")
    assert peak - base < 16 << 20, f"peak RSS grew by {(peak - base) >> 20} MiB"
    fuzz.alive()
    assert fuzz.raw.unary(LIST_INSTANCES, b"").code is grpc.StatusCode.OK  # same connection


def test_a_client_gone_during_the_compile_leaves_no_program(fuzz: Fuzz) -> None:
    """Found by the fuzzing: a legacy run followed by garbage, and a run cancelled right after
    its GadgetInfo, end while the BPF compile is still in its worker thread; what it loads must
    be freed when it is done (it used to stay attached)."""
    legacy = f_bytes(1, f_bytes(1, b"exec") + f_bytes(2, b"trace"))
    fuzz.check(fuzz.raw.stream(RUN_BUILTIN, [legacy, b"\xff\xff"]), RUN_BUILTIN)
    with fuzz.daemon.client() as c:
        stream = c.run("trace_exec")
        next(stream.raw())  # the GadgetInfo event goes out before the compile starts
        stream.cancel()
    deadline = time.monotonic() + 20
    while len(bpf_programs_of(fuzz.pid)) > fuzz.programs and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(bpf_programs_of(fuzz.pid)) == fuzz.programs, "BPF programs leaked"


def test_bytes_that_are_not_http2(fuzz: Fuzz) -> None:
    """Garbage on the socket itself: the daemon closes a connection that cannot be HTTP/2, and
    a connection left half-way (a preface, a frame still arriving) does not keep it from
    serving the others."""
    closes = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01" + os.urandom(4096),
              b"\0" * 65536]
    stalls = [b"PRI * HTTP/2.0\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff"]
    for blob in [*closes, *stalls]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(CALL_BOUND)
            s.connect(str(fuzz.daemon.socket))
            t0 = time.monotonic()
            s.sendall(blob)
            assert fuzz.raw.unary(LIST_INSTANCES, b"").code is grpc.StatusCode.OK
            if blob in closes:
                with contextlib.suppress(ConnectionResetError):
                    while s.recv(65536):
                        pass  # what it answers (SETTINGS, GOAWAY), then it closes
                assert time.monotonic() - t0 < CALL_BOUND
    fuzz.alive()


def test_zz_daemon_is_healthy_after_the_fuzzing(fuzz: Fuzz, tmp_path: Path) -> None:
    """Runs last in the module: a normal request and a run work, nothing leaked."""
    fuzz.alive()
    fuzz.remove_strays()
    with fuzz.daemon.client() as c:
        assert [d.name for d in c.info("trace_exec").dataSources] == ["exec"]
        binary = unique_binary(tmp_path)
        stream = c.run("trace_exec", {"operator.oci.ebpf.comm": binary.name[:15]}, timeout_s=20)
        stream.wait_ready()
        seen = False
        with keep_running([str(binary)]):
            for ev in stream:
                if ev.records:
                    seen = True
                    stream.stop()
        assert seen, "the daemon no longer traces"
    deadline = time.monotonic() + 20
    while len(bpf_programs_of(fuzz.pid)) > fuzz.programs and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(bpf_programs_of(fuzz.pid)) == fuzz.programs, "BPF programs leaked"
    growth = vm_rss(fuzz.pid) - fuzz.rss
    print(f"\nVmRSS growth over the fuzz run: {growth / 2**20:.1f} MiB; answers:")
    for key, n in sorted(fuzz.seen.items()):
        print(f"  {n:5d}  {key}")
    assert growth < RSS_GROWTH_BOUND, f"VmRSS grew by {growth / 2**20:.0f} MiB"
