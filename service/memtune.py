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


def tune_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Apply the thresholds through glibc's ``mallopt``.

    :param mmap_threshold: allocations below this come from the heap (glibc caps it at 32 MiB on
        64-bit systems).
    :param trim_threshold: free heap memory kept mapped before glibc returns it to the kernel.
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
    ok = bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
    log.debug("mallopt mmap_threshold=%d trim_threshold=%d: %s", mmap_threshold, trim_threshold, ok)
    return ok
