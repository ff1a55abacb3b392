"""Requests and results of the kvtier clients: Python values → request protos → result dataclasses.

Used by the client core (``service/client/core.py``) for both clients. ``grpc.RpcError`` becomes
:class:`KVTierClientError` here. Imports wire/, the client's types and tiering's vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import numpy as np
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.client.types import (KVTierClientError, LookupInfo, PrefetchInfo, PutInfo, ResumeInfo, StatsInfo,
                                  TierStatsInfo)
from kvtier.service.wire.convert import TIER_FROM_PROTO, keys_to_proto, namespace_from_proto, namespace_to_proto
from kvtier.tiering.keys import BlockKey, Namespace

_DETAIL_TYPES = [getattr(error_details_pb2, name) for name in error_details_pb2.DESCRIPTOR.message_types_by_name]


def client_error(exc: grpc.RpcError) -> KVTierClientError:
    """The :class:`KVTierClientError` of a failed call (sync ``RpcError`` or ``grpc.aio.AioRpcError``).

    The rich ``google.rpc.Status`` in the trailers (if any) is unpacked into ``error_details``.
    """
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    try:
        status = rpc_status.from_call(exc)
    except (ValueError, AttributeError, TypeError):  # trailers that disagree with the status: keep the code
        status = None
    return _error(code or grpc.StatusCode.UNKNOWN, details or "", status)


def status_error(code: grpc.StatusCode, status: status_pb2.Status) -> KVTierClientError:
    """The :class:`KVTierClientError` of a call answered ``status`` (code ``code``) without gRPC: the
    same-host socket path (``service/client/shm_control.py``) gets the very Status gRPC would carry."""
    return _error(code, status.message, status)


def _error(code: grpc.StatusCode, details: str, status: status_pb2.Status | None) -> KVTierClientError:
    unpacked: list = []
    for item in status.details if status is not None else ():
        for cls in _DETAIL_TYPES:
            if item.Is(cls.DESCRIPTOR):
                msg = cls()
                item.Unpack(msg)
                unpacked.append(msg)
                break
        else:
            copy = any_pb2.Any()
            copy.CopyFrom(item)
            unpacked.append(copy)
    return KVTierClientError(code, details, status=status, error_details=unpacked)


def _ids(token_ids: Sequence[int] | np.ndarray) -> list[int]:
    return [int(t) for t in token_ids]


def lookup_request(namespace: Namespace, token_ids, accept_lossy: bool = False) -> pb.LookupRequest:
    return pb.LookupRequest(namespace=namespace_to_proto(namespace), token_ids=_ids(token_ids),
                            accept_lossy=accept_lossy)


def lookup_info(resp: pb.LookupResponse) -> LookupInfo:
    return LookupInfo([BlockKey(bytes(k)) for k in resp.keys], resp.cached_blocks, resp.cached_tokens,
                      [TIER_FROM_PROTO.get(t) for t in resp.tiers], list(resp.lossy))


def put_header(namespace: Namespace, token_ids, *, first_block: int, block_count: int, session_id: str | None,
               durable: bool, priority: int, ttl_seconds: float) -> pb.PutHeader:
    return pb.PutHeader(namespace=namespace_to_proto(namespace), session_id=session_id or "",
                        token_ids=_ids(token_ids), durable=durable, first_block=first_block, block_count=block_count,
                        priority=priority, ttl_seconds=ttl_seconds)


def put_info(resp: pb.PutResponse) -> PutInfo:
    def keys(raw):
        return [BlockKey(bytes(k)) for k in raw]

    return PutInfo(keys(resp.keys), keys(resp.stored), keys(resp.skipped_present), keys(resp.skipped_not_admitted))


def _targeted(req, keys: Sequence[BlockKey] | None, session_id: str | None):
    """``req`` (a Get or Prefetch request) aimed at explicit keys or a session (exactly one must be given).

    :raises KVTierClientError: ``INVALID_ARGUMENT`` if both or neither are given.
    """
    if (keys is None) == (session_id is None):
        raise KVTierClientError(grpc.StatusCode.INVALID_ARGUMENT, "give either keys or session_id")
    if keys is not None:
        req.keys.keys.extend(keys_to_proto(keys))
    else:
        req.session_id = session_id
    return req


def get_request(keys: Sequence[BlockKey] | None, session_id: str | None, tenant: str, start_block: int,
                max_blocks: int, accept_lossy: bool = False) -> pb.GetRequest:
    """A GetRequest for explicit keys or a session (:func:`_targeted`)."""
    return _targeted(pb.GetRequest(tenant=tenant, start_block=start_block, max_blocks=max_blocks,
                                   accept_lossy=accept_lossy), keys, session_id)


def rest_request(request: pb.GetRequest, rest_keys, max_blocks: int) -> pb.GetRequest:
    """The request for the rest of ``request``'s chain, by its keys (a session might change between two
    calls): same tenant and ``accept_lossy``."""
    rest = pb.GetRequest(tenant=request.tenant, max_blocks=max_blocks, accept_lossy=request.accept_lossy)
    rest.keys.keys.extend(rest_keys)
    return rest


def resume_info(resp: pb.ResumeResponse) -> ResumeInfo:
    return ResumeInfo(namespace_from_proto(resp.namespace), resp.tokens, [BlockKey(bytes(k)) for k in resp.keys],
                      [TIER_FROM_PROTO.get(t) for t in resp.tiers], resp.cached_blocks, resp.priority,
                      resp.ttl_seconds, list(resp.lossy))


def prefetch_request(keys: Sequence[BlockKey] | None, session_id: str | None, tenant: str, budget_ms: int,
                     wait: bool) -> pb.PrefetchRequest:
    """A PrefetchRequest for explicit keys or a session (:func:`_targeted`)."""
    return _targeted(pb.PrefetchRequest(tenant=tenant, budget_ms=budget_ms, wait=wait), keys, session_id)


def prefetch_info(resp: pb.PrefetchResponse) -> PrefetchInfo:
    return PrefetchInfo(resp.blocks, resp.ready_blocks)


def invalidate_request(namespace: Namespace | None, model: str | None, revision: str, tenant: str
                       ) -> pb.InvalidateRequest:
    if (namespace is None) == (not model):
        raise KVTierClientError(grpc.StatusCode.INVALID_ARGUMENT, "give either a namespace or a model")
    if namespace is not None:
        return pb.InvalidateRequest(namespace=namespace_to_proto(namespace))
    return pb.InvalidateRequest(model=pb.ModelRef(tenant=tenant, model=model, revision=revision))


def stats_info(resp: pb.StatsResponse) -> StatsInfo:
    tiers = [TierStatsInfo(TIER_FROM_PROTO.get(t.tier), t.blocks, t.used_bytes, t.capacity_bytes, t.hits, t.misses,
                           t.promotions, t.demotions, t.evictions, t.checksum_failures) for t in resp.tiers]
    return StatsInfo(tiers, resp.pinned_blocks, resp.write_queue_depth, resp.pending_writes, resp.compression_ratio,
                     dict(resp.bytes_moved), dict(resp.counters), resp.version)
