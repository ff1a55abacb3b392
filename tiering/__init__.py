"""kvtier's engine: a tiered KV block store (GPU → pinned host → zstd/LMDB), usable without gRPC.

Start with :class:`~tiering.store.TieredStore` and :class:`~tiering.config.StoreConfig`; blocks are
named by :func:`~tiering.keys.chain_keys` under a :class:`~tiering.keys.Namespace`.

The names below are loaded lazily (PEP 562): importing the light vocabulary (``tiering.keys``,
``layout``, ``dtypes``, ``checksum``, ``errors``) never imports LMDB, zstd, the writer thread or the store.
"""

from __future__ import annotations

import importlib

#: public name → the submodule that defines it
_EXPORTS = {
    "StoreConfig": "config",
    "BlockNotFound": "errors", "CapacityExceeded": "errors", "InvalidBlock": "errors", "KVTierError": "errors",
    "LayoutMismatch": "errors", "SessionNotFound": "errors", "TierUnavailable": "errors",
    "BlockKey": "keys", "Namespace": "keys", "chain_keys": "keys",
    "BlockLayout": "layout",
    "LookupResult": "results", "PrefetchHandle": "results", "PutResult": "results",
    "TieredStore": "store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
