"""Maintenance: the background thread that sweeps expired leases and, every tenth pass, expired sessions.

Imports ``leases`` and ``errors`` only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .errors import TierUnavailable
from .leases import LeaseTable

log = logging.getLogger(__name__)


class Maintenance:
    """Starts at once; :meth:`stop` ends it. A pass that fails is logged and the next one runs;
    :class:`TierUnavailable` (the store closing under it) ends the thread.

    :param expire: deletes expired sessions, returning how many. :param period_s: seconds between passes.
    """

    def __init__(self, leases: LeaseTable, expire: Callable[[], int], period_s: float) -> None:
        self._leases = leases
        self._expire = expire
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvtier-maintenance", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        last_ttl = 0.0
        while not self._stop.wait(self._period_s):
            try:
                self._leases.sweep()
                if time.monotonic() - last_ttl > 10 * self._period_s:
                    last_ttl = time.monotonic()
                    if self._expire():
                        log.info("expired sessions removed")
            except TierUnavailable:
                return
            except Exception:  # the sweeper must outlive any single failure
                log.exception("maintenance pass failed")
