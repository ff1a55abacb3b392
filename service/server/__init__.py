"""The kvtier server: grpc.aio wiring, the KVCache servicer, errors mapped once, auth, TLS, quotas, settings,
telemetry, metrics and the server side of the same-host (shared memory, CUDA IPC) data plane. Imports wire/ and
tiering/, never client/ or apps/."""
