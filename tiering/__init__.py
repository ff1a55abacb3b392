"""kvtier's engine: a tiered KV block store (GPU → pinned host → zstd/LMDB), usable without gRPC.

Start with :class:`~tiering.store.TieredStore` and :class:`~tiering.config.StoreConfig`; blocks are
named by :func:`~tiering.keys.chain_keys` under a :class:`~tiering.keys.Namespace`.
"""

from .config import StoreConfig
from .errors import (BlockNotFound, CapacityExceeded, InvalidBlock, KVTierError, LayoutMismatch,
                     SessionNotFound, TierUnavailable)
from .keys import BlockKey, Namespace, chain_keys
from .layout import BlockLayout
from .store import LookupResult, PrefetchHandle, PutResult, TieredStore

__all__ = ["BlockKey", "BlockLayout", "BlockNotFound", "CapacityExceeded", "InvalidBlock", "KVTierError",
           "LayoutMismatch", "LookupResult", "Namespace", "PrefetchHandle", "PutResult", "SessionNotFound",
           "StoreConfig", "TierUnavailable", "TieredStore", "chain_keys"]
