"""Scenario g: the pipeline's own Python cost per record, no kernel (a batch replayed through
a run's emit path into the gRPC stream sink)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.common import IMAGE, log, median
from bench.session import Bench


def run_synthetic(bench: Bench) -> None:
    runs: dict[str, list[dict[str, Any]]] = {}
    for i in range(bench.profile.repeats):
        log(f"synthetic repeat {i + 1}")
        for name, batched, filt in (("per-record", False, False),
                                    ("batched 1024", True, False),
                                    ("per-record + filter", False, True)):
            r = asyncio.run(synthetic_run(bench.profile.synthetic_records, 1000, batched,
                                          filt))
            runs.setdefault(name, []).append(r)
    for name, rs in runs.items():
        bench.row(f"g: synthetic source, {name}", rs,
                  note=f"{median([r['us_per_event'] for r in rs]):.2f} µs/event")
    bench.lines["g"] = (f"pipeline {IMAGE} (synthetic, passthrough, per-record): us_per_event="
                        f"{median([r['us_per_event'] for r in runs['per-record']]):.2f}")


def realistic_rows(ds: Any, n: int) -> Any:
    """``n`` trace_open records as one process opening a few files makes them: the derived
    fields (user name, flags and mode texts, ...) are computed per distinct value, so random
    bytes (a distinct uid, flag set and mode in every record) would measure the derivation of
    values no workload has, not the pipeline."""
    import numpy as np

    rows = np.zeros((n, ds.record_size), dtype=np.uint8)

    def put(name: str, values: Any, dtype: str) -> None:
        f = ds.field(name)
        col = np.asarray(values, dtype=dtype).view(np.uint8).reshape(n, -1)
        rows[:, f.offs: f.offs + col.shape[1]] = col

    put("timestamp_raw", 1_700_000_000_000_000_000 + np.arange(n) * 1000, "<u8")
    put("proc.pid", np.full(n, 1234), "<u4")
    put("proc.tid", np.full(n, 1234), "<u4")
    put("proc.creds.uid", np.full(n, 1000), "<u4")
    put("fd", 3 + np.arange(n) % 4, "<u4")
    put("flags_raw", np.full(n, 0o2000000), "<u4")  # O_RDONLY|O_CLOEXEC
    for name, texts in (("proc.comm", [b"cat"]), ("fname", [b"/etc/hostname", b"/etc/passwd"])):
        f = ds.field(name)
        for i, t in enumerate(texts):
            rows[i:: len(texts), f.offs: f.offs + len(t)] = np.frombuffer(t, dtype=np.uint8)
    return rows


async def synthetic_run(total: int, batch_size: int, batched: bool, filt: bool
                        ) -> dict[str, Any]:
    """Replays one drained-size batch through a run's emit path (ledger, operators, fan-out,
    bounded edge) into the gRPC stream sink (wire framing, FramedWriter) with a stand-in HTTP/2
    stream that takes the bytes; CPU time of this process per record."""

    from api.run_stream import StreamLayout, StreamSink
    from api.stream_writer import FramedWriter
    from pipeline.batch import Batch
    from pipeline.graph import Overflow
    from pipeline.ledger import Ledger
    from pipeline.run import GadgetRun
    from pipeline.sources.catalog import Catalog
    from pipeline.wire import BATCH_LINGER, BATCH_MAX, GRPC_PARAMS, GRPC_PREFIX

    spec = Catalog().resolve(IMAGE)
    params = {BATCH_MAX: "1024" if batched else "0"}
    if filt:
        params["operator.filter.filter"] = "proc.pid>0"  # keeps everything, still evaluated
    run = GadgetRun(spec, params, Ledger(), "synthetic", GRPC_PARAMS, (GRPC_PREFIX,))
    ds = spec.datasources[0]
    rows = realistic_rows(ds, batch_size)

    class Lost:
        def lost(self) -> int:
            return 0

    stream = _LoopbackStream()
    run._source = Lost()  # type: ignore[assignment]
    layout = StreamLayout.build(run.schemas, int(run.values.get(BATCH_MAX) or 0),
                                float(run.values.get(BATCH_LINGER) or 0.02), "20ms")
    edge = run.subscribe("grpc:bench", 16384, Overflow.DROP_NEWEST)
    sink = StreamSink(FramedWriter(stream), edge, layout, asyncio.Lock())
    task = asyncio.create_task(sink.run())
    batch = Batch(ds, rows)
    sent = 0
    cpu0 = time.process_time()
    t0 = time.monotonic()
    while sent < total:
        await run._emit(Batch(ds, batch.rows.copy()))  # a drain hands over a fresh copy
        sent += batch_size
        while edge.depth > 4 * batch_size:
            await asyncio.sleep(0)
    run.fanout.close()
    await task
    cpu = time.process_time() - cpu0
    wall = time.monotonic() - t0
    return {"generated": sent, "received": sink.records_sent, "events_per_s": sent / wall,
            "us_per_event": cpu / sent * 1e6, "cpu_s_per_m": cpu / sent * 1e6,
            "ledger_dropped": sent - sink.records_sent}


class _Connection:
    """grpclib's connection, as the writer sees it: always ready to write."""

    def __init__(self) -> None:
        self.write_ready = asyncio.Event()
        self.write_ready.set()
        self.data_sent = 0

    def data_send_process(self) -> None:
        return None


class _Transport:
    """Takes the bytes and, as a reading client would, opens the windows again by as much."""

    def __init__(self, h2: Any, stream_id: int) -> None:
        self._h2 = h2
        self._id = stream_id
        self.nbytes = 0

    def write(self, data: bytes) -> None:
        self.nbytes += len(data)
        self._h2.outbound_flow_control_window = 1 << 30
        self._h2.streams[self._id].outbound_flow_control_window = 1 << 30

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> None:
        return None


class _Protocol:
    """grpclib's protocol stream over a real h2 server connection with one open stream."""

    def __init__(self) -> None:
        import h2.config
        import h2.connection

        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        client.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", "/x"),
                                (":authority", "bench"), ("content-type", "application/grpc")])
        server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        server.initiate_connection()
        server.receive_data(client.data_to_send())
        server.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
        server.data_to_send()
        self.id = 1
        self.connection = _Connection()
        self._h2_connection = server
        self._transport = _Transport(server, 1)
        self.window_updated = asyncio.Event()
        self.data_sent = 0


class _LoopbackStream:
    """A grpclib server stream as api/stream_writer.py uses it, writing into nothing."""

    _send_initial_metadata_done = True

    def __init__(self) -> None:
        self._stream = _Protocol()
