"""The shared-memory arena: one sealed memfd mapped by the server and by one client, and its slots.

Primitives:

* :func:`create_memfd` makes an anonymous, close-on-exec memory file of a fixed size and seals its
  size (``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``), so the client holding the other end can never
  truncate it under the server's mapping (which would raise SIGBUS in the server). It has no name
  in ``/dev/shm`` or anywhere else: the only ways in are the fd itself and ``/proc/<pid>/fd`` of a
  process holding it, which only that process's uid (and root) may open.
* :class:`Arena` maps such a file (keeping no fd) and hands out byte views of it. Its lifetime is
  reference counted: views keep the mapping alive, so dropping the arena while a worker thread
  still copies from it can never unmap memory under that thread.
* :class:`SlotAllocator` leases ranges of the arena (first fit over a sorted free list, aligned);
  the client runs it (it owns the arena's space and names ranges in its calls). ``alloc`` and
  ``alloc_upto`` either give a slot or ``None`` and then change nothing; ``free`` merges neighbours.
  Thread-safe.
"""

from __future__ import annotations

import bisect
import fcntl
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch

#: Every slot starts on a multiple of this (a cache line is enough; a page keeps copies page aligned).
ALIGNMENT = 4096


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    """``n`` rounded up to a multiple of ``alignment`` (at least one ``alignment``)."""
    return max(-(-n // alignment) * alignment, alignment)


def create_memfd(size: int, name: str = "kvtier-arena") -> int:
    """A close-on-exec memfd of exactly ``size`` bytes whose size can never change again.

    :returns: the fd (the caller owns it).
    :raises OSError: if the kernel has no memfd or sealing (Linux < 3.17) or memory is short.
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True, slots=True)
class Slot:
    """``length`` bytes at ``offset`` of an arena (``capacity``: the aligned bytes actually reserved)."""

    offset: int
    length: int
    capacity: int


#: Bytes touched per step of :meth:`Arena.prefault` (the GIL is free during each step's numpy read).
PREFAULT_STEP = 8 << 20
#: One prefault pass at a time in a process: many arenas opening at once (32 clients) are touched one
#: after another instead of all competing for the CPUs and memory bandwidth their calls need.
_PREFAULT_LOCK = threading.Lock()


class Arena:
    """A mapping of an arena fd, shared read/write.

    :param fd: the memfd (not closed here: the caller decides when to close its fd).
    :param size: bytes to map.

    ``array`` (``numpy.uint8``) and ``tensor`` (``torch.uint8``) cover the whole arena; both keep the
    mapping alive while they (or views of them) exist.
    """

    def __init__(self, fd: int, size: int) -> None:
        self.size = int(size)
        # Not mmap.mmap: it keeps a dup of the fd for its whole life (a way in through /proc/<pid>/fd).
        # torch's shared file mapping opens the file, maps it and closes its fd at once.
        storage = torch.UntypedStorage.from_file(f"/proc/self/fd/{fd}", shared=True, nbytes=self.size)
        self.tensor = torch.empty(0, dtype=torch.uint8).set_(storage)
        self.array = self.tensor.numpy()

    def prefault(self, stop: threading.Event | None = None) -> None:
        """Read one byte of every page (until ``stop`` is set): the shared memory's pages are allocated
        and this mapping's page tables filled now, not by the first copy into each range (a fault per
        4 KiB costs about as much as the copy itself). Reads only: safe while calls use the arena. One pass
        at a time per process (:data:`_PREFAULT_LOCK`)."""
        with _PREFAULT_LOCK:
            for start in range(0, self.size, PREFAULT_STEP):
                if stop is not None and stop.is_set():
                    return
                self.array[start:start + PREFAULT_STEP:4096].max()

    def prefault_in_background(self, stop: threading.Event | None = None) -> threading.Thread:
        """:meth:`prefault` on a daemon thread (it keeps the mapping alive until it ends)."""
        thread = threading.Thread(target=self.prefault, args=(stop,), name="kvtier-arena-prefault", daemon=True)
        thread.start()
        return thread

    def view(self, offset: int, length: int) -> np.ndarray:
        """``length`` bytes at ``offset`` as a uint8 array sharing the arena's memory.

        :raises ValueError: if the range is not inside the arena.
        """
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range [{offset}, {offset + length}) is outside the {self.size}-byte arena")
        return self.array[offset:offset + length]


class SlotAllocator:
    """Leases aligned ranges of ``size`` bytes. Thread-safe; every method is O(free ranges).

    :param size: bytes to manage (the arena's size).
    :param alignment: every offset is a multiple of it.
    """

    def __init__(self, size: int, alignment: int = ALIGNMENT) -> None:
        self.size = int(size)
        self.alignment = alignment
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = [(0, self.size)]  # (offset, length), sorted, never adjacent
        self.leased_bytes = 0
        self.leased_slots = 0

    def alloc(self, length: int) -> Slot | None:
        """A slot of ``length`` bytes, or ``None`` when no free range is big enough (nothing changed)."""
        need = align_up(length, self.alignment)
        with self._lock:
            for i, (off, free) in enumerate(self._free):
                if free >= need:
                    if free == need:
                        del self._free[i]
                    else:
                        self._free[i] = (off + need, free - need)
                    self.leased_bytes += need
                    self.leased_slots += 1
                    return Slot(off, length, need)
        return None

    def alloc_upto(self, need: int, want: int) -> Slot | None:
        """A slot of at least ``need`` and at most ``want`` bytes (``length`` = what it got), from the
        largest free range; ``None`` when no free range holds ``need`` bytes (nothing changed)."""
        a = self.alignment
        need = align_up(need, a)
        with self._lock:
            if not self._free:
                return None
            i = max(range(len(self._free)), key=lambda j: self._free[j][1])
            off, free = self._free[i]
            if free < need:
                return None
            take = min(free, max(need, want // a * a))
            if take == free:
                del self._free[i]
            else:
                self._free[i] = (off + take, free - take)
            self.leased_bytes += take
            self.leased_slots += 1
            return Slot(off, take, take)

    def free(self, slot: Slot) -> None:
        """Give ``slot`` back (merging it with free neighbours). Each slot must be freed once."""
        with self._lock:
            i = bisect.bisect(self._free, (slot.offset, 0))
            off, length = slot.offset, slot.capacity
            if i < len(self._free) and off + length == self._free[i][0]:
                length += self._free[i][1]
                del self._free[i]
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == off:
                off, length = self._free[i - 1][0], self._free[i - 1][1] + length
                del self._free[i - 1]
                i -= 1
            self._free.insert(i, (off, length))
            self.leased_bytes -= slot.capacity
            self.leased_slots -= 1

    def carve(self, region: Slot, kept: list[Slot]) -> None:
        """Free ``region`` except the aligned, disjoint ``kept`` slots inside it (each then freed on its
        own with :meth:`free`)."""
        pos, end = region.offset, region.offset + region.capacity
        gaps = []
        for slot in sorted(kept, key=lambda k: k.offset):
            if slot.offset > pos:
                gaps.append(Slot(pos, 0, slot.offset - pos))
            pos = slot.offset + slot.capacity
        if pos < end:
            gaps.append(Slot(pos, 0, end - pos))
        with self._lock:
            self.leased_slots += len(kept) + len(gaps) - 1  # the region becomes kept + gaps; gaps go now
        for gap in gaps:
            self.free(gap)

    def fits_ever(self, length: int) -> bool:
        """Whether a slot of ``length`` bytes fits an empty arena."""
        return align_up(length, self.alignment) <= self.size
