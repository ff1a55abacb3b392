"""MemoryTier: blocks as torch tensors on one device (the hot and warm tiers are both this).

Imports torch, ``tier``, ``policies`` and ``errors``. Not thread-safe on its own: the store holds its
lock around every call, and copies bytes onto the tier's device *before* taking that lock (:meth:`stage`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from .errors import CapacityExceeded
from .keys import BlockKey
from .policies import EvictionPolicy
from .tier import Block, Tier


class MemoryTier(Tier):
    """A dict of blocks on ``device`` with byte accounting and an eviction policy.

    :param name: ``hot`` or ``warm``.
    :param device: where the bytes live (``cuda:0``, ``cpu``).
    :param capacity: bytes the tier may hold.
    :param policy: orders the keys for eviction.
    :param pin_memory: allocate host buffers page-locked (only meaningful for a CPU tier with CUDA
        present: host→device copies from it are asynchronous).
    """

    def __init__(self, name: str, device: torch.device | str, capacity: int, policy: EvictionPolicy,
                 *, pin_memory: bool = False) -> None:
        self.name = name
        self.device = torch.device(device)
        self._capacity = int(capacity)
        self.policy = policy
        self.pin_memory = pin_memory and self.device.type == "cpu"
        self._blocks: dict[BlockKey, Block] = {}
        self._used = 0
        self._ns_used: dict[bytes, int] = {}  # bytes per namespace (ns_id): per-tenant quotas

    # -- copies (no lock needed: they touch no shared state) ---------------------------------------
    def stage(self, block: Block, *, copy: bool = True) -> Block:
        """``block`` with its bytes on this tier's device: 1 copy (async for pinned→CUDA); without
        ``copy``, none when they are there already (and need no pinning).

        The returned block is private to the caller until :meth:`put` publishes it.
        """
        src = block.data
        if self.pin_memory:
            dst = torch.empty(src.numel(), dtype=torch.uint8, pin_memory=True)
            dst.copy_(src)
        elif src.device == self.device:
            if not copy:
                return block
            dst = src.clone()
        else:
            non_blocking = self.device.type == "cuda" and src.device.type == "cpu" and src.is_pinned()
            dst = src.to(self.device, non_blocking=non_blocking)
            if non_blocking:
                torch.cuda.current_stream(self.device).synchronize()
        return block.with_data(dst)

    # -- Tier ---------------------------------------------------------------------------------------
    def contains(self, key: BlockKey) -> bool:
        return key in self._blocks

    def ns_of(self, key: BlockKey) -> bytes | None:
        block = self._blocks.get(key)
        return None if block is None else block.ns_id

    def peek(self, key: BlockKey) -> Block | None:
        """Like :meth:`get` but not an access (no recency change)."""
        return self._blocks.get(key)

    def get(self, key: BlockKey) -> Block | None:
        block = self._blocks.get(key)
        if block is not None:
            self.policy.touch(key)
        return block

    def put(self, key: BlockKey, block: Block) -> None:
        old = self._blocks.get(key)
        delta = block.nbytes - (old.nbytes if old is not None else 0)
        if self._used + delta > self._capacity:
            raise CapacityExceeded(f"{self.name} tier: {block.nbytes} bytes do not fit "
                                   f"({self._used}/{self._capacity} used)")
        self._blocks[key] = block
        self._used += delta
        if old is not None:
            self._count(old.ns_id, -old.nbytes)
        self._count(block.ns_id, block.nbytes)
        if old is None:
            self.policy.insert(key)
        else:
            self.policy.touch(key)

    def delete(self, key: BlockKey) -> bool:
        return self.pop(key) is not None

    def pop(self, key: BlockKey, *, evicted: bool = False) -> Block | None:
        """Remove and return the block (``None`` if absent)."""
        block = self._blocks.pop(key, None)
        if block is not None:
            self._used -= block.nbytes
            self._count(block.ns_id, -block.nbytes)
            self.policy.remove(key, evicted=evicted)
        return block

    def _count(self, ns_id: bytes, delta: int) -> None:
        total = self._ns_used.get(ns_id, 0) + delta
        if total:
            self._ns_used[ns_id] = total
        else:
            self._ns_used.pop(ns_id, None)

    def ns_used_bytes(self, ns_ids: Iterable[bytes]) -> int:
        """Bytes held for these namespaces (ids); counted with ``used_bytes``, under the caller's lock."""
        return sum(self._ns_used.get(i, 0) for i in ns_ids)

    def keys(self) -> Iterator[BlockKey]:
        return iter(list(self._blocks))

    def victims(self, nbytes: int, protected: Callable[[BlockKey], bool]) -> list[BlockKey] | None:
        """Keys to evict so that ``nbytes`` more fit (the policy's order); ``None`` if impossible (also
        for a block bigger than the whole tier). Mutates nothing."""
        if nbytes > self._capacity:
            return None
        return self.policy.victims(nbytes - self.free_bytes(), lambda k: self._blocks[k].nbytes, protected)

    def evict(self, keys: list[BlockKey]) -> list[tuple[BlockKey, Block | None]]:
        return [(k, b) for k in keys if (b := self.pop(k, evicted=True)) is not None]

    def check(self) -> list[str]:
        problems = []
        real = sum(b.nbytes for b in self._blocks.values())
        if real != self._used:
            problems.append(f"{self.name}: used_bytes {self._used} != sum of blocks {real}")
        if self._used > self._capacity:
            problems.append(f"{self.name}: over capacity")
        if len(self.policy) != len(self._blocks):
            problems.append(f"{self.name}: policy tracks {len(self.policy)} keys, tier holds {len(self._blocks)}")
        per_ns: dict[bytes, int] = {}
        for b in self._blocks.values():
            per_ns[b.ns_id] = per_ns.get(b.ns_id, 0) + b.nbytes
        if {i: n for i, n in self._ns_used.items() if n} != per_ns:
            problems.append(f"{self.name}: per-namespace byte counts disagree with its blocks")
        return problems

    def block_count(self) -> int:
        return len(self._blocks)

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._used
