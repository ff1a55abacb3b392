"""PriorityPolicy: any policy's order, with the blocks of higher-priority sessions taken last; and
Priorities, the table it reads. Imports ``base`` only.

A session's ``priority`` (an int, 0 by default) is given to every block its chain names; a block named
by several sessions has the highest of their priorities. Victims are taken from the lowest priority
first and, within one priority, in the wrapped policy's order (LRU, S3-FIFO). Pinned blocks are still
never victims. Only non-zero priorities are stored, so for the common case (every session at 0) the
walk is the wrapped policy's own lazy walk.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator

from .base import EvictionPolicy


class Priorities:
    """Block key → priority (0 when absent). Not thread-safe: the store's lock guards it."""

    def __init__(self) -> None:
        self._of: dict[Hashable, int] = {}

    def raise_to(self, keys: Iterable[Hashable], priority: int) -> None:
        """Give ``keys`` at least ``priority`` (a session naming them was stored with it)."""
        if priority == 0:
            return
        for k in keys:
            old = self._of.get(k)
            if old is None or priority > old:
                self._of[k] = priority

    def forget(self, keys: Iterable[Hashable]) -> None:
        """The blocks were erased: they start again at 0 if stored again."""
        for k in keys:
            self._of.pop(k, None)

    def of(self, key: Hashable) -> int:
        return self._of.get(key, 0)

    def any_negative(self) -> bool:
        return any(p < 0 for p in self._of.values())


class PriorityPolicy(EvictionPolicy):
    """``inner``'s order, lowest priority first (see the module docstring).

    :param inner: the policy that orders keys within one priority (it receives every call).
    :param priorities: the table of block priorities.
    """

    def __init__(self, inner: EvictionPolicy, priorities: Priorities) -> None:
        self.inner = inner
        self.priorities = priorities
        self.name = inner.name

    def insert(self, key: Hashable) -> None:
        self.inner.insert(key)

    def touch(self, key: Hashable) -> None:
        self.inner.touch(key)

    def remove(self, key: Hashable, *, evicted: bool = False) -> None:
        self.inner.remove(key, evicted=evicted)

    def order(self) -> list[Hashable]:
        return list(self.iter_order())

    def iter_order(self) -> Iterator[Hashable]:
        of = self.priorities.of
        if self.priorities.any_negative():
            yield from sorted(self.inner.iter_order(), key=of)  # stable: inner order within a priority
            return
        later: list[Hashable] = []
        for key in self.inner.iter_order():  # priority 0 in the inner order, lazily; the others after
            if of(key) == 0:
                yield key
            else:
                later.append(key)
        yield from sorted(later, key=of)

    def __len__(self) -> int:
        return len(self.inner)
