"""LocalKVTierClient: the client API over an in-process :class:`tiering.TieredStore` (no gRPC).

It answers with the same dataclasses as :class:`service.client.KVTierClient`, so code such as
:mod:`service.hf` runs unchanged against a server or an embedded store. Engine errors
(``tiering.errors``) become :class:`~service.client_types.KVTierClientError` with the status code the
server would have sent. Blocks come back as tensors that own their memory (copied out of the tier).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvtier.service.client.blockwire import Payload, check_payload_count, payload_view
from kvtier.service.client.types import (TORCH_DTYPES, GetResult, KVTierClientError, LookupInfo, PrefetchInfo, PutInfo,
                                  ResumeInfo)
from kvtier.service.wire.convert import DEFAULT_TENANT
from kvtier.service.server.errors import status_for
from kvtier.tiering import errors
from kvtier.tiering.keys import BlockKey, Namespace, chain_keys
from kvtier.tiering.store import TieredStore

def _client_error(exc: errors.KVTierError) -> KVTierClientError:
    # the server's own mapping (service.errors), so both clients raise the same codes
    status = status_for(exc)
    return KVTierClientError(status.code, status.details)


class LocalKVTierClient:
    """Client-shaped access to a store in this process. Thread-safe as the store is; blocking.

    :param store: the engine; not closed by :meth:`close` unless ``own_store``.
    :param tenant: tenant for session calls that name none.
    """

    def __init__(self, store: TieredStore, *, tenant: str = DEFAULT_TENANT, own_store: bool = False) -> None:
        self.store = store
        self.tenant = tenant
        self._own = own_store

    def lookup(self, namespace: Namespace, token_ids: Sequence[int] | np.ndarray) -> LookupInfo:
        """See :meth:`service.client.KVTierClient.lookup`."""
        try:
            keys = chain_keys(namespace, token_ids)
            found = self.store.lookup(namespace, keys=keys)
        except errors.KVTierError as exc:
            raise _client_error(exc) from exc
        tokens = min(found.blocks * namespace.layout.block_tokens, len(token_ids))
        return LookupInfo(keys, found.blocks, tokens, list(found.tiers))

    def put(self, namespace: Namespace, token_ids: Sequence[int] | np.ndarray, blocks: Sequence[Payload], *,
            first_block: int = 0, session_id: str | None = None, durable: bool = False, priority: int = 0,
            ttl_seconds: float = 0.0, checksums: bool = True) -> PutInfo:
        """See :meth:`service.client.KVTierClient.put` (``checksums`` is accepted and unused: no wire)."""
        n_keys = -(-len(token_ids) // namespace.layout.block_tokens)
        check_payload_count(blocks, n_keys, first_block)
        views = [payload_view(b, namespace.layout.dtype, first_block + i) for i, b in enumerate(blocks)]
        try:
            got = self.store.put(namespace, token_ids, views, first_block=first_block, session_id=session_id or None,
                                 durable=durable, priority=priority, ttl_s=ttl_seconds or None)
        except errors.KVTierError as exc:
            raise _client_error(exc) from exc
        return PutInfo(got.keys, got.stored, got.skipped_present, got.skipped_not_admitted)

    def get(self, keys: Sequence[BlockKey] | None = None, *, session_id: str | None = None, tenant: str | None = None,
            start_block: int = 0, max_blocks: int = 0) -> GetResult:
        """See :meth:`service.client.KVTierClient.get`."""
        try:
            if session_id is not None:
                keys = self.store.get_session(tenant or self.tenant, session_id).keys
            keys = list(keys or [])[start_block:]
            limit = len(keys) if not max_blocks else min(max_blocks, len(keys))
            blocks, got_keys, tiers = [], [], []
            for key, block, tier in self.store.iter_blocks(keys[:limit]):
                if block is None:
                    break
                data = block.data.to("cpu", copy=True)
                blocks.append(data.view(TORCH_DTYPES[block.dtype]).reshape(block.shape))
                got_keys.append(key)
                tiers.append(tier)
        except errors.KVTierError as exc:
            raise _client_error(exc) from exc
        complete = len(blocks) == len(keys)
        reason = "" if complete else ("max_blocks" if len(blocks) == limit else "miss")
        return GetResult(blocks, got_keys, tiers, complete, None if complete else start_block + len(blocks), reason,
                         sum(int(b.shape[3]) for b in blocks))

    def resume(self, session_id: str, *, tenant: str | None = None, prefetch_budget_ms: int = 0) -> ResumeInfo:
        """See :meth:`service.client.KVTierClient.resume`."""
        try:
            session, tiers, _ = self.store.resume(tenant or self.tenant, session_id)
        except errors.KVTierError as exc:
            raise _client_error(exc) from exc
        cached = next((i for i, t in enumerate(tiers) if t is None), len(tiers))
        return ResumeInfo(session.namespace, session.tokens, list(session.keys), list(tiers), cached,
                          session.priority, session.ttl_s or 0.0)

    def prefetch(self, keys: Sequence[BlockKey] | None = None, *, session_id: str | None = None,
                 tenant: str | None = None, budget_ms: int = 0, wait: bool = False) -> PrefetchInfo:
        """See :meth:`service.client.KVTierClient.prefetch`."""
        try:
            if session_id is not None:
                keys = self.store.get_session(tenant or self.tenant, session_id).keys
            handle = self.store.prefetch(list(keys or []))
            ready = handle.future.result() if wait else 0
        except errors.KVTierError as exc:
            raise _client_error(exc) from exc
        return PrefetchInfo(len(handle.keys), ready)

    def delete_session(self, session_id: str, *, tenant: str | None = None, erase_blocks: bool = False) -> int:
        """See :meth:`service.client.KVTierClient.delete_session`."""
        try:
            return self.store.delete_session(tenant or self.tenant, session_id, erase_blocks=erase_blocks)
        except errors.KVTierError as exc:
            raise _client_error(exc) from exc

    def invalidate(self, namespace: Namespace | None = None, *, model: str | None = None, revision: str = "",
                   tenant: str | None = None) -> int:
        """See :meth:`service.client.KVTierClient.invalidate`."""
        try:
            if namespace is not None:
                return self.store.invalidate(namespace.tenant, namespace=namespace)
            return self.store.invalidate(tenant or self.tenant, model=model, revision=revision or None)
        except errors.KVTierError as exc:
            raise _client_error(exc) from exc

    def close(self) -> None:
        """Close the store if this adapter owns it."""
        if self._own:
            self.store.close()

    def __enter__(self) -> "LocalKVTierClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
