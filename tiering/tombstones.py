"""Tombstones: an erased block is never put back into memory by a read that began before the erase.
Imports the standard library only.

An erase (``delete_session(erase_blocks=True)``, ``invalidate``) deletes from the memory tiers under
the store's lock, then from LMDB outside it. A read running meanwhile may already hold the block (found
in warm, about to promote it to hot) or load it from disk before the disk delete; without a check its
promotion would put the erased bytes back into memory, defeating a privacy erase or an invalidation.

So an erase marks what it erases (block keys, or namespace ids for an invalidation) for as long as it
runs, and with the generation at which it finished afterwards. Every read takes the generation it began
at; a promotion is refused when a mark is newer than its read, or still running. A mark is dropped as
soon as no read older than it is left. A read still returns what it found (it began before the erase);
only the cache forgets it.

Not thread-safe: the store calls every method under its lock.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable


class Tombstones:
    """Marks of erases in progress or recently finished, and the generations of the reads in flight."""

    def __init__(self) -> None:
        self._gen = 0
        self._marks: dict[Hashable, float] = {}  # name -> generation the erase finished at (inf: running)
        self._running: Counter[Hashable] = Counter()  # erases in progress per name
        self._reads: Counter[int] = Counter()  # generation a read began at -> reads in flight

    def begin_read(self) -> int:
        """A read begins: its generation (give it back to :meth:`end_read`)."""
        self._reads[self._gen] += 1
        return self._gen

    def end_read(self, since: int) -> None:
        self._reads[since] -= 1
        if not self._reads[since]:
            del self._reads[since]
        if self._marks:
            self._purge()

    def begin_erase(self, names: Iterable[Hashable]) -> None:
        """``names`` (block keys or namespace ids) are being erased: no read may put them back."""
        for name in names:
            self._running[name] += 1
            self._marks[name] = math.inf

    def end_erase(self, names: Iterable[Hashable]) -> None:
        """The erase of ``names`` is done everywhere: reads that began before it still may not."""
        self._gen += 1
        for name in names:
            self._running[name] -= 1
            if self._running[name] <= 0:
                del self._running[name]
                self._marks[name] = self._gen
        self._purge()

    def refuses(self, since: int | None, *names: Hashable) -> bool:
        """Whether a read that began at ``since`` (``None``: not a read, e.g. a put) must not put a block
        known by ``names`` into memory."""
        return since is not None and bool(self._marks) and any(self._marks.get(n, -1) > since for n in names)

    def _purge(self) -> None:
        oldest = min(self._reads, default=math.inf)
        for name in [n for n, gen in self._marks.items() if gen <= oldest and n not in self._running]:
            del self._marks[name]

    def __len__(self) -> int:
        return len(self._marks)
