"""Clients of the kvtier service: blocking and asyncio gRPC clients, the in-process client, their result types
and the client side of the same-host data plane. Imports wire/ and the light tiering vocabulary, never server/."""
