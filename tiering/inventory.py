"""Inventory: where blocks are and whose they are, across the tier list — no data movement, no recency change.

Imports the tier list, keys, results and errors; the store composes it and answers lookup, where, owned
and usage questions through it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from .errors import InvalidBlock
from .keys import BlockKey, Namespace, chain_keys
from .results import LookupResult
from .tierlist import TierList


class Inventory:
    """Read-only questions over the tiers. Thread-safe: fast tiers are read under the store's lock,
    slow ones outside it (:meth:`TierList.walk <tiering.tierlist.TierList.walk>`).

    :param fleet: the store's :class:`~tiering.fleet.Fleet` (``found`` splits a lookup's remote tokens).
    :param namespaces: the store's :class:`~tiering.namespaces.NamespaceRegistry`.
    """

    def __init__(self, tiers: TierList, lock: threading.RLock, *, namespaces, fleet, tracer) -> None:
        self.tiers = tiers
        self.lock = lock
        self.namespaces = namespaces
        self.fleet = fleet
        self.tracer = tracer

    def where(self, keys: list[BlockKey]) -> list[str | None]:
        """The highest tier holding each key now, ``None`` where no tier does."""
        return self.tiers.walk(keys, self.lock, lambda tier, ks: tier.locate(ks))

    def lookup(self, namespace: Namespace, token_ids: Sequence[int] | np.ndarray | None,
               keys: Sequence[BlockKey] | None, exact_only: bool = False) -> LookupResult:
        """See :meth:`TieredStore.lookup <tiering.store.TieredStore.lookup>`.

        :raises InvalidBlock: with neither token ids nor keys.
        """
        if keys is None:
            if token_ids is None:
                raise InvalidBlock("lookup needs token ids or keys", field="token_ids")
            keys = chain_keys(namespace, token_ids)
            n_tokens = len(token_ids)
        else:
            keys = list(keys)
            n_tokens = None
        with self.tracer.start_as_current_span("kvtier.lookup") as span:
            tiers: list[str] = []
            for t in self.where(list(keys)):
                if t is None:
                    break
                tiers.append(t)
            lossy = self.tiers.lossy(keys[:len(tiers)], tiers, self.lock) if namespace.lossy else [False] * len(tiers)
            del tiers[lossy.index(True) if exact_only and True in lossy else len(tiers):], lossy[len(tiers):]
            bt = namespace.layout.block_tokens
            tokens = min(len(tiers) * bt, n_tokens) if n_tokens is not None else len(tiers) * bt
            span.set_attribute("kvtier.blocks", len(tiers))
        remote_tokens = self.fleet.found(namespace, keys, tiers, tokens)
        return LookupResult(list(keys[:len(tiers)]), tiers, tokens, remote_tokens, lossy)

    def owned(self, keys: Sequence[BlockKey], tenant: str) -> list[bool]:
        """See :meth:`TieredStore.owned <tiering.store.TieredStore.owned>`."""
        keys = list(keys)
        ns_ids = self.tiers.walk(keys, self.lock, lambda tier, ks: [tier.ns_of(k) for k in ks])
        return self.namespaces.owned_by(ns_ids, tenant)

    def tenant_usage(self, tenant: str) -> dict[str, int]:
        """See :meth:`TieredStore.tenant_usage <tiering.store.TieredStore.tenant_usage>`."""
        ns_ids = self.namespaces.ids(tenant)
        out = {"memory": 0, "cold": 0}
        for t, n in self.tiers.each(self.lock, lambda t: t.ns_used_bytes(ns_ids)):
            out[t.usage_group] = out.get(t.usage_group, 0) + (n or 0)
        return out

    def usage(self) -> dict[str, dict[str, int]]:
        """Per tier: blocks, used bytes, capacity bytes; a tier below that is unavailable is left out."""
        return {t.name: u for t, u in self.tiers.each(self.lock, lambda t: {
            "blocks": t.block_count(), "used_bytes": t.used_bytes, "capacity_bytes": t.capacity_bytes})
            if u is not None}
