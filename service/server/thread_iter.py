"""ThreadedIterator: consume a blocking generator from asyncio without blocking the event loop.

May import the standard library only.

``TieredStore.iter_blocks`` is a plain generator that waits on disk reads and holds a lease until its
``finally`` runs. Each step runs on a worker thread via ``asyncio.to_thread``; :meth:`aclose` closes
the generator on a worker thread too, *after* any step still running there (a lock orders them, since
a generator cannot be closed while it executes), and shielded from cancellation, so a cancelled RPC
still releases the lease.

An async generator that is cancelled while suspended at a ``yield`` (gRPC cancels a streaming
handler's task while it waits to write) never runs its ``finally`` until it is garbage-collected,
which may be much later. :meth:`close_soon` covers that case: register it as the RPC's done callback.

With ``close_inline``, :meth:`aclose` closes the generator on the event loop itself when no step is
running (the usual case: the caller awaits each step), saving a thread hand-off; only for generators
whose ``finally`` is quick (``iter_blocks``: it cancels futures and releases a lease).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Generator
from typing import Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")
_END = object()


class ThreadedIterator(Generic[T, U]):
    """Async iteration over ``gen``, each item mapped by ``convert`` on the same worker thread.

    :param gen: the blocking generator; this object owns it and closes it.
    :param convert: applied to every item off the loop (e.g. device → host copies), optional.
    :param close_inline: close on the loop thread when no step runs (for a generator whose
        ``finally`` never blocks; module docstring).

    Create it inside a running event loop.

    Use as ``async with ThreadedIterator(gen) as it: async for item in it: ...``.
    """

    def __init__(self, gen: Generator[T, None, None], convert: Callable[[T], U] | None = None, *,
                 close_inline: bool = False) -> None:
        self._gen = gen
        self._convert = convert
        self._close_inline = close_inline
        self._lock = threading.Lock()
        self._closed = False
        self._loop = asyncio.get_running_loop()

    def _step(self):
        with self._lock:
            if self._closed:
                return _END
            item = next(self._gen, _END)
            if item is _END or self._convert is None:
                return item
            return self._convert(item)

    def _close(self) -> None:
        with self._lock:
            self._closed = True
            self._gen.close()

    def __aiter__(self) -> "ThreadedIterator[T, U]":
        return self

    async def __anext__(self) -> U:
        item = await asyncio.to_thread(self._step)
        if item is _END:
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        """Close the generator (runs its ``finally``); idempotent, completes even if cancelled."""
        if self._close_inline and self._lock.acquire(blocking=False):
            try:  # no step is running: nothing to wait for, and nothing here can be cancelled
                self._closed = True
                self._gen.close()
            finally:
                self._lock.release()
            return
        await asyncio.shield(asyncio.to_thread(self._close))

    def close_soon(self, *_args) -> None:
        """Close the generator on a worker thread without waiting; callable from any thread.

        Meant as a gRPC done callback (``context.add_done_callback(it.close_soon)``), so the
        generator's ``finally`` runs as soon as the RPC ends, however the handler was left.
        """
        if self._closed:  # the usual end (aclose ran); a stale read at worst schedules an idempotent close
            return
        self._loop.call_soon_threadsafe(self._loop.run_in_executor, None, self._close)

    async def __aenter__(self) -> "ThreadedIterator[T, U]":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
