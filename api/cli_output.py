"""What the CLI prints of a run or an attach: records as JSON lines or aligned columns, and
the logs the daemon sends at or above the wanted severity."""

from __future__ import annotations

import json
import os
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

    def header(self, dec: DataSourceDecoder) -> None:
        """The column header of ``dec``'s records (columns mode; printed once per switch)."""
        if self.mode != "json" and self._header_for != dec.name:
            self.out.write("  ".join(f"{c.upper():<16.16}" for c in dec.fields()) + "\n")
            self._header_for = dec.name
            self.out.flush()

    def records(self, dec: DataSourceDecoder, records: list[dict[str, Any]]) -> None:
        if self.mode == "json":
            for r in records:
                self.out.write(json.dumps(r, ensure_ascii=False) + "\n")
        else:
            cols = dec.fields()
            self.header(dec)
            for r in records:
                flat = flatten(r)
                self.out.write("  ".join(f"{_cell(flat.get(c)):<16.16}" for c in cols) + "\n")
        self.out.flush()


def _cell(v: Any) -> str:
    return "" if v is None else str(v).replace("\u00a0", " ")


def consume(stream: RunStream, printer: Printer, verbose: bool,
             ready_file: str | None = None) -> int:
    """Prints a stream's records; nothing goes to stdout before the gadget traces (the
    columns header comes at that moment), and ``ready_file`` is written then."""
    def on_signal(*_: Any) -> None:
        stream.stop()

    old = signal.signal(signal.SIGINT, on_signal)
    try:
        for ev in stream:
            if ev.log is not None:
                if verbose or ev.severity <= Severity.WARN:
                    print(f"[{Severity.of(ev.severity).text}] {ev.log}", file=sys.stderr)
                if ev.ready:
                    _on_ready(stream, printer, ev.log, ready_file)
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


def _on_ready(stream: RunStream, printer: Printer, message: str, ready_file: str | None
              ) -> None:
    if len(stream.decoders) == 1:
        printer.header(next(iter(stream.decoders.values())))
    if ready_file:
        tmp = f"{ready_file}.tmp"
        with open(tmp, "w") as f:
            f.write(message + "\n")
        os.replace(tmp, ready_file)  # appears whole: a watcher never reads half of it
