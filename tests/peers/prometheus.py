"""A real Prometheus server (Debian's package) scraping given targets every second."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.peers import PeerProcess, peer_paths, require_executable
from tests.peers.ports import free_port

__all__ = ["PrometheusQueryError", "PrometheusServer"]

Result = list[dict[str, Any]]


class PrometheusQueryError(RuntimeError):
    """Prometheus refused a query (bad PromQL, ...) or could not be reached."""


class PrometheusServer(PeerProcess):
    """Prometheus with a generated config, TSDB in the temp dir, on a fresh loopback port.

    Args:
        targets: "host:port" endpoints scraped (job ``job``) at ``metrics_path``.
        rule_files: recording/alerting rule files, evaluated every ``evaluation_interval``.
        binary: override the prometheus binary found by :func:`peer_paths`.

    ``url`` is "http://127.0.0.1:PORT". ``set_targets()`` changes the targets of a running
    server (config reload, no restart). A rule file Prometheus refuses fails ``start()``.

    start() returns within ~50 ms, but Prometheus 2.42 hands discovered targets (even static
    ones) to its scrape manager on 5 s tickers: the first scrape comes 5-10 s after start()
    or set_targets(). Use ``wait_for()`` / ``wait_scraped()`` with timeouts of 20 s or more.
    """

    kind = "prometheus"

    def __init__(self, targets: Sequence[str] = (), *, rule_files: Sequence[str | Path] = (),
                 job: str = "gadgetpipe", metrics_path: str = "/metrics",
                 scrape_interval: str = "1s", evaluation_interval: str = "1s",
                 binary: str | None = None, start_timeout: float = 30.0,
                 stop_timeout: float = 15.0) -> None:
        super().__init__(start_timeout=start_timeout, stop_timeout=stop_timeout)
        self._binary = binary or peer_paths().prometheus
        self.targets = list(targets)
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.job = job
        self.metrics_path = metrics_path
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.port = free_port()
        self.config_path = self.workdir / "prometheus.yml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        return {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": self.evaluation_interval,
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [{
                "job_name": self.job,
                "metrics_path": self.metrics_path,
                "static_configs": [{"targets": self.targets}],
            }],
        }

    def _write_config(self) -> None:
        # JSON is YAML, and needs no YAML library to write.
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.config(), indent=2))
        tmp.replace(self.config_path)

    def _prepare(self) -> None:
        self._binary = require_executable(self._binary, "prometheus")
        self._write_config()

    def _command(self) -> Sequence[str]:
        return [
            self._binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",  # POST /-/reload, for set_targets()
            "--log.level=info",
        ]

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    # --- HTTP API -------------------------------------------------------------------------

    def _api(self, path: str, params: dict[str, str] | None = None,
             method: str = "GET") -> Any:
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        req = urllib.request.Request(url, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            # 400/422 carry Prometheus' own explanation in the JSON body.
            detail = e.read().decode("utf-8", "replace")
            with contextlib.suppress(ValueError, AttributeError):
                detail = json.loads(detail).get("error", detail)
            raise PrometheusQueryError(f"{method} {path} {params or ''}: {e.code}: {detail}") from e
        except OSError as e:
            raise PrometheusQueryError(f"{method} {path}: {e}") from e
        if not body:
            return None
        doc = json.loads(body)
        if isinstance(doc, dict) and doc.get("status") == "error":
            raise PrometheusQueryError(f"{path} {params or ''}: {doc.get('error')}")
        return doc.get("data") if isinstance(doc, dict) else doc

    def query(self, promql: str) -> Result:
        """An instant query's result: ``[{"metric": {labels}, "value": [ts, "str"]}, ...]``.

        Scalars and strings come back as one element with empty labels, so every result is
        a list.
        """
        data = self._api("/api/v1/query", {"query": promql})
        result = data["result"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": result}]
        return list(result)

    def query_value(self, promql: str) -> float | None:
        """The value of a query with at most one series (None when it has none)."""
        result = self.query(promql)
        if len(result) > 1:
            raise PrometheusQueryError(f"{promql}: {len(result)} series, expected at most one")
        return float(result[0]["value"][1]) if result else None

    def targets_health(self) -> list[dict[str, Any]]:
        """``/api/v1/targets`` active targets (scrapeUrl, health, lastError, ...)."""
        return list(self._api("/api/v1/targets")["activeTargets"])

    def wait_for(self, promql: str, predicate: Callable[[Result], bool] = bool,
                 timeout: float = 30.0) -> Result:
        """Polls ``query(promql)`` until ``predicate`` holds (default: any series); returns
        that result, or raises TimeoutError saying what the targets' last scrapes reported."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                targets = "\n".join(
                    f"  {t.get('scrapeUrl')}: {t.get('health')} {t.get('lastError') or ''}"
                    for t in self.targets_health()) or "  (none)"
                raise TimeoutError(f"{promql}: condition not met within {timeout} s; last "
                                   f"result {result}\ntargets:\n{targets}")
            time.sleep(0.25)

    def wait_scraped(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Waits until every configured target has been scraped at least once (whether up or
        down); returns ``targets_health()``."""
        deadline = time.monotonic() + timeout
        wanted = set(self.targets)
        while True:
            health = self.targets_health()
            done = {t["labels"].get("instance") for t in health if t.get("health") != "unknown"}
            if wanted <= done:
                return health
            if time.monotonic() > deadline:
                raise TimeoutError(f"targets not all scraped within {timeout} s: {health}")
            time.sleep(0.25)

    def set_targets(self, targets: Sequence[str]) -> None:
        """Replaces the scrape targets; on a running server through a config reload."""
        self.targets = list(targets)
        if self.config_path.exists():
            self._write_config()
        if self.running:
            self._api("/-/reload", method="POST")
