"""Values the store returns: what a put did, the cached prefix a lookup found, a running prefetch.
Imports ``keys`` only."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

from .keys import BlockKey


@dataclass(slots=True)
class PutResult:
    """What a put did. ``keys`` covers every block of the token ids, in prefix order."""

    keys: list[BlockKey]
    stored: list[BlockKey] = field(default_factory=list)
    skipped_present: list[BlockKey] = field(default_factory=list)
    skipped_not_admitted: list[BlockKey] = field(default_factory=list)


@dataclass(slots=True)
class LookupResult:
    """The longest cached prefix: ``tiers[i]`` is where block ``keys[i]`` is now; ``remote_tokens``
    of its ``tokens`` are held only by the shared (remote) tier, the rest locally; ``lossy[i]``: block
    ``i`` would be served approximate (a lossy namespace's block no memory tier holds exactly)."""

    keys: list[BlockKey]
    tiers: list[str]
    tokens: int
    remote_tokens: int = 0
    lossy: list[bool] = field(default_factory=list)

    @property
    def local_tokens(self) -> int:
        return self.tokens - self.remote_tokens

    @property
    def blocks(self) -> int:
        return len(self.tiers)


def resumed_prefix(tiers: list[str | None], lossy: list[bool], exact_only: bool) -> tuple[int, list[bool]]:
    """A resumed session's cached blocks (up to the first gone one, or with ``exact_only`` the first
    lossy one) and ``lossy`` (a lookup's flags, maybe shorter) padded to one flag per block."""
    lossy = list(lossy[:len(tiers)]) + [False] * (len(tiers) - len(lossy))
    cached = next((i for i, (t, lo) in enumerate(zip(tiers, lossy)) if t is None or (exact_only and lo)), len(tiers))
    return cached, lossy


@dataclass(slots=True)
class PrefetchHandle:
    """A running prefetch. ``future`` resolves to the number of blocks now in the top tier."""

    keys: list[BlockKey]
    future: Future
    lease: int
