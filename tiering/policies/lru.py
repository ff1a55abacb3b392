"""LRU: evicts the least recently inserted-or-read key first.
Imports ``base`` only."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator

from .base import EvictionPolicy


class LRUPolicy(EvictionPolicy):
    """Least recently used first. O(1) insert/touch/remove."""

    name = "lru"

    def __init__(self) -> None:
        self._keys: OrderedDict[Hashable, None] = OrderedDict()

    def insert(self, key: Hashable) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)

    def touch(self, key: Hashable) -> None:
        if key in self._keys:
            self._keys.move_to_end(key)

    def remove(self, key: Hashable, *, evicted: bool = False) -> None:
        self._keys.pop(key, None)

    def order(self) -> list[Hashable]:
        return list(self._keys)

    def iter_order(self) -> Iterator[Hashable]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
