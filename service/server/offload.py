"""Where a handler's blocking step runs: on a worker thread (``asyncio.to_thread``), or in place for a call
known to touch host memory only. May import the standard library only.

Handlers write ``await offload.run(fn, *args)`` where they would write ``await asyncio.to_thread(fn, *args)``.
Inside :func:`inline` (a context variable: it holds for the current task only) the same steps run in
place on the event loop, sparing the two thread hand-offs (~0.2 ms each on a busy 2-core host) that
otherwise dominate a small call. ``service/server/shm_control.py`` uses it for a ``GetShm`` of a few
blocks that all sit in host-memory tiers, where the work is a copy and a checksum of at most a few MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_INLINE: contextvars.ContextVar[bool] = contextvars.ContextVar("kvtier_offload_inline", default=False)


async def run(fn: Callable[..., T], *args) -> T:
    """``fn(*args)`` on a worker thread, or in place inside :func:`inline`."""
    if _INLINE.get():
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


@contextlib.contextmanager
def inline():
    """Run this task's :func:`run` steps in place until the ``with`` block ends."""
    token = _INLINE.set(True)
    try:
        yield
    finally:
        _INLINE.reset(token)
