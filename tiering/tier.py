"""The Tier interface every storage level implements, and Block, the value tiers hold.

A tier owns bytes and their accounting, nothing else: which keys to evict is the policy's job
(``tiering/policies``), where a block goes is the store's (``tiering/store.py``). A miss is ``None``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .keys import BlockKey


@dataclass(slots=True)
class Block:
    """One KV block as a tier holds it.

    :ivar data: the block's raw bytes as a 1-D ``torch.uint8`` tensor (on the tier's device).
    :ivar dtype: element type name of the KV (see :data:`tiering.layout.DTYPES`).
    :ivar shape: ``(2, layers, kv_heads, tokens, head_dim)``.
    :ivar checksum: XXH3-64 of the raw bytes, computed once when the block entered kvtier.
    :ivar ns_id: id of the namespace the block belongs to.
    """

    data: torch.Tensor
    dtype: str
    shape: tuple[int, int, int, int, int]
    checksum: int
    ns_id: bytes

    @property
    def nbytes(self) -> int:
        return int(self.data.numel())

    @property
    def tokens(self) -> int:
        return self.shape[3]

    def with_data(self, data: torch.Tensor) -> "Block":
        """The same block with its bytes somewhere else (another device or buffer)."""
        return Block(data, self.dtype, self.shape, self.checksum, self.ns_id)


class Tier(ABC):
    """A storage level with a byte capacity. Implementations document their own thread-safety."""

    #: ``hot``, ``warm`` or ``cold``: used in stats, spans and logs.
    name: str

    @abstractmethod
    def contains(self, key: BlockKey) -> bool:
        """Whether the tier holds ``key`` now (no recency update, no data movement)."""

    @abstractmethod
    def get(self, key: BlockKey) -> Block | None:
        """The block, or ``None`` on a miss. Counts as an access for the eviction policy."""

    @abstractmethod
    def put(self, key: BlockKey, block: Block) -> None:
        """Store ``block`` under ``key`` (replacing any block there).

        :raises CapacityExceeded: if it does not fit; the tier never evicts on its own initiative.
        """

    @abstractmethod
    def delete(self, key: BlockKey) -> bool:
        """Drop ``key``. Returns whether it was there."""

    @abstractmethod
    def keys(self) -> Iterator[BlockKey]:
        """The keys held now (a snapshot for memory tiers)."""

    @property
    @abstractmethod
    def capacity_bytes(self) -> int:
        """Bytes the tier may hold."""

    @property
    @abstractmethod
    def used_bytes(self) -> int:
        """Bytes held now."""

    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    def close(self) -> None:
        """Release resources. The default does nothing."""
