"""AsyncWriter: the remote tier's bounded write queue and its one writer thread.

Callers ``submit`` without blocking (a full queue refuses); the thread takes batches of up to
``batch_bytes`` in FIFO order and hands each to ``process`` (which groups per node, retries and
counts). One thread keeps order: a session record queued after its blocks is written after them.
Imports only the standard library.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

log = logging.getLogger("kvtier.tiering.remote")


@dataclass(slots=True)
class QueuedWrite:
    """One queued write: ``ident`` names it (a BlockKey, or ``("session", sid)``), ``payload`` is the tier's."""

    ident: object
    nbytes: int
    payload: tuple
    queued_at: float = field(default_factory=time.monotonic)


class AsyncWriter:
    """Thread-safe. ``max_bytes`` bounds queued plus in-progress bytes.

    :param process: called on the writer thread with each batch; exceptions are logged and the batch dropped.
    """

    def __init__(self, process: Callable[[list[QueuedWrite]], None], max_bytes: int, batch_bytes: int) -> None:
        self._process = process
        self._max = max_bytes
        self._batch = batch_bytes
        self._cv = threading.Condition()
        self._items: deque[QueuedWrite] = deque()
        self._bytes = 0
        self._busy = threading.Lock()
        self._running = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kvtier-remote-writer", daemon=True)
        self._thread.start()

    @property
    def inflight_bytes(self) -> int:
        with self._cv:
            return self._bytes

    def submit(self, item: QueuedWrite) -> bool:
        """Queue ``item``; ``False`` (nothing queued) when closed or over the byte cap."""
        with self._cv:
            if self._closed or self._bytes + item.nbytes > self._max:
                return False
            self._items.append(item)
            self._bytes += item.nbytes
            self._cv.notify_all()
            return True

    def discard(self, idents: set) -> int:
        """Remove queued (not yet running) writes of ``idents``; how many were removed."""
        with self._cv:
            keep = [i for i in self._items if i.ident not in idents]
            gone = len(self._items) - len(keep)
            self._bytes -= sum(i.nbytes for i in self._items if i.ident in idents)
            self._items = deque(keep)
            self._cv.notify_all()
            return gone

    @contextmanager
    def quiesced(self) -> Iterator[None]:
        """No batch is being written inside this block (it waits for a running one to finish)."""
        with self._busy:
            yield

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued has been processed; whether it was, within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._items or self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
            return True

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._items and not self._closed:
                    self._cv.wait()
                if not self._items:
                    return
                batch, size = [], 0
                while self._items and (not batch or size + self._items[0].nbytes <= self._batch):
                    item = self._items.popleft()
                    batch.append(item)
                    size += item.nbytes
                self._running = True
            try:
                with self._busy:
                    self._process(batch)
            except Exception:  # the thread must survive anything a batch does
                log.exception("remote tier writer: a batch failed and was dropped")
            finally:
                with self._cv:
                    self._bytes -= size
                    self._running = False
                    self._cv.notify_all()

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, write what is queued (up to ``timeout``), stop the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)
