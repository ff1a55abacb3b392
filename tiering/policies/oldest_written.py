"""Oldest-written first: the cold tier's eviction policy. Imports only ``policies.base``.

Stateless: the order is the cold tier's own write-order index (``order`` in LMDB), read inside the
caller's transaction, so the choice and the deletion see the same data.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable

from .base import pick


class OldestWrittenPolicy:
    """Picks the oldest-written unprotected keys. A block written again moves to the end of the order."""

    name = "oldest_written"

    def victims(self, need: int, order: Iterable[Hashable], size_of: Callable[[Hashable], int],
                protected: Callable[[Hashable], bool]) -> list[Hashable] | None:
        """The first unprotected keys of ``order`` (oldest first) whose sizes add up to ``need`` bytes.

        :returns: ``[]`` when ``need <= 0``; ``None`` when they cannot free enough. Mutates nothing.
        """
        return pick(order, need, size_of, protected)
