"""Eviction policies, one per file: :func:`make_policy` builds a memory tier's by name; the cold tier's
is :class:`OldestWrittenPolicy`; the store wraps each memory tier's in a :class:`PriorityPolicy`
(session priorities). Imports the policy modules only."""

from __future__ import annotations

from .base import EvictionPolicy
from .lru import LRUPolicy
from .oldest_written import OldestWrittenPolicy
from .priority import Priorities, PriorityPolicy
from .s3fifo import S3FIFOPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "s3fifo": S3FIFOPolicy}


def make_policy(name: str) -> EvictionPolicy:
    """A new policy instance by name (``lru`` or ``s3fifo``).

    :raises ValueError: on an unknown name.
    """
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {', '.join(POLICIES)}") from None


__all__ = ["EvictionPolicy", "LRUPolicy", "OldestWrittenPolicy", "Priorities", "PriorityPolicy", "S3FIFOPolicy",
           "POLICIES", "make_policy"]
