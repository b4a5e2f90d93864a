"""RPC implementations, one module per group of grpc.AgentService / grpc.Health methods."""
