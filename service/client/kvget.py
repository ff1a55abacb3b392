"""Gets into a layer-major KV destination on the client: the tensor, and the Get stream scattered into it.

Imports the client's types, wire/ and tiering's scatter and layout. ``get_kv`` (the clients) asks for a
chain's blocks written straight into ``[2, layers, kv_heads, capacity, head_dim]``, the K and V tensors an
attention cache takes as they are. Over shared memory the server scatters into the client's arena
(``service/client/shm.py``); over the Get stream :class:`KVAssembler` scatters each block as its bytes
arrive (a block that comes in one message is placed from the message itself; a larger one is gathered in
a buffer first), checking its XXH3-64 on the destination's bytes: a block that fails raises
``DATA_LOSS`` and nothing is returned.
"""

from __future__ import annotations

import grpc
import torch

from kvtier.service.client.blockwire import BlockFramer
from kvtier.service.client.types import TORCH_DTYPES, KVResult, KVTierClientError
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.tiering.layout import BlockLayout
from kvtier.tiering.scatter import KVDest


def kv_shape(layout: BlockLayout, capacity: int) -> tuple[int, int, int, int, int]:
    """Shape of a destination of ``capacity`` tokens for blocks of ``layout``."""
    return 2, layout.layers, layout.kv_heads, capacity, layout.head_dim


def kv_capacity(layout: BlockLayout, blocks: int, capacity: int) -> int:
    """The destination's tokens for ``blocks`` blocks: ``capacity``, or by default room for all of them.

    :raises KVTierClientError: ``INVALID_ARGUMENT`` if ``capacity`` is below ``blocks`` full blocks.
    """
    need = blocks * layout.block_tokens
    if capacity and capacity < need:
        raise KVTierClientError(grpc.StatusCode.INVALID_ARGUMENT, f"a destination of {capacity} tokens cannot hold "
                                f"{blocks} blocks of {layout.block_tokens} tokens")
    return max(capacity, need, 1)


def as_dest(kv: torch.Tensor, dtype: str) -> KVDest:
    """The :class:`KVDest` over a host tensor ``[2, layers, kv_heads, capacity, head_dim]`` (its bytes)."""
    return KVDest(kv.view(torch.uint8).numpy(), dtype)


class KVAssembler:
    """Feeds on ``GetResponse`` messages in stream order, scattering each block into a fresh destination
    of ``capacity`` tokens; :meth:`result` gives it. Not thread-safe (one per stream)."""

    def __init__(self, layout: BlockLayout, capacity: int) -> None:
        self.kv = torch.empty(kv_shape(layout, capacity), dtype=TORCH_DTYPES[layout.dtype])
        self._dest = as_dest(self.kv, layout.dtype)
        self._tokens = 0
        self._framer = BlockFramer(self._place)

    def feed(self, msg: pb.GetResponse) -> None:
        """Consume one message.

        :raises KVTierClientError: ``DATA_LOSS`` on a checksum mismatch; ``INVALID_ARGUMENT`` for a block
            of another geometry or past the capacity; ``INTERNAL`` on messages out of order.
        """
        self._framer.feed(msg)

    def _place(self, head: pb.BlockHeader, data: bytes | bytearray) -> None:
        shape = tuple(head.shape)
        if not self._dest.fits(head.dtype, shape) or self._tokens + shape[3] > self._dest.capacity \
                or len(data) != shape[3] * self._dest.token_bytes:
            raise KVTierClientError(grpc.StatusCode.INVALID_ARGUMENT, f"block {head.index} ({head.dtype} {shape}) "
                                    f"does not fit the destination {self._dest.geometry} at token {self._tokens} "
                                    f"of {self._dest.capacity}")
        got = self._dest.place(self._tokens, data, shape[3])
        if got != head.checksum:
            raise KVTierClientError(grpc.StatusCode.DATA_LOSS, f"block {head.index} (key {head.key.hex()}) failed "
                                    f"its checksum: {got:016x} != {head.checksum:016x}; the bytes were not used")
        self._tokens += shape[3]

    def result(self) -> KVResult:
        """The destination and the blocks in it.

        :raises KVTierClientError: ``INTERNAL`` if the stream ended inside a block or without a GetEnd.
        """
        end, f = self._framer.end(), self._framer
        return KVResult(self.kv, f.keys, f.tiers, end.complete, None if end.complete else end.stopped_at,
                        end.reason, self._tokens, f.lossy)
