"""Addresses in gadgetpipe's settings: where the daemon listens (``unix:///path``,
``tcp://host:port``), where its peers are (the same, or a bare ``host:port``), where its
metrics are served (``HOST:PORT``) and where its own log goes (an OTLP/gRPC endpoint). The
config schema validates with these parsers and the daemon uses them, so a value the config
accepts is one the daemon can use."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlparse

__all__ = ["ListenAddress", "ListenError", "otlp_grpc_url", "parse_host_port"]


class ListenError(ValueError):
    """A listen address or its TLS settings are unusable."""


@dataclass(frozen=True)
class ListenAddress:
    """A unix socket path or a TCP host and port."""

    scheme: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        """``unix:///path`` or ``tcp://host:port``.

        Raises:
            ListenError: anything else, with an example of the right form.
        """
        u = urlparse(text)
        if u.scheme == "unix":
            path = (u.netloc + u.path) if u.netloc else u.path
            if not path:
                raise ListenError(f"{text!r}: unix address needs a path, unix:///run/x.sock")
            return cls("unix", path=path)
        if u.scheme == "tcp":
            try:
                port = u.port
            except ValueError:
                port = None
            if not u.hostname or port is None:
                raise ListenError(f"{text!r}: tcp address needs host and port, "
                                  "tcp://127.0.0.1:8080")
            return cls("tcp", host=u.hostname, port=port)
        raise ListenError(f"{text!r}: scheme must be unix:// or tcp://")

    @classmethod
    def parse_peer(cls, text: str) -> ListenAddress:
        """A peer daemon's address: as :meth:`parse`, and a bare ``host:port`` is TCP.

        Raises:
            ListenError: not one of those (a peer at port 0 cannot be reached either).
        """
        try:
            address = cls.parse(text if "://" in text else f"tcp://{text}")
        except ListenError:
            address = None
        if address is None or (address.scheme == "tcp" and not address.port):
            raise ListenError(f"address {text!r} is not unix:///path, host:port or "
                              "tcp://host:port") from None
        return address

    def __str__(self) -> str:
        return f"unix://{self.path}" if self.scheme == "unix" else f"tcp://{self.host}:{self.port}"


def parse_host_port(text: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (all interfaces).

    Raises:
        ValueError: not of that form, or a port outside 0..65535.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)


def otlp_grpc_url(endpoint: str) -> str:
    """An OTLP/gRPC endpoint as a URL: ``host:port`` is ``http://host:port`` (plaintext);
    ``http://`` and ``https://`` (TLS) URLs are taken as they are.

    Raises:
        ValueError: not one of those forms.
    """
    url = endpoint if "://" in endpoint else f"http://{endpoint}"
    u = urlparse(url)
    try:
        port = u.port
    except ValueError:
        port = None
    if u.scheme not in ("http", "https") or not u.hostname or port is None:
        raise ValueError(f"endpoint {endpoint!r} is not host:port or http(s)://host:port")
    return url
