"""Peer settings are checked when the daemon starts: addresses, TLS files, and TCP without TLS
only when insecure is explicit (api/peers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.peers import Peer, PeerError, PeerPool, PeerTLS
from config.addresses import ListenError


def test_a_tcp_peer_needs_tls_unless_insecure() -> None:
    with pytest.raises(PeerError, match=r"node 'b': TCP peer 10.0.0.2:8080 needs TLS"):
        PeerPool({"b": "10.0.0.2:8080"}).start()
    PeerPool({"b": "10.0.0.2:8080"}, insecure=True).start()
    PeerPool({"b": "unix:///run/b.sock"}).start()  # a socket's file mode is its access control


def test_tls_files_are_read_at_start_and_named_when_they_fail(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(PeerError, match=f"node 'b': TLS CA {missing}"):
        PeerPool({"b": "10.0.0.2:8080"}, PeerTLS(ca=missing)).start()
    with pytest.raises(PeerError, match="node 'b': TLS client certificate and key go together"):
        PeerPool({"b": Peer("10.0.0.2:8080", PeerTLS(cert=missing))}).start()
    with pytest.raises(PeerError, match=f"client certificate {missing} / key {missing}"):
        PeerPool({"b": "10.0.0.2:8080"}, PeerTLS(cert=missing, key=missing)).start()


def test_a_nodes_own_tls_wins_and_is_for_tcp_only(tmp_path: Path) -> None:
    good = PeerTLS()  # the system's CAs
    bad = PeerTLS(ca=tmp_path / "nope.pem")
    PeerPool({"b": Peer("10.0.0.2:8080", good)}, bad).start()
    with pytest.raises(PeerError, match="node 'u': TLS is for TCP peers"):
        PeerPool({"u": Peer("unix:///run/u.sock", good)}).start()


def test_peer_errors_stop_the_daemon_as_listen_errors_do() -> None:
    # ``serve`` reports ListenError as "cannot serve: ..." instead of a traceback.
    with pytest.raises(ListenError, match="node 'b': address 'nowhere'"):
        PeerPool({"b": "nowhere"}, insecure=True).start()
