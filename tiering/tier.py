"""The Tier contract every storage level meets, Block (the value tiers hold) and Fetched (a block on
its way out). Imports torch, ``keys`` and ``spans`` only.

A tier owns bytes and their accounting, nothing else: which keys to evict is its policy's job
(``tiering/policies``), where a block goes is the placement's (``tiering/placement.py``), and where a
tier sits in the store is the tier list's (``tiering/tierlist.py``). A miss is ``None``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from .keys import BlockKey
from .spans import TierOps, now_ns


@dataclass(slots=True)
class Block:
    """One KV block as a tier holds it.

    :ivar data: the block's raw bytes as a 1-D ``torch.uint8`` tensor (on the tier's device).
    :ivar dtype: element type name of the KV (see :data:`tiering.layout.DTYPES`).
    :ivar shape: ``(2, layers, kv_heads, tokens, head_dim)``.
    :ivar checksum: XXH3-64 of the raw bytes, computed once when the block entered kvtier.
    :ivar ns_id: id of the namespace the block belongs to.
    :ivar cold_codec: the namespace's lossy cold codec (``""``: lossless); durable tiers encode with it.
    :ivar lossy: the bytes are approximate: decoded from a lossy record (kept in every tier it moves to).
    """

    data: torch.Tensor
    dtype: str
    shape: tuple[int, int, int, int, int]
    checksum: int
    ns_id: bytes
    cold_codec: str = ""
    lossy: bool = False

    @property
    def nbytes(self) -> int:
        return int(self.data.numel())

    @property
    def tokens(self) -> int:
        return self.shape[3]

    def with_data(self, data: torch.Tensor) -> "Block":
        """The same block with its bytes somewhere else (another device or buffer)."""
        return Block(data, self.dtype, self.shape, self.checksum, self.ns_id, self.cold_codec, self.lossy)


@dataclass(slots=True)
class Fetched:
    """A block found by :meth:`Tier.fetch`, ready to be written into a caller's buffer.

    :ivar tier: name of the level that answered (see :meth:`Tier.read`).
    :ivar nbytes: raw bytes of the block. :ivar ns_id: its namespace id.
    :ivar block: the block itself when its bytes are ready (a memory tier, a write queue); ``None``
        when they still have to be decoded, then :attr:`decode_into` does it.
    :ivar decode_into: writes the raw bytes into a buffer of exactly ``nbytes`` and returns the block
        describing them, or ``None`` if they failed their check (the tier then forgets the block).
    :ivar lossy: the bytes are approximate (a lossy record, or a block decoded from one).
    """

    tier: str
    nbytes: int
    ns_id: bytes
    block: Block | None = None
    decode_into: Callable[..., Block | None] | None = None
    lossy: bool = False


class Tier(ABC):
    """A storage level with a byte capacity. Implementations document their own thread-safety.

    Required: :meth:`contains`, :meth:`get`, :meth:`put`, :meth:`delete`, :meth:`keys`,
    :meth:`ns_of`, :meth:`victims`, :meth:`evict`, :meth:`ns_used_bytes`, :attr:`capacity_bytes`,
    :attr:`used_bytes`. The
    rest have defaults built on those, which a tier overrides when it can do better (one transaction
    for many keys, a record decoded straight into the caller's buffer).
    """

    #: ``hot``, ``warm``, ``cold``…: used in stats, spans and logs.
    name: str
    #: Reads do I/O (disk, network): the store calls :meth:`read`/:meth:`fetch` outside its lock and
    #: loads one key once at a time (single-flight). False: reads are dict lookups, made under the lock.
    slow: bool = False
    #: Where the bytes of a :meth:`get` live (``None``: a fresh CPU buffer per read).
    device = None
    #: Which ``tenant_usage`` figure this tier's bytes count in (``memory``, ``cold``, ...).
    usage_group: str = "memory"
    #: Blocks this tier dropped because their bytes failed their check (it only ever grows).
    checksum_failures: int = 0

    # -- reads ------------------------------------------------------------------------------------------
    @abstractmethod
    def contains(self, key: BlockKey) -> bool:
        """Whether the tier holds ``key`` now (a peek: no recency update, no data movement)."""

    def contains_many(self, keys: Iterable[BlockKey]) -> list[bool]:
        """:meth:`contains` of several keys (a peek), in one pass or transaction where the tier can."""
        return [self.contains(k) for k in keys]

    @abstractmethod
    def get(self, key: BlockKey) -> Block | None:
        """The block, or ``None`` on a miss. Counts as an access for the eviction policy."""

    def peek(self, key: BlockKey) -> Block | None:
        """:meth:`get` without the access (no recency update). The default is :meth:`get`, right for a
        tier whose policy keeps no recency (the cold tier's is write order)."""
        return self.get(key)

    @abstractmethod
    def ns_of(self, key: BlockKey) -> bytes | None:
        """The namespace id of ``key``'s block, ``None`` if absent (a peek)."""

    def read(self, key: BlockKey, ops: TierOps | None = None) -> tuple[Block, str] | None:
        """:meth:`get`, plus the name of the level that answered (a wrapping tier names the part that
        did, e.g. its write queue), recording the work into ``ops`` as ``<name>.read``."""
        t0 = now_ns() if ops is not None else 0
        block = self.get(key)
        if ops is not None:
            ops.record(f"{self.name}.read", t0, now_ns(), nbytes=block.nbytes if block else 0, hit=block is not None)
        return None if block is None else (block, self.name)

    def fetch(self, key: BlockKey, ops: TierOps | None = None) -> Fetched | None:
        """The block for a copy into a caller's buffer (an access). The default reads it whole."""
        got = self.read(key, ops)
        if got is None:
            return None
        block, where = got
        return Fetched(where, block.nbytes, block.ns_id, block=block, lossy=block.lossy)

    def locate(self, keys: list[BlockKey]) -> list[str | None]:
        """For each key, the name of the level holding it, else ``None`` (a peek)."""
        return [self.name if here else None for here in self.contains_many(keys)]

    def keys_of_namespace(self, ns_id: bytes) -> list[BlockKey]:
        """Keys held for namespace ``ns_id``. The default walks every key."""
        return [k for k in self.keys() if self.ns_of(k) == ns_id]

    @abstractmethod
    def keys(self) -> Iterator[BlockKey]:
        """The keys held now (a snapshot)."""

    # -- writes -----------------------------------------------------------------------------------------
    @abstractmethod
    def put(self, key: BlockKey, block: Block) -> None:
        """Store ``block`` under ``key`` (replacing any block there).

        A write-behind tier may make this asynchronous; it then answers reads from its queue until the
        write is committed, and :meth:`flush` waits for the commit.

        :raises CapacityExceeded: if it does not fit; a tier never evicts on its own initiative (the
            caller asks :meth:`victims`, then :meth:`evict`).
        """

    def stage(self, block: Block, *, copy: bool = True) -> Block:
        """A copy of ``block`` this tier may keep (e.g. its bytes on the tier's device), made before the
        caller takes its lock; private to the caller until :meth:`put`. Without ``copy`` the caller hands
        the bytes over: ``block`` itself is kept when its bytes are where the tier keeps them. The
        default keeps ``block``."""
        return block

    @abstractmethod
    def delete(self, key: BlockKey) -> bool:
        """Drop ``key``. Returns whether it was there."""

    def delete_many(self, keys: Iterable[BlockKey]) -> list[BlockKey]:
        """Drop several keys (one transaction where the tier can); returns those that were there."""
        return [k for k in keys if self.delete(k)]

    # -- eviction: transactional, driven by the tier's policy ---------------------------------------------
    @abstractmethod
    def victims(self, nbytes: int, protected: Callable[[BlockKey], bool]) -> list[BlockKey] | None:
        """Keys whose eviction lets a block of ``nbytes`` raw bytes fit (a tier that charges a block
        more than its raw bytes, e.g. a disk tier's page footprint, counts that), least valuable first
        (the tier's policy orders them); ``[]`` if it fits already; ``None`` if the unprotected keys
        cannot free enough. Mutates nothing."""

    @abstractmethod
    def evict(self, keys: list[BlockKey]) -> list[tuple[BlockKey, Block | None]]:
        """Remove ``keys`` (chosen by :meth:`victims`) as evictions: the policy learns they left as
        victims. Returns what was removed; a tier that cannot hand the bytes back cheaply (a disk tier)
        gives ``None`` for the block."""

    # -- accounting and lifecycle -------------------------------------------------------------------------
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

    @abstractmethod
    def ns_used_bytes(self, ns_ids: Iterable[bytes]) -> int:
        """Bytes held for these namespaces (ids), counted as :attr:`used_bytes` counts them."""

    def block_count(self) -> int:
        return sum(1 for _ in self.keys())

    def check(self) -> list[str]:
        """Problems between the tier's contents and its accounting; [] if none. O(blocks)."""
        return []

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every write accepted so far is committed. The default has nothing to wait for."""

    def close(self) -> None:
        """Release resources. The default does nothing."""
