"""The cold tier, split by job: ``schema`` (databases, structs, u64 helpers), ``records`` (block
records), ``registry`` (sessions and namespaces), ``footprint`` (accounting and checks), ``opening``
(checks at open: an empty or truncated file, the keys), ``verify`` (the verification walk), ``tier``
(:class:`ColdTier`, the Tier over them). Importing this package imports lmdb.
"""

from __future__ import annotations

from .footprint import FILL_RATIO, INDEX_OVERHEAD, KEY_OVERHEAD, RESERVED_BYTES
from .records import ColdWrite
from .tier import ColdTier

__all__ = ["FILL_RATIO", "INDEX_OVERHEAD", "KEY_OVERHEAD", "RESERVED_BYTES", "ColdTier", "ColdWrite"]
