"""The daemon loads client libraries only for the sinks a run configures (grpcio and aiokafka
are ~10 MB of its anonymous memory): serve, the daemon and every sink type's declaration import
neither; building a Kafka or OTLP/gRPC sink does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import sys
import api.cli_serve, api.daemon
from pipeline.sinks.registry import discover_sink_types
types = discover_sink_types()
print(sorted(m for m in ("grpc", "aiokafka") if m in sys.modules))
"""


def _loaded(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=True)
    return done.stdout.strip().splitlines()[-1]


def test_the_daemon_and_the_sink_declarations_import_no_client_library() -> None:
    assert _loaded(_PROBE) == "[]"


def test_the_kafka_and_otlp_grpc_senders_bring_their_libraries() -> None:
    code = _PROBE.replace("print(", "import pipeline.sinks._kafka_send, "
                                    "pipeline.sinks._otlp_grpc\nprint(")
    assert _loaded(code) == "['aiokafka', 'grpc']"
