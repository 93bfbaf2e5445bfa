"""Sinks: where records go besides gRPC streams. One module per protocol, see base.py."""
