"""LocalKVTierClient: the client API over an in-process :class:`tiering.TieredStore` (no gRPC).

It answers with the same dataclasses as :class:`kvtier.service.client.client.KVTierClient`, so code such
as :mod:`kvtier.service.integrations.hf` runs unchanged against a server or an embedded store. Engine
errors (``tiering.errors``) become :class:`~kvtier.service.client.types.KVTierClientError` with the status
code the server would have sent (:func:`engine_errors`, the one place that maps them here). Blocks come
back as tensors that own their memory (copied out of the tier). Imports the engine and the client's
modules, never server/.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import grpc
import numpy as np
import torch
from google.rpc import error_details_pb2

from kvtier.service.client.blockwire import Payload, block_shapes, check_payload_count, payload_view
from kvtier.service.client.kvget import as_dest, kv_capacity, kv_shape
from kvtier.service.client.tenants import SessionTenants
from kvtier.service.client.types import (TORCH_DTYPES, GetResult, KVResult, KVTierClientError, LookupInfo,
                                         PrefetchInfo, PutInfo, ResumeInfo)
from kvtier.service.wire.convert import DEFAULT_TENANT
from kvtier.tiering import errors
from kvtier.tiering.keys import BlockKey, Namespace, chain_keys
from kvtier.tiering.store import TieredStore
from kvtier.tiering.layout import blocks_for
from kvtier.tiering.results import resumed_prefix

#: Engine error -> the status code a server answers it with (most specific first: a SessionNotFound is a
#: BlockNotFound). The server's error boundary keeps the same table for the errors both ends know.
ENGINE_CODES: tuple[tuple[type[errors.KVTierError], grpc.StatusCode], ...] = (
    (errors.InvalidBlock, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.BlockNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.LayoutMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.CapacityExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.TierUnavailable, grpc.StatusCode.UNAVAILABLE),
)


@contextlib.contextmanager
def engine_errors() -> Iterator[None]:
    """Turn an engine error raised inside into :class:`KVTierClientError` (chained ``from`` it).

    ``InvalidBlock`` carries a ``BadRequest`` naming its field, as from a server; an engine error of
    no known kind is ``INTERNAL``.
    """
    try:
        yield
    except errors.KVTierError as exc:
        code = next((c for cls, c in ENGINE_CODES if isinstance(exc, cls)), grpc.StatusCode.INTERNAL)
        details = []
        if isinstance(exc, errors.InvalidBlock):
            details.append(error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=exc.field or "", description=str(exc))]))
        raise KVTierClientError(code, str(exc) or type(exc).__name__, error_details=details) from exc


class LocalKVTierClient:
    """Client-shaped access to a store in this process. Thread-safe as the store is; blocking.

    :param store: the engine; not closed by :meth:`close` unless ``own_store``.
    :param tenant: tenant of session calls that name none and whose session this client did not put
        (the rule of :class:`~kvtier.service.client.tenants.SessionTenants`, as for the gRPC clients).
    """

    def __init__(self, store: TieredStore, *, tenant: str = DEFAULT_TENANT, own_store: bool = False) -> None:
        self.store = store
        self._tenants = SessionTenants(tenant)
        self._own = own_store

    @property
    def tenant(self) -> str:
        """The client's own tenant for session calls."""
        return self._tenants.default

    def lookup(self, namespace: Namespace, token_ids: Sequence[int] | np.ndarray, *,
               accept_lossy: bool = False) -> LookupInfo:
        """See :meth:`kvtier.service.client.client.KVTierClient.lookup`."""
        with engine_errors():
            keys = chain_keys(namespace, token_ids)
            found = self.store.lookup(namespace, keys=keys, exact_only=not accept_lossy)
        tokens = min(found.blocks * namespace.layout.block_tokens, len(token_ids))
        return LookupInfo(keys, found.blocks, tokens, list(found.tiers), list(found.lossy))

    def put(self, namespace: Namespace, token_ids: Sequence[int] | np.ndarray, blocks: Sequence[Payload], *,
            first_block: int = 0, session_id: str | None = None, durable: bool = False, priority: int = 0,
            ttl_seconds: float = 0.0, checksums: bool = True) -> PutInfo:
        """See :meth:`kvtier.service.client.client.KVTierClient.put` (``checksums`` is accepted and unused)."""
        n_keys = blocks_for(len(token_ids), namespace.layout.block_tokens)
        check_payload_count(blocks, n_keys, first_block)
        views = [payload_view(b, namespace.layout.dtype, first_block + i) for i, b in enumerate(blocks)]
        with engine_errors():
            got = self.store.put(namespace, token_ids, views, first_block=first_block, session_id=session_id or None,
                                 durable=durable, priority=priority, ttl_s=ttl_seconds or None)
        self._tenants.remember(session_id, namespace)
        return PutInfo(got.keys, got.stored, got.skipped_present, got.skipped_not_admitted)

    def block_buffers(self, namespace: Namespace, tokens: int, *, first_block: int = 0) -> list[torch.Tensor]:
        """See :meth:`kvtier.service.client.client.KVTierClient.block_buffers` (ordinary tensors here)."""
        dtype = TORCH_DTYPES[namespace.layout.dtype]
        return [torch.empty(shape, dtype=dtype) for shape in block_shapes(namespace.layout, tokens, first_block)]

    def get(self, keys: Sequence[BlockKey] | None = None, *, session_id: str | None = None, tenant: str | None = None,
            namespace: Namespace | None = None, start_block: int = 0, max_blocks: int = 0,
            accept_lossy: bool = False) -> GetResult:
        """See :meth:`kvtier.service.client.client.KVTierClient.get`."""
        blocks, got_keys, tiers, lossy = [], [], [], []
        with engine_errors():
            if session_id is not None:
                keys = self.store.get_session(self._tenants.resolve(session_id, tenant, namespace), session_id).keys
            keys = list(keys or [])[start_block:]
            limit = len(keys) if not max_blocks else min(max_blocks, len(keys))
            for key, block, tier in self.store.iter_blocks(keys[:limit]):
                if block is None or (block.lossy and not accept_lossy):
                    break
                data = block.data.to("cpu", copy=True)
                blocks.append(data.view(TORCH_DTYPES[block.dtype]).reshape(block.shape))
                got_keys.append(key)
                tiers.append(tier)
                lossy.append(block.lossy)
        complete = len(blocks) == len(keys)
        reason = "" if complete else ("max_blocks" if len(blocks) == limit else "miss")
        return GetResult(blocks, got_keys, tiers, complete, None if complete else start_block + len(blocks), reason,
                         sum(int(b.shape[3]) for b in blocks), lossy)

    def get_kv(self, keys: Sequence[BlockKey], *, namespace: Namespace, capacity: int = 0,
               accept_lossy: bool = False) -> KVResult:
        """See :meth:`kvtier.service.client.client.KVTierClient.get_kv`: the store scatters the blocks into a
        fresh host tensor (:meth:`TieredStore.scatter_out`), each verified there.

        :raises KVTierClientError: ``DATA_LOSS`` if a block fails its check (nothing is returned);
            ``INVALID_ARGUMENT`` for a capacity below the blocks or blocks of another layout.
        """
        lay = namespace.layout
        capacity = kv_capacity(lay, len(keys), capacity)
        kv = torch.empty(kv_shape(lay, capacity), dtype=TORCH_DTYPES[lay.dtype])
        with engine_errors():
            out = self.store.scatter_out(list(keys), as_dest(kv, lay.dtype), exact_only=not accept_lossy)
        if out.stop == "damaged":
            raise KVTierClientError(grpc.StatusCode.DATA_LOSS, f"block {len(out.items)} of the chain failed its "
                                    "checksum; no block of this answer is to be used")
        complete = len(out.items) == len(keys)
        return KVResult(kv, [k for k, _, _, _ in out.items], [t for _, _, t, _ in out.items], complete,
                        None if complete else len(out.items), "" if complete else out.stop,
                        sum(b.tokens for _, b, _, _ in out.items), [b.lossy for _, b, _, _ in out.items])

    def resume(self, session_id: str, *, tenant: str | None = None, namespace: Namespace | None = None,
               prefetch_budget_ms: int = 0, accept_lossy: bool = False) -> ResumeInfo:
        """See :meth:`kvtier.service.client.client.KVTierClient.resume`."""
        with engine_errors():
            session, tiers, _ = self.store.resume(self._tenants.resolve(session_id, tenant, namespace), session_id)
            ns = session.namespace
            lossy = self.store.lookup(ns, keys=session.keys).lossy if ns.lossy else []
        cached, lossy = resumed_prefix(tiers, lossy, not accept_lossy)
        return ResumeInfo(session.namespace, session.tokens, list(session.keys), list(tiers), cached,
                          session.priority, session.ttl_s or 0.0, lossy)

    def prefetch(self, keys: Sequence[BlockKey] | None = None, *, session_id: str | None = None,
                 tenant: str | None = None, namespace: Namespace | None = None, budget_ms: int = 0,
                 wait: bool = False) -> PrefetchInfo:
        """See :meth:`kvtier.service.client.client.KVTierClient.prefetch`."""
        with engine_errors():
            if session_id is not None:
                keys = self.store.get_session(self._tenants.resolve(session_id, tenant, namespace), session_id).keys
            handle = self.store.prefetch(list(keys or []))
            ready = handle.future.result() if wait else 0
        return PrefetchInfo(len(handle.keys), ready)

    def delete_session(self, session_id: str, *, tenant: str | None = None, namespace: Namespace | None = None,
                       erase_blocks: bool = False) -> int:
        """See :meth:`kvtier.service.client.client.KVTierClient.delete_session`."""
        tenant = self._tenants.resolve(session_id, tenant, namespace)
        with engine_errors():
            erased = self.store.delete_session(tenant, session_id, erase_blocks=erase_blocks)
        self._tenants.forget(session_id, tenant)
        return erased

    def invalidate(self, namespace: Namespace | None = None, *, model: str | None = None, revision: str = "",
                   tenant: str | None = None) -> int:
        """See :meth:`kvtier.service.client.client.KVTierClient.invalidate`."""
        with engine_errors():
            if namespace is not None:
                return self.store.invalidate(namespace.tenant, namespace=namespace)
            return self.store.invalidate(tenant or self.tenant, model=model, revision=revision or None)

    def close(self) -> None:
        """Close the store if this adapter owns it."""
        if self._own:
            self.store.close()

    def __enter__(self) -> "LocalKVTierClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
