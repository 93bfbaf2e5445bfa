"""The gadget service (gRPC servicers on grpclib), its client (grpcio) and the CLI."""
