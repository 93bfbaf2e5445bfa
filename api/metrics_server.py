"""The daemon's ``/metrics`` endpoint: a daemon-owned Prometheus registry (never
prometheus_client's global one) holding the self-metrics (:mod:`api.selfmetrics`), the process
collectors and the gadget metrics of the ``prometheus`` sink, served from the event loop by a
small asyncio HTTP server, so collectors read the loop's state without threads racing it."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder

from api.selfmetrics import SelfMetricsCollector
from config.addresses import parse_host_port
from pipeline.ledger import Ledger

__all__ = ["DEFAULT_LISTEN", "MetricsServer", "parse_listen"]

_logger = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:2224"
_MAX_REQUEST_HEAD = 16 << 10
_READ_TIMEOUT = 10.0


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (all interfaces)."""
    try:
        return parse_host_port(listen)
    except ValueError:
        raise ValueError(f"metrics listen address {listen!r} is not HOST:PORT") from None


class MetricsServer:
    """Serves ``/metrics`` from a daemon-owned registry.

    Args:
        listen: ``host:port`` to bind (port 0 picks a free one; see :attr:`port`).
        ledger: the daemon's loss ledger.
        ctx: the service context; its ``sinks`` contribute the gadget-metric collectors.
    """

    def __init__(self, listen: str, ledger: Ledger, ctx: Any = None) -> None:
        self.listen = listen
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SelfMetricsCollector(ledger, ctx))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        sinks = getattr(ctx, "sinks", None)
        for c in (sinks.collectors() if sinks is not None else ()):
            self.registry.register(c)
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        host, port = parse_listen(self.listen)
        self._server = await asyncio.start_server(self._serve, host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        _logger.info("metrics on http://%s:%d/metrics", host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._conns):
                t.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    def render(self, accept: str = "", accept_encoding: str = "") -> tuple[bytes, str, bool]:
        """The exposition for an Accept header: (body, content type, gzipped)."""
        encoder, content_type = choose_encoder(accept)
        body: bytes = encoder(self.registry)
        if "gzip" in accept_encoding and len(body) > 4096:
            return gzip.compress(body, 5), content_type, True
        return body, content_type, False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                        ConnectionError):
                    return
                if len(head) > _MAX_REQUEST_HEAD:
                    return
                lines = head.decode("latin-1").split("\r\n")
                parts = lines[0].split(" ")
                if len(parts) != 3:
                    return
                method, target, _ = parts
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (ln.partition(":") for ln in lines[1:] if ln)}
                keep = headers.get("connection", "").lower() != "close"
                path = target.split("?", 1)[0]
                extra = ""
                if method not in ("GET", "HEAD"):
                    status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
                elif path == "/metrics":
                    try:
                        body, ctype, gz = self.render(headers.get("accept", ""),
                                                      headers.get("accept-encoding", ""))
                    except Exception:
                        _logger.exception("rendering metrics")
                        status, ctype, body = ("500 Internal Server Error", "text/plain",
                                               b"metrics failed\n")
                    else:
                        status = "200 OK"
                        extra = "Content-Encoding: gzip\r\n" if gz else ""
                elif path in ("/", "/healthz"):
                    status, ctype = "200 OK", "text/plain; charset=utf-8"
                    body = b"gadgetpipe: see /metrics\n" if path == "/" else b"ok\n"
                else:
                    status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
                writer.write((f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                              f"Content-Length: {len(body)}\r\n{extra}"
                              f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n"
                              ).encode("latin-1"))
                if method != "HEAD":
                    writer.write(body)
                await writer.drain()
                if not keep:
                    return
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            if task is not None:
                self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
