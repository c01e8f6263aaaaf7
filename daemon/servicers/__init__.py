"""gRPC servicers of the daemon: protobuf <-> supervisor calls, identity checks."""
