"""BenchContext: what every scenario gets (mode, folders, progress), and the timing helpers they share.

Three sizes of run: *full* (about 20 minutes, every size), *quick* (a few minutes on 2 cores, CI's
smoke run) and *tiny* (seconds per scenario, a random toy model instead of SmolLM2; the test suite
uses it to walk every code path). Timings are wall-clock ``perf_counter`` per operation; throughput
is bytes moved divided by the summed operation times, so it is what one caller doing one operation
after another would see.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20


@dataclass
class BenchContext:
    """Mode and shared state of one bench run. Not thread-safe (scenarios run one after another).

    :ivar out: results folder. :ivar workdir: scratch space (data dirs, server logs).
    :ivar quick: quick mode. :ivar tiny: toy sizes (implies quick).
    :ivar shared: values one scenario leaves for another (the loaded model, its KV).
    """

    out: Path
    workdir: Path
    quick: bool = False
    tiny: bool = False
    on_step: Callable[[str], None] = lambda text: None
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return "tiny" if self.tiny else "quick" if self.quick else "full"

    def step(self, text: str) -> None:
        """Report progress: what the scenario is doing now."""
        self.on_step(text)

    def byte_budget(self) -> int:
        """Bytes each throughput measurement should move (more in full mode for steadier numbers)."""
        return 4 * MiB if self.tiny else 48 * MiB if self.quick else 256 * MiB

    def iterations(self, block_bytes: int, *, lo: int = 5, hi: int = 400) -> int:
        """Operations to time for blocks of ``block_bytes``: the byte budget, clamped to [lo, hi]."""
        if self.tiny:
            lo = min(lo, 3)
        return max(lo, min(hi, self.byte_budget() // max(block_bytes, 1)))


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(latencies_s: list[float], bytes_per_op: int) -> dict[str, float]:
    """``n``, ``gbps`` (10^9 bytes/s over the summed op times), ``p50_ms``, ``p99_ms``, ``mean_ms``."""
    total = sum(latencies_s)
    return {"n": len(latencies_s),
            "gbps": (bytes_per_op * len(latencies_s) / total / 1e9) if total > 0 else float("nan"),
            "p50_ms": percentile(latencies_s, 50) * 1e3,
            "p99_ms": percentile(latencies_s, 99) * 1e3,
            "mean_ms": statistics.fmean(latencies_s) * 1e3 if latencies_s else float("nan")}


def time_ops(fn: Callable[[int], Any], n: int, *, warmup: int = 1) -> list[float]:
    """Call ``fn(i)`` ``warmup`` times untimed, then ``n`` times; returns each call's seconds."""
    for i in range(warmup):
        fn(i)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(warmup + i)
        out.append(time.perf_counter() - t0)
    return out


def ratio(num: float | None, den: float | None) -> float | None:
    """``num / den``, or ``None`` when either is missing or the denominator is not positive."""
    if num is None or den is None or den <= 0 or num != num or den != den:
        return None
    return num / den
