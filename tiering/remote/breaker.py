"""CircuitBreaker: stops asking the remote tier while it fails or is slower than its budget.

closed → (``failures`` consecutive failed or slow operations) → open → (``cooldown_s``) → half-open:
one probe passes; its success closes, its failure opens again. State changes are logged at WARNING,
at most one line per ``log_interval_s`` (suppressed changes are counted in the next line).
Imports only the standard library.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("kvtier.tiering.remote")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class CircuitBreaker:
    """Thread-safe. ``allow()`` before an operation; ``record(ok)`` after every allowed one.

    :param failures: consecutive failures that open the breaker.
    :param cooldown_s: time the breaker stays open before a probe.
    :param clock: monotonic clock (tests may pass another).
    """

    def __init__(self, failures: int, cooldown_s: float, *, log_interval_s: float = 10.0,
                 clock=time.monotonic) -> None:
        self._failures = failures
        self._cooldown = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._streak = 0
        self._open_until = 0.0
        self._probing = False
        self._log_interval = log_interval_s
        self._last_log = -1e18
        self._suppressed = 0
        self.opened = 0  # times the breaker opened

    @property
    def state(self) -> str:
        with self._lock:
            return self._state

    def allow(self) -> bool:
        """Whether an operation may go to the remote tier now (a half-open breaker lets one probe pass)."""
        with self._lock:
            if self._state == CLOSED:
                return True
            if self._state == OPEN and self._clock() >= self._open_until:
                self._change(HALF_OPEN, "cool-down over, probing")
            if self._state == HALF_OPEN and not self._probing:
                self._probing = True
                return True
            return False

    def record(self, ok: bool, reason: str = "") -> None:
        """Outcome of an allowed operation: ``ok=False`` for a failure or an operation over its budget."""
        with self._lock:
            if ok:
                self._streak = 0
                self._probing = False
                if self._state != CLOSED:
                    self._change(CLOSED, "remote tier answering again")
                return
            self._streak += 1
            was_probe, self._probing = self._probing, False
            if was_probe or (self._state == CLOSED and self._streak >= self._failures):
                self._open_until = self._clock() + self._cooldown
                self.opened += 1
                self._change(OPEN, f"{self._streak} consecutive failures, last: {reason or 'unknown'}")

    def _change(self, state: str, why: str) -> None:
        old, self._state = self._state, state
        now = self._clock()
        if now - self._last_log < self._log_interval:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} earlier changes not logged)" if self._suppressed else ""
        log.warning("remote tier breaker %s -> %s: %s%s", old, state, why, more)
        self._last_log, self._suppressed = now, 0
