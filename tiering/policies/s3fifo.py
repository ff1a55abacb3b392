"""S3-FIFO (Yang et al., SOSP'23): a small probationary FIFO, a main FIFO and a ghost FIFO.
Imports ``base`` only.

New keys enter the small queue (10% of the keys). A key leaving the small queue that was read at
least once since it entered moves to main; one that was never read is a one-hit wonder and becomes a
victim (its id is remembered in the ghost queue). A key whose ghost is still remembered is inserted
straight into main. Main is a FIFO with a 2-bit frequency counter: a key at its head that was read is
reinserted at the tail with its counter decremented (a "second chance"), so frequently read blocks
survive scans — exactly the pattern of long chat sessions next to one-off prompts.

:meth:`order` simulates that process without mutating anything, which keeps eviction transactional.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator

from .base import EvictionPolicy

_MAX_FREQ = 3


class S3FIFOPolicy(EvictionPolicy):
    """Scan-resistant, frequency-aware FIFO eviction.

    :param small_ratio: share of keys kept in the probationary queue.
    :param ghost_size: how many evicted one-hit keys are remembered.
    """

    name = "s3fifo"

    def __init__(self, small_ratio: float = 0.1, ghost_size: int = 4096) -> None:
        self.small_ratio = small_ratio
        self.ghost_size = ghost_size
        self._small: OrderedDict[Hashable, None] = OrderedDict()
        self._main: OrderedDict[Hashable, None] = OrderedDict()
        self._ghost: OrderedDict[Hashable, None] = OrderedDict()
        self._freq: dict[Hashable, int] = {}

    def insert(self, key: Hashable) -> None:
        if key in self._freq:
            self.touch(key)
            return
        self._freq[key] = 0
        if self._ghost.pop(key, 0) is None:
            self._main[key] = None
        else:
            self._small[key] = None

    def touch(self, key: Hashable) -> None:
        if key in self._freq:
            self._freq[key] = min(self._freq[key] + 1, _MAX_FREQ)

    def remove(self, key: Hashable, *, evicted: bool = False) -> None:
        if key not in self._freq:
            return
        if evicted:
            self._pass_over(key)
        freq = self._freq.pop(key)
        if key in self._small:
            del self._small[key]
            if freq == 0 and evicted:
                # A one-hit wonder leaving the probationary queue: remember it, so a quick return
                # goes straight to main.
                self._ghost[key] = None
                while len(self._ghost) > self.ghost_size:
                    self._ghost.popitem(last=False)
        else:
            self._main.pop(key, None)

    def _pass_over(self, victim: Hashable) -> None:
        """Commit the moves S3-FIFO makes on its way to ``victim``: keys read while waiting ahead of
        it in the small queue move to main (counter reset); keys read ahead of it in main get their
        second chance (back to the tail, counter decremented)."""
        queue = self._small if victim in self._small else self._main
        for k in list(queue):
            if k == victim:
                break
            if self._freq[k] > 0:
                if queue is self._small:
                    del self._small[k]
                    self._freq[k] = 0
                    self._main[k] = None
                else:
                    self._freq[k] -= 1
                    self._main.move_to_end(k)

    def order(self) -> list[Hashable]:
        """Simulate evictions until every key has been chosen once; least valuable first."""
        return list(self.iter_order())

    def iter_order(self) -> Iterator[Hashable]:
        """:meth:`order` lazily: the queues are read in place and only the simulated changes (keys
        moved to main's tail, counters spent) are kept aside, so the first victims cost O(victims)."""
        n_small, n_main = len(self._small), len(self._main)
        small_it, main_it = iter(self._small), iter(self._main)
        extra: list[Hashable] = []  # keys the simulation appended to main's tail
        spent: dict[Hashable, int] = {}  # simulated counters, where they differ from self._freq
        total = len(self._freq)
        emitted = si = mi = ei = rounds = 0
        target_small = max(1, int(total * self.small_ratio))
        while emitted < total:
            rounds += 1
            main_left = (n_main - mi) + (len(extra) - ei)
            if si < n_small and (n_small - si > target_small or main_left == 0):
                key = next(small_it)
                si += 1
                if spent.get(key, self._freq[key]) > 0:
                    spent[key] = 0
                    extra.append(key)  # promoted to main on its way out of the small queue
                else:
                    emitted += 1
                    yield key
            elif main_left:
                if mi < n_main:
                    key = next(main_it)
                    mi += 1
                else:
                    key = extra[ei]
                    ei += 1
                freq = spent.get(key, self._freq[key])
                if freq > 0 and rounds <= 4 * total + 8:
                    spent[key] = freq - 1
                    extra.append(key)  # second chance
                else:
                    emitted += 1
                    yield key
            else:  # pragma: no cover - both queues drained means every key was emitted
                return

    def __len__(self) -> int:
        return len(self._freq)
