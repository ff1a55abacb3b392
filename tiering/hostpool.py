"""HostPool: host memory for warm-tier blocks, faulted in ahead of time and recycled when blocks die.
Imports numpy and the standard library only.

Fresh memory costs a page fault per 4 KiB the first time it is written: measured on the 2-core sandbox,
``np.empty`` + copy of a 2 MiB block took 1.3–1.6 ms where the copy into memory already touched took
0.05–0.3 ms (``MAP_POPULATE`` was no cheaper per page, and transparent huge pages in ``madvise`` mode
cost 10 ms per 2 MiB in direct compaction). A store that copied every put block into fresh memory paid
that fault cost inside the caller's Put. The pool moves it out of the call:

* memory comes in chunks (:data:`CHUNK_BYTES`, or one block when larger), carved front to back into
  regions of one size class each (the block's bytes rounded up to 4 KiB);
* a background thread keeps ``reserve`` bytes ready — spare chunks mapped with ``MAP_POPULATE`` (every
  page faulted in by the kernel before any take can see the chunk) plus recycled regions — so a put
  takes memory that costs no fault; it sleeps while the reserve is full;
* a region is handed out as its own ``uint8`` array (an *anchor*: its ``base`` is the chunk's mmap, so
  every numpy view and ``torch.from_numpy`` tensor of it keeps the anchor alive); when the anchor is
  garbage — the warm tier dropped the block and no reader holds a view — a ``weakref.finalize``
  queues the region on its size class's free list, and the next take of that size reuses it: the
  steady state of a full cache evicts and refills without a fault;
* the pool never holds more than ``limit`` bytes; past it (or for blocks under :data:`MIN_BYTES`)
  :meth:`take` falls back to ``np.empty``, so a pool that is full or off only costs the faults again.

Memory a chunk holds is never returned to the OS while the pool lives (as an up-front allocated cache
does); :meth:`stats` shows what it holds. Thread-safe.
"""

from __future__ import annotations

import collections
import mmap
import threading
import weakref

import numpy as np

PAGE = 4096
#: Bytes each chunk maps (a larger block gets a chunk of its own size).
CHUNK_BYTES = 64 << 20
#: Blocks smaller than this come from ``np.empty`` (malloc's own free lists serve them without faults).
MIN_BYTES = 64 << 10


def _size_class(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


class _Chunk:
    """One anonymous private mapping and how far it has been carved."""

    __slots__ = ("mm", "size", "carved")

    def __init__(self, size: int, populate: bool = False) -> None:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (mmap.MAP_POPULATE if populate else 0)
        self.mm = mmap.mmap(-1, size, flags=flags)  # MAP_POPULATE: every page faulted in by the kernel, now
        self.size = size
        self.carved = 0


class HostPool:
    """Size-classed, recycled, pre-faulted host memory (module docstring).

    :param limit: most bytes the pool maps (0: no pool, every take is ``np.empty``).
    :param reserve: bytes kept faulted in ahead of demand by the background thread (0: faults happen
        in :meth:`take`'s caller, but regions are still recycled).
    """

    def __init__(self, limit: int, reserve: int = 0) -> None:
        self.limit = max(int(limit), 0)
        self.reserve = min(max(int(reserve), 0), self.limit)
        self._lock = threading.Lock()
        self._chunks: list[_Chunk] = []  # carved from (the last one has room)
        self._spare: list[_Chunk] = []  # faulted in by the background thread, not carved yet
        self._mapped = 0
        self._free: dict[int, list[tuple[_Chunk, int]]] = collections.defaultdict(list)
        self._free_bytes = 0
        #: regions whose anchors died, not yet on their free lists (a finalizer may run inside any
        #: allocation, even one under ``_lock``: it only appends here, atomically)
        self._returned: collections.deque[tuple[_Chunk, int, int]] = collections.deque()
        self.counters = collections.Counter()
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        if self.reserve:
            self._thread = threading.Thread(target=self._fill, name="kvtier-hostpool", daemon=True)
            self._wake.set()  # fill the reserve from the start
            self._thread.start()

    @classmethod
    def for_warm(cls, warm, config) -> "HostPool":
        """The pool of a store whose warm tier is ``warm`` (``None``: none): up to its capacity plus the
        reserve (``config.warm_capacity``, ``config.warm_reserve``) and two chunks of slack; no pool
        (every take is ``np.empty``) without a warm tier or with page-locked warm buffers (CUDA), whose
        staging copies every block anyway."""
        if warm is None or getattr(warm, "pin_memory", False):
            return cls(0)
        return cls(config.warm_capacity + config.warm_reserve + 2 * CHUNK_BYTES, config.warm_reserve)

    # -- taking and giving back ------------------------------------------------------------------
    def take(self, nbytes: int) -> np.ndarray:
        """A writable, C-contiguous ``uint8`` array of ``nbytes``, from the pool when it can (its memory
        returns to the pool when the array and every view of it are garbage), else ``np.empty``."""
        if nbytes < MIN_BYTES or not self.limit:
            return np.empty(nbytes, dtype=np.uint8)
        size = _size_class(nbytes)
        with self._lock:
            self._drain_returned()
            free = self._free.get(size)
            if free:
                chunk, offset = free.pop()
                self._free_bytes -= size
                self.counters["recycled"] += 1
            else:
                found = self._carve(size)
                if found is None:
                    self.counters["fallbacks"] += 1
                    return np.empty(nbytes, dtype=np.uint8)
                chunk, offset = found
                self.counters["carved"] += 1
            if self.reserve and self._ready_bytes() < self.reserve // 2:
                self._wake.set()
        anchor = np.ndarray((nbytes,), dtype=np.uint8, buffer=chunk.mm, offset=offset)
        weakref.finalize(anchor, self._returned.append, (chunk, offset, size)).atexit = False
        return anchor

    def _drain_returned(self) -> None:
        while self._returned:
            chunk, offset, size = self._returned.popleft()
            self._free[size].append((chunk, offset))
            self._free_bytes += size

    def _carve(self, size: int) -> tuple[_Chunk, int] | None:
        """A never-used region of ``size``: from the current chunk, else a pre-faulted spare chunk,
        else a chunk mapped now (faulted in by whoever writes it). Under ``_lock``."""
        chunk = self._chunks[-1] if self._chunks else None
        if chunk is None or chunk.size - chunk.carved < size:
            if self._spare and self._spare[-1].size >= size:
                chunk = self._spare.pop()
            else:
                want = max(CHUNK_BYTES, size)
                if self._mapped + want > self.limit:
                    want = size
                    if self._mapped + want > self.limit:
                        return None
                chunk = _Chunk(want)
                self._mapped += want
            self._chunks.append(chunk)
        offset = chunk.carved
        chunk.carved += size
        return chunk, offset

    # -- the reserve -----------------------------------------------------------------------------
    def _ready_bytes(self) -> int:
        """Bytes a take can have without a fault: spare chunks and recycled regions. Under ``_lock``."""
        return sum(c.size for c in self._spare) + self._free_bytes

    def _fill(self) -> None:
        """Background thread: keep :attr:`reserve` bytes ready in pre-faulted spare chunks. A chunk is
        mapped and faulted in before any take can see it, so nothing is ever written under a caller."""
        while not self._closed:
            self._wake.wait(1.0)
            self._wake.clear()
            while not self._closed:
                with self._lock:
                    self._drain_returned()
                    if self._ready_bytes() >= self.reserve or self._mapped + CHUNK_BYTES > self.limit:
                        break
                    self._mapped += CHUNK_BYTES  # counted now, so takes meanwhile respect the limit
                try:
                    chunk = _Chunk(CHUNK_BYTES, populate=True)
                except OSError:
                    with self._lock:
                        self._mapped -= CHUNK_BYTES
                    break
                with self._lock:
                    self._spare.append(chunk)
                self.counters["prefaulted_bytes"] += CHUNK_BYTES

    def stats(self) -> dict[str, int]:
        """``pool_mapped_bytes`` (held from the OS), ``pool_free_bytes`` (recycled regions waiting),
        and counters: regions ``carved``, ``recycled``, takes that fell back to ``np.empty``
        (``fallbacks``), bytes faulted in ahead (``prefaulted_bytes``)."""
        with self._lock:
            self._drain_returned()
            out = {"pool_mapped_bytes": self._mapped, "pool_free_bytes": self._free_bytes}
        out.update({f"pool_{k}": v for k, v in self.counters.items()})
        return out

    def close(self) -> None:
        """Stop the background thread. Arrays handed out stay valid (their chunk lives with them)."""
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5.0)
