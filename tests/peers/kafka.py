"""A real single-node Kafka broker (KRaft, broker + controller in one JVM)."""

from __future__ import annotations

import base64
import socket
import struct
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.peers import PeerProcess, PeerStartError, peer_paths, require_executable
from tests.peers.ports import free_ports

__all__ = ["KafkaBroker", "metadata_brokers"]

NODE_ID = 1


def _cluster_id() -> str:
    # Kafka's Uuid.toString: URL-safe base64 of 16 random bytes, unpadded; generated here
    # instead of by `StorageTool random-uuid`, which costs a JVM start (~0.7 s).
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):  # Kafka avoids ids that read as command-line options
            return text


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed mid-response")
        buf += chunk
    return bytes(buf)


def metadata_brokers(host: str, port: int, timeout: float = 2.0) -> list[tuple[int, str, int]]:
    """(node id, host, port) of the brokers a Metadata request (v4, no topics) returns.

    Hand-rolled so readiness can be probed from synchronous code, even while an asyncio loop
    is running (start() is called from async tests), with no client library's retry logic in
    the way. v4 is the oldest version Kafka 4 still serves and the newest non-flexible one.
    """
    correlation_id = 0x6770
    client_id = b"gp-probe"
    body = struct.pack(">hhih", 3, 4, correlation_id, len(client_id)) + client_id
    body += struct.pack(">ib", 0, 0)  # topics: empty array (brokers only); no auto-creation
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(struct.pack(">i", len(body)) + body)
        (size,) = struct.unpack(">i", _recv_exact(sock, 4))
        data = _recv_exact(sock, size)
    (got_id,) = struct.unpack_from(">i", data, 0)
    if got_id != correlation_id:
        raise ConnectionError(f"correlation id {got_id}, expected {correlation_id}")
    pos = 8  # correlation id, throttle_time_ms
    (count,) = struct.unpack_from(">i", data, pos)
    pos += 4
    brokers: list[tuple[int, str, int]] = []
    for _ in range(max(count, 0)):
        node_id, host_len = struct.unpack_from(">ih", data, pos)
        pos += 6
        broker_host = data[pos:pos + host_len].decode()
        pos += host_len
        broker_port, rack_len = struct.unpack_from(">ih", data, pos)
        pos += 6 + max(rack_len, 0)
        brokers.append((node_id, broker_host, broker_port))
    return brokers


class KafkaBroker(PeerProcess):
    """Kafka 4 in KRaft mode, broker and controller in one process, on two fresh loopback ports.

    Args:
        properties: server.properties entries added to (or overriding) the defaults.
        heap: the JVM's -Xmx.
        lib_dir, java: override the jar dir and java binary found by :func:`peer_paths`.
        start_timeout: seconds from launch to answering a Metadata request. A restart after
            ``kill()`` includes ``broker.session.timeout.ms`` (3 s here): the controller refuses
            the new incarnation until the old one's session has expired.

    ``bootstrap`` ("127.0.0.1:PORT") is known from construction on, so a client under test can
    be configured before the broker starts. Data and metadata live in ``data_dir`` and survive
    ``kill()``/``restart()``; ``stop()`` deletes them.
    """

    kind = "kafka"

    def __init__(self, *, properties: Mapping[str, str | int | bool] | None = None,
                 heap: str = "512m", lib_dir: Path | None = None, java: str | None = None,
                 start_timeout: float = 60.0, stop_timeout: float = 30.0) -> None:
        super().__init__(start_timeout=start_timeout, stop_timeout=stop_timeout)
        paths = peer_paths()
        self.lib_dir = lib_dir or paths.kafka_lib
        self._java = java or paths.java
        self.heap = heap
        self.port, self.controller_port = free_ports(2)
        self.cluster_id = _cluster_id()
        self.data_dir = self.workdir / "data"
        self.properties_path = self.workdir / "server.properties"
        self._log4j_path = self.workdir / "log4j2.properties"
        self._extra = dict(properties or {})

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _properties(self) -> dict[str, str]:
        props: dict[str, str | int | bool] = {
            "process.roles": "broker,controller",
            "node.id": NODE_ID,
            "controller.quorum.voters": f"{NODE_ID}@127.0.0.1:{self.controller_port}",
            "listeners": (f"PLAINTEXT://127.0.0.1:{self.port},"
                          f"CONTROLLER://127.0.0.1:{self.controller_port}"),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": 1,
            "auto.create.topics.enable": True,
            "offsets.topic.replication.factor": 1,
            # 1 instead of 50: a group's first consume is ~3x faster.
            "offsets.topic.num.partitions": 1,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            "group.initial.rebalance.delay.ms": 0,
            # A relaunch after SIGKILL waits out the dead incarnation's session (default 9 s).
            "broker.heartbeat.interval.ms": 500,
            "broker.session.timeout.ms": 3000,
            **self._extra,
        }
        return {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in props.items()}

    def _prepare(self) -> None:
        self._java = require_executable(self._java, "java (Kafka 4 needs a JDK >= 17)")
        if not any(self.lib_dir.glob("kafka_2.13-*.jar")):
            raise PeerStartError(f"no Kafka jars in {self.lib_dir}: run `scripts/setup peers`")
        self.properties_path.write_text(
            "".join(f"{k}={v}\n" for k, v in self._properties().items()))
        # Everything to stdout (our log file). Without a config log4j2 prints ERRORs only.
        self._log4j_path.write_text(
            "status = warn\n"
            "appender.out.type = Console\n"
            "appender.out.name = OUT\n"
            "appender.out.layout.type = PatternLayout\n"
            "appender.out.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = WARN\n"
            "rootLogger.appenderRef.out.ref = OUT\n"
            "logger.started.name = kafka.server.KafkaRaftServer\n"
            "logger.started.level = INFO\n")
        # Static controller.quorum.voters: format takes no --standalone (and starts ~2 s
        # faster than the dynamic quorum variant).
        cmd = [*self._java_base("128m"), "-XX:TieredStopAtLevel=1", "kafka.tools.StorageTool",
               "format", "-t", self.cluster_id, "-c", str(self.properties_path)]
        try:
            done = subprocess.run(cmd, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=self.start_timeout)
        except subprocess.TimeoutExpired as e:
            raise PeerStartError(f"kafka storage format timed out: {' '.join(cmd)}") from e
        with self.log_path.open("a") as log:
            log.write(done.stdout + done.stderr)
        if done.returncode != 0:
            raise PeerStartError(
                f"kafka storage format exited with {done.returncode}: {' '.join(cmd)}\n"
                f"{done.stdout}{done.stderr}")

    def _java_base(self, heap: str) -> list[str]:
        return [self._java, f"-Xmx{heap}",
                f"-Dlog4j2.configurationFile={self._log4j_path}",
                "-cp", f"{self.lib_dir}/*"]

    def _command(self) -> Sequence[str]:
        return [*self._java_base(self.heap), "kafka.Kafka", str(self.properties_path)]

    def _ready(self) -> bool:
        # Kafka 4 opens its listeners only once the broker is registered and unfenced, and
        # lists only such brokers, so seeing ourselves here means produce/consume will work.
        try:
            brokers = metadata_brokers("127.0.0.1", self.port, timeout=1.0)
        except (OSError, struct.error, UnicodeDecodeError):
            return False
        return any(node == NODE_ID and port == self.port for node, _, port in brokers)

