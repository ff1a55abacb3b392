"""What kvtier clients return and raise: small result dataclasses and :class:`KVTierClientError`.

Shared by the gRPC clients (:mod:`kvtier.service.client.client`) and the in-process adapter
(:mod:`kvtier.service.client.local`), so code written against one works with the other. Tiers are named
``"hot"``, ``"warm"``, ``"cold"``; a tier of ``None`` means the block is not cached.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import torch

from kvtier.tiering.dtypes import TORCH_DTYPES
from kvtier.tiering.keys import BlockKey, Namespace

DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


class KVTierClientError(Exception):
    """A kvtier call failed. Raised by every client method instead of ``grpc.RpcError``.

    :ivar code: the ``grpc.StatusCode`` (``DATA_LOSS`` for a block whose checksum did not match,
        ``INVALID_ARGUMENT`` for a payload the client refused to send).
    :ivar details: the server's (or client's) message.
    :ivar status: the rich ``google.rpc.Status`` the server attached, or ``None``.
    :ivar error_details: the unpacked ``status.details`` (``BadRequest``, ``QuotaFailure``,
        ``ErrorInfo``…; unknown types stay ``google.protobuf.Any``).
    """

    def __init__(self, code: grpc.StatusCode, details: str, *, status=None, error_details: list | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.status = status
        self.error_details = error_details or []

    @property
    def field_violations(self) -> list[tuple[str, str]]:
        """``(field, description)`` of every ``BadRequest`` violation in :attr:`error_details`."""
        out = []
        for d in self.error_details:
            for v in getattr(d, "field_violations", ()):
                out.append((v.field, v.description))
        return out


@dataclass(frozen=True, slots=True)
class LookupInfo:
    """Longest cached prefix of a token sequence.

    :ivar keys: keys of every block of the request (cached or not), in prefix order.
    :ivar cached_blocks: blocks in the longest cached prefix (an exact-only lookup stops before a lossy one).
    :ivar cached_tokens: tokens those blocks cover.
    :ivar tiers: tier of each cached block, in order (``len == cached_blocks``).
    :ivar lossy: per cached block, whether a read would give approximate bytes (a lossy namespace's block
        read back from its lossy cold record); ``[]`` from a server that does not say.
    """

    keys: list[BlockKey]
    cached_blocks: int
    cached_tokens: int
    tiers: list[str]
    lossy: list[bool] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PutInfo:
    """What a put did; ``keys`` covers every block of the token ids, in prefix order."""

    keys: list[BlockKey]
    stored: list[BlockKey] = field(default_factory=list)
    skipped_present: list[BlockKey] = field(default_factory=list)
    skipped_not_admitted: list[BlockKey] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class GetResult:
    """Blocks of a chain, in prefix order, stopping at the first miss.

    :ivar blocks: one tensor per block, shape ``[2, layers, kv_heads, tokens, head_dim]`` in the
        block's dtype, checksum-verified.
    :ivar keys: the key of each block. :ivar tiers: the tier each block was served from.
    :ivar complete: every requested block was sent.
    :ivar stopped_at: index of the first block not sent when not complete, else ``None``.
    :ivar reason: why the stream stopped early (``"miss"``, ``"deadline"``, ``"max_blocks"``), or ``""``.
    :ivar tokens: tokens covered by :attr:`blocks`.
    :ivar lossy: per block, whether its bytes are approximate (sent only to a get with ``accept_lossy``).

    It is also the sequence of its blocks: ``len(result)`` is the number of blocks, ``result[i]`` and
    iteration give the tensors (so an empty result is falsy).
    """

    blocks: list[torch.Tensor]
    keys: list[BlockKey]
    tiers: list[str]
    complete: bool
    stopped_at: int | None
    reason: str
    tokens: int
    lossy: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.blocks)

    def __getitem__(self, index):
        return self.blocks[index]


@dataclass(frozen=True, slots=True)
class KVResult:
    """Blocks of a chain written layer-major into one tensor (``get_kv``): what a cache's layers take as views.

    :ivar kv: ``[2, layers, kv_heads, capacity, head_dim]`` in the layout's dtype, on the host: tokens
        ``[0, tokens)`` hold the blocks in order, each checksum-verified there; the rest is uninitialised
        room. ``kv[0, i]`` / ``kv[1, i]`` are layer ``i``'s keys / values. Over shared memory it lies in
        the client's arena, whose range stays leased until the tensor and every view of it are garbage.
    :ivar keys, tiers, complete, stopped_at, reason, tokens, lossy: as :class:`GetResult`'s.
    """

    kv: torch.Tensor
    keys: list[BlockKey]
    tiers: list[str]
    complete: bool
    stopped_at: int | None
    reason: str
    tokens: int
    lossy: list[bool] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ResumeInfo:
    """A session's manifest, as a resume found it.

    :ivar tiers: tier of each block when the resume started (``None``: the block is gone).
    :ivar cached_blocks: blocks of the longest prefix still cached (an exact-only resume stops before a
        lossy one).
    :ivar lossy: per block of the session, whether a read would give approximate bytes.
    """

    namespace: Namespace
    tokens: int
    keys: list[BlockKey]
    tiers: list[str | None]
    cached_blocks: int
    priority: int = 0
    ttl_seconds: float = 0.0
    lossy: list[bool] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PrefetchInfo:
    """Blocks asked for, and blocks in the top tier when the answer was sent (with ``wait``)."""

    blocks: int
    ready_blocks: int


@dataclass(frozen=True, slots=True)
class TierStatsInfo:
    """Counters and usage of one tier."""

    tier: str | None
    blocks: int
    used_bytes: int
    capacity_bytes: int
    hits: int
    misses: int
    promotions: int
    demotions: int
    evictions: int
    checksum_failures: int


@dataclass(frozen=True, slots=True)
class StatsInfo:
    """The server's counters: one entry per enabled tier (top first) and store-wide numbers."""

    tiers: list[TierStatsInfo]
    pinned_blocks: int
    write_queue_depth: int
    pending_writes: int
    compression_ratio: float
    bytes_moved: dict[str, int]
    counters: dict[str, int]
    version: str
