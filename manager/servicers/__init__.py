"""gRPC servicers: protobuf <-> domain translation and caller identity only."""
