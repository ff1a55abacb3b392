"""Client side of the block wire format: chunking payloads for Put, reassembling and verifying Get.

Both gRPC clients (sync and asyncio) use these, so the byte handling exists once. A Put stream is a
``PutHeader`` then, per block, chunks of at most :data:`CHUNK_BYTES` with the block's XXH3-64 on its
last chunk (to a server that accepts it, the first chunk rides in the header's message). A Get stream
is, per block, a ``BlockHeader`` then ``data`` messages until ``size`` bytes, then a ``GetEnd``; or,
asked for with ``inline_data``, the first bytes in the header's message and the ``GetEnd`` in the last
block's last message (a small Get is one message). :class:`GetAssembler` reads both forms, turns them
into tensors and never hands out a block whose bytes do not match the header's checksum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import grpc
import numpy as np
import torch

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.client.types import DTYPE_NAMES, TORCH_DTYPES, GetResult, KVTierClientError
from kvtier.service.wire.convert import TIER_FROM_PROTO
from kvtier.service.wire.fast import encode_put_chunk, encode_put_first
from kvtier.tiering.codec import checksum
from kvtier.tiering.keys import BlockKey
from kvtier.tiering.layout import BlockLayout, blocks_for

#: Largest ``BlockChunk.data`` the contract allows (1 MiB).
CHUNK_BYTES = 1 << 20

Payload = torch.Tensor | np.ndarray | bytes | bytearray | memoryview


def _invalid(details: str) -> KVTierClientError:
    return KVTierClientError(grpc.StatusCode.INVALID_ARGUMENT, details)


def payload_view(data: Payload, dtype: str | None = None, index: int = 0) -> memoryview:
    """The raw bytes of one block payload as a flat byte memoryview (no copy for CPU-contiguous data).

    :param data: a tensor or ndarray (any device/contiguity; copied to contiguous CPU when needed)
        or raw bytes.
    :param dtype: the namespace's layout dtype; a tensor or array of another dtype is refused.
    :param index: block index, for the error message.
    :raises KVTierClientError: ``INVALID_ARGUMENT`` when the element type does not match ``dtype``.
    """
    if isinstance(data, np.ndarray):
        if data.dtype == np.uint8 and data.ndim == 1:
            return memoryview(np.ascontiguousarray(data)).cast("B")
        data = torch.from_numpy(np.ascontiguousarray(data))
    if isinstance(data, torch.Tensor):
        name = DTYPE_NAMES.get(data.dtype)
        if dtype is not None and name != dtype:
            raise _invalid(f"block {index} is {data.dtype} but the namespace's layout is {dtype}")
        flat = data.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        return memoryview(flat.numpy()).cast("B")
    return memoryview(data).cast("B")


def put_requests(header: pb.PutHeader, payloads: Iterable[memoryview], *, with_checksums: bool = True,
                 chunk_bytes: int = CHUNK_BYTES, first_chunk: bool = False) -> Iterator[pb.PutRequest | bytes]:
    """The messages of one Put stream: the header, then each payload's chunks in order.

    The chunks come already encoded (``bytes``, :func:`service.wire_fast.encode_put_chunk`, one copy
    of the payload): send the stream with :class:`service.wire_fast.FastKVCacheStub`'s ``Put``.

    :param header: the ``PutHeader`` (``first_block`` and ``block_count`` already set).
    :param payloads: byte views of blocks ``first_block``, ``first_block + 1``…
    :param with_checksums: send each block's XXH3-64 on its last chunk (the server verifies it).
    :param first_chunk: send the first chunk in the header's message (``PutRequest.first_chunk``): only
        to a server whose ``PutResponse`` said ``accepts_first_chunk``.
    """
    pending = header if first_chunk else None  # the header, until the first chunk goes with it
    if pending is None:
        yield pb.PutRequest(header=header)
    for i, view in enumerate(payloads):
        index = header.first_block + i
        csum = checksum(view) if with_checksums else 0
        size = len(view)
        offset = 0
        while True:
            end = min(offset + chunk_bytes, size)
            last = end == size
            if pending is not None and end:
                yield encode_put_first(pending, view[offset:end], csum if last else 0)
                pending = None
            else:
                yield encode_put_chunk(index, offset, view[offset:end], csum if last else 0)
            offset = end
            if last:
                break
    if pending is not None:  # no bytes at all: the header alone
        yield pb.PutRequest(header=header)


def decode_block(header: pb.BlockHeader, payload: bytearray | bytes) -> torch.Tensor:
    """The block announced by ``header`` as a tensor of its dtype and shape, after verifying it.

    :param header: the block's ``BlockHeader``.
    :param payload: its bytes; the tensor shares this buffer (no copy) when it is a ``bytearray``.
    :returns: a C-contiguous CPU tensor of shape ``header.shape`` and dtype ``header.dtype``.
    :raises KVTierClientError: ``DATA_LOSS`` when the size or the checksum does not match the header,
        ``INTERNAL`` for an unknown dtype or a shape that does not fit the size.
    """
    if len(payload) != header.size:
        raise KVTierClientError(grpc.StatusCode.DATA_LOSS,
                                f"block {header.index}: got {len(payload)} bytes, header announced {header.size}")
    got = checksum(payload)
    if got != header.checksum:
        raise KVTierClientError(grpc.StatusCode.DATA_LOSS,
                                f"block {header.index} (key {header.key.hex()}) failed its checksum: "
                                f"{got:016x} != {header.checksum:016x}; the bytes were not used")
    dtype = TORCH_DTYPES.get(header.dtype)
    shape = tuple(header.shape)
    if dtype is None or len(shape) != 5 or math.prod(shape) * dtype.itemsize != len(payload):
        raise KVTierClientError(grpc.StatusCode.INTERNAL,
                                f"block {header.index}: {len(payload)} bytes do not hold {header.dtype} {shape}")
    if not payload:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(payload if isinstance(payload, bytearray) else bytearray(payload), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


class BlockFramer:
    """Feeds on ``GetResponse`` messages in stream order and hands each whole block to ``on_block(header,
    data)``: ``data`` is the message's own bytes when the block came in one message, else a fresh
    ``bytearray`` of its chunks. Keeps what the stream said of each block (key, tier, lossy) and its end.

    Not thread-safe (one per stream).
    """

    def __init__(self, on_block: Callable[[pb.BlockHeader, bytes | bytearray], None]) -> None:
        self._on_block = on_block
        self.keys: list[BlockKey] = []
        self.tiers: list[str] = []
        self.lossy: list[bool] = []
        self._header: pb.BlockHeader | None = None
        self._buf = bytearray()
        self._filled = 0
        self._end: pb.GetEnd | None = None

    def feed(self, msg: pb.GetResponse) -> None:
        """Consume one message (either form: module docstring).

        :raises KVTierClientError: what ``on_block`` raises; ``INTERNAL`` on messages out of order (data
            without a header, more bytes than announced, a header mid-block, anything after the ``GetEnd``).
        """
        if self._end is not None:
            raise KVTierClientError(grpc.StatusCode.INTERNAL, "a message arrived after the Get stream's end")
        kind = msg.WhichOneof("msg")
        if kind == "header":
            if self._header is not None:
                raise KVTierClientError(grpc.StatusCode.INTERNAL, "a block header arrived before the previous "
                                        "block's data was complete")
            self._header, self._filled = msg.header, 0
            if msg.header_data:
                self._add(msg.header_data)
            elif not msg.header.size:
                self._finish(bytearray())
        elif kind == "data":
            self._add(msg.data)
        elif kind == "end":
            self._end = msg.end
        if msg.HasField("last"):
            self._end = msg.last

    def _add(self, data: bytes) -> None:
        head = self._header
        if head is None or self._filled + len(data) > head.size:
            raise KVTierClientError(grpc.StatusCode.INTERNAL, "block data arrived without a header or past "
                                    "the announced size")
        if self._filled == 0 and len(data) == head.size:
            self._finish(data)  # the whole block in one message
            return
        if self._filled == 0:
            self._buf = bytearray(head.size)
        self._buf[self._filled:self._filled + len(data)] = data
        self._filled += len(data)
        if self._filled == head.size:
            self._finish(self._buf)

    def _finish(self, data: bytes | bytearray) -> None:
        header = self._header
        self._on_block(header, data)
        self.keys.append(BlockKey(bytes(header.key)))
        self.tiers.append(TIER_FROM_PROTO.get(header.tier))
        self.lossy.append(header.lossy)
        self._header = None
        self._buf = bytearray()

    def end(self) -> pb.GetEnd:
        """The stream's ``GetEnd``.

        :raises KVTierClientError: ``INTERNAL`` if the stream ended inside a block or without a GetEnd.
        """
        if self._header is not None or self._end is None:
            raise KVTierClientError(grpc.StatusCode.INTERNAL, "the Get stream ended early (inside a block or "
                                    "without its GetEnd)")
        return self._end


class GetAssembler:
    """Feeds on ``GetResponse`` messages in stream order; :meth:`result` gives the verified blocks.

    Not thread-safe (one per stream). Each block is verified as soon as its last byte arrives.
    """

    def __init__(self) -> None:
        self._blocks: list[torch.Tensor] = []
        self._framer = BlockFramer(lambda header, data: self._blocks.append(
            decode_block(header, data if isinstance(data, bytearray) else bytearray(data))))

    def feed(self, msg: pb.GetResponse) -> None:
        """Consume one message.

        :raises KVTierClientError: ``DATA_LOSS`` on a checksum mismatch, ``INTERNAL`` on messages
            out of order (data without a header, more bytes than announced, a header mid-block,
            anything after the ``GetEnd``).
        """
        self._framer.feed(msg)

    def result(self) -> GetResult:
        """The blocks received.

        :raises KVTierClientError: ``INTERNAL`` if the stream ended inside a block or without a GetEnd.
        """
        end, f = self._framer.end(), self._framer
        tokens = sum(int(b.shape[3]) for b in self._blocks)
        return GetResult(self._blocks, f.keys, f.tiers, end.complete, None if end.complete else end.stopped_at,
                         end.reason, tokens, f.lossy)


def block_shapes(layout: BlockLayout, tokens: int, first_block: int = 0) -> list[tuple[int, ...]]:
    """Shapes of blocks ``first_block…`` of a sequence of ``tokens`` tokens (the last may be partial).

    :raises KVTierClientError: ``INVALID_ARGUMENT`` for a negative count or a ``first_block`` past the end.
    """
    bt = layout.block_tokens
    n = blocks_for(tokens, bt) if tokens >= 0 else -1
    if n < 0 or not 0 <= first_block <= n:
        raise _invalid(f"blocks from index {first_block} of {tokens} tokens: no such blocks")
    return [layout.shape(min(bt, tokens - i * bt)) for i in range(first_block, n)]


def check_payload_count(payloads: Sequence, n_keys: int, first_block: int) -> None:
    """Refuse locally a put whose blocks cannot fit the token ids (the server would too)."""
    if first_block < 0 or first_block + len(payloads) > n_keys:
        raise _invalid(f"{len(payloads)} blocks from index {first_block} do not fit the {n_keys} blocks of the "
                       "token ids")
