"""A grpcio client of the gadget service (used by the CLI, and by tests as an independent
implementation of the other side of the wire)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from api.decode import DataSourceDecoder
from api.ready import is_ready
from pipeline._gen import gadget_service_pb2 as pb
from pipeline._gen import gadget_service_pb2_grpc as rpc

DEFAULT_ADDRESS = "unix:///var/run/gadgetpipe/gadgetpipe.sock"
EVENT_INFO = 4
LOG_SHIFT = 16


def channel_target(address: str) -> str:
    """grpcio accepts unix:///path and host:port; tcp:// is ours, so strip it."""
    return address[len("tcp://"):] if address.startswith("tcp://") else address


@dataclass
class TLSFiles:
    ca: str
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None


@dataclass
class Event:
    """One received event, decoded: records of a data source, or a log line."""

    datasource: str = ""
    seq: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    log: str | None = None
    severity: int = 0
    ready: bool = False
    """This log event is the ready signal: the gadget traces from now on (api/ready.py)."""


class NotReady(RuntimeError):
    """The stream ended, or the wait timed out, before the gadget said it traces."""


class RunStream:
    """An open RunGadget conversation; iterate for events, :meth:`stop` to end it.

    ``ready`` turns true when the daemon says the gadget's programs are attached (an info log
    event, api/ready.py; sent when the run's ``logLevel`` is at least 4):
    :meth:`wait_ready` blocks until then, so a caller can start its workload knowing every
    event it causes is traced.
    """

    def __init__(self, stub: rpc.GadgetManagerStub, first: pb.GadgetControlRequest,
                 timeout: float | None = None) -> None:
        self._requests: queue.Queue[pb.GadgetControlRequest | None] = queue.Queue()
        self._requests.put(first)
        self._call = stub.RunGadget(self._iter_requests(), timeout=timeout)
        self.info: pb.GadgetInfo | None = None
        self.decoders: dict[int, DataSourceDecoder] = {}
        self.gaps = 0
        self.ready = False
        self.ready_message = ""
        self._expected: int | None = None
        self._lock = threading.Lock()

    def _iter_requests(self) -> Iterator[pb.GadgetControlRequest]:
        # The send side stays open until close(): a half-close means "stop" to the server.
        while True:
            item = self._requests.get()
            if item is None:
                return
            yield item

    def stop(self) -> None:
        self._requests.put(pb.GadgetControlRequest(stopRequest=pb.GadgetStopRequest()))

    def cancel(self) -> None:
        self._call.cancel()
        self._requests.put(None)

    def raw(self) -> Iterator[pb.GadgetEvent]:
        try:
            for ev in self._call:
                self._note(ev)
                yield ev
        finally:
            self._requests.put(None)

    def _note(self, ev: pb.GadgetEvent) -> None:
        if ev.type >= 1 << LOG_SHIFT and not self.ready:
            text = ev.payload.decode("utf-8", "replace")
            if is_ready(ev.type >> LOG_SHIFT, text):
                self.ready, self.ready_message = True, text

    def wait_ready(self, timeout: float = 60.0) -> list[pb.GadgetEvent]:
        """Reads the stream until the gadget traces; returns the events read before (the
        GadgetInfo, logs). Iterating :meth:`raw` or the stream afterwards goes on from there.

        Raises:
            NotReady: the stream ended first, or ``timeout`` seconds passed (the run is then
                cancelled).
        """
        timer = threading.Timer(timeout, self._call.cancel)
        timer.start()
        got: list[pb.GadgetEvent] = []
        try:
            for ev in self._call:
                self._note(ev)
                if ev.type == EVENT_INFO:
                    self._set_info(ev)
                got.append(ev)
                if self.ready:
                    return got
        except grpc.RpcError as e:
            if e.code() is grpc.StatusCode.CANCELLED and not timer.is_alive():
                raise NotReady(f"the gadget did not say it traces within {timeout} s") from e
            raise
        finally:
            timer.cancel()
        raise NotReady("the stream ended before the gadget said it traces")

    def _set_info(self, ev: pb.GadgetEvent) -> None:
        self.info = pb.GadgetInfo.FromString(ev.payload)
        self.decoders = {ds.id: DataSourceDecoder(ds) for ds in self.info.dataSources}

    def __iter__(self) -> Iterator[Event]:
        for ev in self.raw():
            if ev.type == EVENT_INFO:
                self._set_info(ev)
            elif ev.type >= 1 << LOG_SHIFT:
                text = ev.payload.decode("utf-8", "replace")
                yield Event(log=text, severity=ev.type >> LOG_SHIFT,
                            ready=is_ready(ev.type >> LOG_SHIFT, text))
            elif ev.type == 0:
                if self._expected is not None and ev.seq != self._expected:
                    self.gaps += (ev.seq - self._expected) & 0xFFFFFFFF
                self._expected = (ev.seq + 1) & 0xFFFFFFFF
                dec = self.decoders.get(ev.dataSourceID)
                if dec is None:
                    continue
                yield Event(datasource=dec.name, seq=ev.seq, records=list(dec.records(ev.payload)))


class GadgetClient:
    """Talks to one daemon.

    Args:
        address: ``unix:///path``, ``host:port`` or ``tcp://host:port``.
        tls: CA (and client certificate) for a TLS server.
        connect_timeout: seconds to wait for the channel to be ready.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, tls: TLSFiles | None = None,
                 connect_timeout: float = 5.0) -> None:
        target = channel_target(address)
        opts: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 64 << 20)]
        if tls is not None:
            creds = grpc.ssl_channel_credentials(
                root_certificates=Path(tls.ca).read_bytes(),
                private_key=Path(tls.key).read_bytes() if tls.key else None,
                certificate_chain=Path(tls.cert).read_bytes() if tls.cert else None)
            if tls.server_name:
                opts.append(("grpc.ssl_target_name_override", tls.server_name))
            self._channel = grpc.secure_channel(target, creds, options=opts)
        else:
            self._channel = grpc.insecure_channel(target, options=opts)
        grpc.channel_ready_future(self._channel).result(timeout=connect_timeout)
        self.gadgets = rpc.GadgetManagerStub(self._channel)
        self.instances = rpc.GadgetInstanceManagerStub(self._channel)
        self.builtin = rpc.BuiltInGadgetManagerStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GadgetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self, image: str, params: Mapping[str, str] | None = None,
             extra: bool = False, instance: bool = False) -> pb.GadgetInfo:
        resp = self.gadgets.GetGadgetInfo(pb.GetGadgetInfoRequest(
            imageName=image, paramValues=dict(params or {}), version=1,
            flags=1 if instance else 0, requestExtraInfo=extra))
        info: pb.GadgetInfo = resp.gadgetInfo
        return info

    def run(self, image: str, params: Mapping[str, str] | None = None, timeout_s: float = 0,
            log_level: int = 4, version: int = 1) -> RunStream:
        req = pb.GadgetControlRequest(runRequest=pb.GadgetRunRequest(
            imageName=image, paramValues=dict(params or {}), version=version,
            logLevel=log_level, timeout=int(timeout_s * 1e9)))
        return RunStream(self.gadgets, req)

    def attach(self, instance_id: str, params: Mapping[str, str] | None = None) -> RunStream:
        req = pb.GadgetControlRequest(attachRequest=pb.GadgetAttachRequest(id=instance_id,
                                                                           version=1))
        return RunStream(self.gadgets, req)
