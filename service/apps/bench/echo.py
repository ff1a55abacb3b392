"""The transport's ceiling: a bare ``grpc.aio`` server that moves bytes the way kvtier does, and nothing else.

No protobuf, no store, no checksums: ``Put`` is a client stream of raw chunks answered with the byte
count; ``Get`` answers an 8-byte size with a server stream of chunks cut from one buffer. Chunks are
:data:`service.blockwire.CHUNK_BYTES` (1 MiB), as in kvtier's ``Put``/``Get``. Run it as
``python -m kvtier.service.apps.bench.echo PORT_FILE``: it binds 127.0.0.1 on a free port, writes the port to
``PORT_FILE`` and serves until SIGTERM. The client helpers below drive it (sync and asyncio).
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import sys

import grpc

from kvtier.service.client.blockwire import CHUNK_BYTES

_SIZE = struct.Struct("<Q")
PUT = "/kvtier.bench.Echo/Put"
GET = "/kvtier.bench.Echo/Get"
_MAX = 64 << 20


async def _put(request_iterator, context) -> bytes:
    total = 0
    async for chunk in request_iterator:
        total += len(chunk)
    return _SIZE.pack(total)


def _make_get(buffer: bytearray):
    async def _get(request: bytes, context):
        size = _SIZE.unpack(request)[0]
        view = memoryview(buffer)
        offset = 0
        while offset < size:
            end = min(offset + CHUNK_BYTES, size)
            # bytes(): the same one copy per chunk that kvtier's servicer makes into a message
            yield bytes(view[offset:end])
            offset = end
    return _get


async def serve(port_file: str) -> None:
    """Serve until SIGTERM/SIGINT; the bound port is written to ``port_file`` (temp + rename)."""
    buffer = bytearray(os.urandom(1 << 16)) * (_MAX >> 16)
    handler = grpc.method_handlers_generic_handler("kvtier.bench.Echo", {
        "Put": grpc.stream_unary_rpc_method_handler(_put),
        "Get": grpc.unary_stream_rpc_method_handler(_make_get(buffer)),
    })
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 8 << 20),
                                      ("grpc.max_receive_message_length", 8 << 20)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    with open(port_file + ".tmp", "w") as fh:
        fh.write(f"{port}\n")
    os.replace(port_file + ".tmp", port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def _chunks(payload: memoryview):
    for offset in range(0, len(payload), CHUNK_BYTES):
        yield bytes(payload[offset:offset + CHUNK_BYTES])


def sync_put(channel: grpc.Channel, payload: memoryview) -> int:
    """Stream ``payload`` in 1 MiB chunks; returns the byte count the server saw."""
    return _SIZE.unpack(channel.stream_unary(PUT)(_chunks(payload)))[0]


def sync_get(channel: grpc.Channel, size: int) -> bytearray:
    """Receive ``size`` bytes as 1 MiB chunks, reassembled into one buffer (as kvtier's client does)."""
    out = bytearray(size)
    offset = 0
    for chunk in channel.unary_stream(GET)(_SIZE.pack(size)):
        out[offset:offset + len(chunk)] = chunk
        offset += len(chunk)
    return out


async def aio_get(channel: grpc.aio.Channel, size: int) -> bytearray:
    """Async form of :func:`sync_get`."""
    out = bytearray(size)
    offset = 0
    async for chunk in channel.unary_stream(GET)(_SIZE.pack(size)):
        out[offset:offset + len(chunk)] = chunk
        offset += len(chunk)
    return out


async def aio_put(channel: grpc.aio.Channel, payload: memoryview) -> int:
    """Async form of :func:`sync_put`."""
    async def gen():
        for chunk in _chunks(payload):
            yield chunk
    return _SIZE.unpack(await channel.stream_unary(PUT)(gen()))[0]


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
