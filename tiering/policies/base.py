"""EvictionPolicy: orders the keys of one tier and proposes victims; it owns no bytes.
Imports the standard library only.

The tier calls :meth:`insert`, :meth:`touch` and :meth:`remove` as blocks come, are read and go, and
asks :meth:`victims` for candidates when it needs room. ``victims`` never mutates the policy: the
caller removes the chosen keys (through :meth:`remove`) only after it has committed to evicting them,
so a failed eviction leaves everything as it was.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Iterator


class EvictionPolicy(ABC):
    """Orders keys by value; not thread-safe (the owning store holds its lock around every call)."""

    name: str = "abstract"

    @abstractmethod
    def insert(self, key: Hashable) -> None:
        """A key entered the tier."""

    @abstractmethod
    def touch(self, key: Hashable) -> None:
        """A key already in the tier was read."""

    @abstractmethod
    def remove(self, key: Hashable, *, evicted: bool = False) -> None:
        """A key left the tier. ``evicted`` is True when it left as a victim this policy proposed
        (evicted or demoted), False when it was deleted. Unknown keys are ignored. Policies with lazy
        bookkeeping (S3-FIFO) apply it here, at commit, never in :meth:`victims`."""

    @abstractmethod
    def order(self) -> list[Hashable]:
        """Every key, least valuable first (the order victims are taken in)."""

    def iter_order(self) -> Iterator[Hashable]:
        """:meth:`order`, lazily: an eviction that needs a few victims must not cost a walk over every
        key of a large tier. Valid until the policy next changes."""
        return iter(self.order())

    def victims(self, need: int, size_of: Callable[[Hashable], int],
                protected: Callable[[Hashable], bool]) -> list[Hashable] | None:
        """Pick the least valuable unprotected keys whose sizes add up to at least ``need`` bytes.

        :returns: the victims, least valuable first; ``[]`` when ``need <= 0``; ``None`` when the
            unprotected keys cannot free enough (nothing changes in that case).
        """
        return pick(self.iter_order(), need, size_of, protected)


def pick(order: Iterable[Hashable], need: int, size_of: Callable[[Hashable], int],
         protected: Callable[[Hashable], bool]) -> list[Hashable] | None:
    """The first unprotected keys of ``order`` whose sizes add up to at least ``need`` bytes: the one
    victim walk every policy shares. ``[]`` when ``need <= 0``; ``None`` when they cannot free enough."""
    if need <= 0:
        return []
    chosen, freed = [], 0
    for key in order:
        if protected(key):
            continue
        chosen.append(key)
        freed += size_of(key)
        if freed >= need:
            return chosen
    return None
