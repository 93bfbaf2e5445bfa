"""Child role ``_pyclient``: the grpcio client (api.client) of the batched scenario."""

from __future__ import annotations

import json
import signal
import threading
import time
from typing import Any

from bench.common import IMAGE


def pyclient_main(argv: list[str]) -> None:
    """``_pyclient ADDRESS STOP_AFTER K=V...``: api.client (grpcio) reads a run, counting records
    (GadgetDataArray elements or GadgetData) and seq gaps; stops after STOP_AFTER records (or on
    SIGINT); prints a JSON summary in goclient's shape."""
    from api.client import GadgetClient
    from pipeline._gen import gadget_service_pb2 as pb

    address, stop_after = argv[0], int(argv[1])
    params = dict(kv.split("=", 1) for kv in argv[2:])
    client = GadgetClient(address)
    stream = client.run(IMAGE, params)
    stopped = threading.Event()

    def stop(*_: Any) -> None:
        if not stopped.is_set():
            stopped.set()
            stream.stop()

    signal.signal(signal.SIGINT, stop)
    records = packets = lost = 0
    types: dict[int, int] = {}
    expected: int | None = None
    first = last = 0.0
    for ev in stream.raw():
        if ev.type == 4:
            info = pb.GadgetInfo.FromString(ev.payload)
            types = {d.id: d.type for d in info.dataSources}
        elif ev.type == 0:
            last = time.monotonic()
            first = first or last
            packets += 1
            if expected is not None and ev.seq != expected:
                lost += (ev.seq - expected) & 0xFFFFFFFF
            expected = (ev.seq + 1) & 0xFFFFFFFF
            if types.get(ev.dataSourceID) == 2:
                records += len(pb.GadgetDataArray.FromString(ev.payload).dataArray)
            else:
                records += 1
            if stop_after and records >= stop_after:
                stop()
    span = last - first
    print(json.dumps({"records": records, "packets": packets, "lost": lost,
                      "records_per_s": records / span if span > 0 else 0.0,
                      "datasources": [{"id": k, "type": v} for k, v in types.items()]}))
    client.close()
