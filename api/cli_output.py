"""What the CLI prints of a run or an attach: records as JSON lines or aligned columns, and
the logs the daemon sends at or above the wanted severity."""

from __future__ import annotations

import json
import signal
import sys
from typing import Any

from api.client import RunStream
from api.decode import DataSourceDecoder, flatten
from pipeline.severity import Severity

__all__ = ["Printer", "consume"]


class Printer:
    """Prints records as JSON lines or aligned columns (non-hidden fields)."""

    def __init__(self, mode: str, out: Any = sys.stdout) -> None:
        self.mode = mode
        self.out = out
        self._header_for: str | None = None

    def records(self, dec: DataSourceDecoder, records: list[dict[str, Any]]) -> None:
        if self.mode == "json":
            for r in records:
                self.out.write(json.dumps(r, ensure_ascii=False) + "\n")
        else:
            cols = dec.fields()
            if self._header_for != dec.name:
                self.out.write("  ".join(f"{c.upper():<16.16}" for c in cols) + "\n")
                self._header_for = dec.name
            for r in records:
                flat = flatten(r)
                self.out.write("  ".join(f"{_cell(flat.get(c)):<16.16}" for c in cols) + "\n")
        self.out.flush()


def _cell(v: Any) -> str:
    return "" if v is None else str(v).replace("\u00a0", " ")


def consume(stream: RunStream, printer: Printer, verbose: bool) -> int:
    def on_signal(*_: Any) -> None:
        stream.stop()

    old = signal.signal(signal.SIGINT, on_signal)
    try:
        for ev in stream:
            if ev.log is not None:
                if verbose or ev.severity <= Severity.WARN:
                    print(f"[{Severity.of(ev.severity).text}] {ev.log}", file=sys.stderr)
                continue
            dec = next(d for d in stream.decoders.values() if d.name == ev.datasource)
            printer.records(dec, ev.records)
    except Exception as e:
        import grpc

        if isinstance(e, grpc.RpcError):
            print(f"error: {e.details()} ({e.code().name})", file=sys.stderr)
            return 1
        raise
    finally:
        signal.signal(signal.SIGINT, old)
    if stream.gaps:
        print(f"warning: {stream.gaps} records were dropped on the way", file=sys.stderr)
    return 0
