"""Keep freed block buffers mapped for reuse (glibc ``mallopt``), so block copies do not page-fault.

Every block the server keeps is a fresh 0.3–8 MiB buffer. glibc serves such sizes with ``mmap`` and
returns them with ``munmap``, so each new block faults in fresh pages: measured here, ~1 ms per 2 MiB
block kept (about 2 µs per 4 KiB page in a virtualised sandbox) against ~0.2 ms once the memory is
recycled. Raising the mmap threshold puts blocks on the heap, and raising the trim threshold keeps
freed heap pages mapped, so evicted or demoted blocks' memory serves the next puts without faults.

The cost: the process keeps up to ``trim_threshold`` of freed memory instead of returning it to the
kernel. For a cache that holds a warm tier of fixed capacity that is the point. Only the server process
calls this (``kvtier serve``); the engine as a library leaves the host process's allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30, arena_max: int = 2) -> bool:
    """Apply the thresholds through glibc's ``mallopt``.

    :param mmap_threshold: allocations below this come from the heap (glibc caps it at 32 MiB on
        64-bit systems).
    :param trim_threshold: free heap memory kept mapped before glibc returns it to the kernel.
    :param arena_max: malloc arenas at most. glibc gives threads arenas of their own (up to 8 per
        core); with freed memory kept, each arena keeps its own peak, so the server's RSS would step
        up by a block buffer or more every time a thread of the pools first handles a large request
        (seen here: one-time +17 MiB steps at random moments). Few arenas share what is kept; the
        large block allocations are rare next to the copies, so their lock is not contended.
    :returns: False where there is no glibc ``mallopt`` (musl, macOS) or it refused; nothing changes then.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("no glibc mallopt here: allocator left as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all(bool(mallopt(opt, int(value))) for opt, value in ((_M_MMAP_THRESHOLD, mmap_threshold),
                                                               (_M_TRIM_THRESHOLD, trim_threshold),
                                                               (_M_ARENA_MAX, arena_max)))
    log.debug("mallopt mmap_threshold=%d trim_threshold=%d arena_max=%d: %s", mmap_threshold, trim_threshold,
              arena_max, ok)
    return ok
