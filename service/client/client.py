"""Python clients of the kvtier service: :class:`KVTierClient` (blocking) and :class:`AsyncKVTierClient`.

Both speak ``kvtier.v1.KVCache`` over one channel, return the dataclasses of
:mod:`service.client_types` and raise only :class:`~service.client_types.KVTierClientError` (with
the gRPC code and the server's rich error details). Blocks go out as ≤ 1 MiB chunks with their
XXH3-64 and come back as tensors of the dtype and shape the server announced, each verified against
its checksum first: a corrupted block raises ``DATA_LOSS``, never returns. Example::

    with KVTierClient("127.0.0.1:50051") as kv:
        kv.wait_ready(10)
        info = kv.lookup(namespace, token_ids)
        kv.put(namespace, token_ids, blocks[info.cached_blocks:], first_block=info.cached_blocks, session_id="c1")
        got = kv.get(session_id="c1")          # got.blocks: list[torch.Tensor]
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvtier.service.client import requests as cp
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.client.blockwire import GetAssembler, Payload, check_payload_count, payload_view, put_requests
from kvtier.service.client.types import (GetResult, KVTierClientError, LookupInfo, PrefetchInfo, PutInfo, ResumeInfo,
                                  StatsInfo)
from kvtier.service.client import ipc as ipc_client
from kvtier.service.client.shm import ShmLink, is_local_target
from kvtier.service.wire.fast import FastKVCacheStub
from kvtier.tiering.keys import BlockKey, Namespace

#: Metadata key of the bearer token (``service/server/auth.py`` reads the same key).
AUTH_METADATA = "authorization"
#: Health-check name of the service.
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVCache"].full_name
#: Matches the server's default ``max_message_bytes`` (chunks are ≤ 1 MiB, so any ≥ 2 MiB works).
DEFAULT_MAX_MESSAGE_BYTES = 8 << 20
#: Values of ``data_path``: pick by target, shared memory only, gRPC streams only.
DATA_PATHS = ("auto", "shm", "grpc")

log = logging.getLogger(__name__)


def _channel_options(max_message_bytes: int, options: Sequence[tuple[str, object]]) -> list[tuple[str, object]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes), *options]


def _prepare_put_views(namespace: Namespace, token_ids, blocks: Sequence[Payload], first_block: int, session_id,
                       durable, priority, ttl_seconds) -> tuple[pb.PutHeader, list[memoryview]]:
    """Validate locally; the PutHeader and each block's bytes (for the shared-memory path)."""
    n_keys = -(-len(token_ids) // namespace.layout.block_tokens)
    check_payload_count(blocks, n_keys, first_block)
    views = [payload_view(b, namespace.layout.dtype, first_block + i) for i, b in enumerate(blocks)]
    header = cp.put_header(namespace, token_ids, first_block=first_block, block_count=len(views),
                           session_id=session_id, durable=durable, priority=priority, ttl_seconds=ttl_seconds)
    return header, views


def _prepare_put(namespace: Namespace, token_ids, blocks: Sequence[Payload], first_block: int, session_id, durable,
                 priority, ttl_seconds, checksums):
    """Validate locally and build the request stream (payload views are taken before the call starts)."""
    header, views = _prepare_put_views(namespace, token_ids, blocks, first_block, session_id, durable, priority,
                                       ttl_seconds)
    return put_requests(header, views, with_checksums=checksums)


def _no_link(target: str, data_path: str, exc: Exception) -> None:
    """Opening the shared-memory link failed with ``exc``: in ``shm`` mode raise it (a socket error as
    UNAVAILABLE); in ``auto`` mode note it, and the caller uses the gRPC streams from then on."""
    if data_path == "shm":
        if isinstance(exc, KVTierClientError):
            raise exc
        raise KVTierClientError(grpc.StatusCode.UNAVAILABLE, f"shared-memory arena unreachable: {exc}") from None
    log.debug("shared memory not available from %s (%s); using the gRPC streams", target, exc)


class KVTierClient:
    """Blocking client. Thread-safe (gRPC channels are); use as a context manager or call :meth:`close`.

    :param target: ``host:port`` of the server.
    :param timeout: default deadline in seconds of every call (``None``: no deadline).
    :param tenant: tenant sent with session calls that name none (``""``: the server's default, or
        the token's tenant on a server that authenticates).
    :param token: bearer token sent as ``authorization`` metadata with every call (servers with auth).
    :param credentials: TLS channel credentials (insecure channel when omitted).
    :param max_message_bytes: channel send/receive limit; keep it equal to the server's.
    :param options: extra channel options.
    :param data_path: how block bytes travel: ``"auto"`` (shared memory when the target is on this
        host, ``127.0.0.1``/``localhost``/``::1``/``unix:``, and the server offers it; else the gRPC
        streams), ``"shm"`` (shared memory or an error) or ``"grpc"`` (streams only).
    :raises ValueError: for an unknown ``data_path``.
    """

    def __init__(self, target: str, *, timeout: float | None = 60.0, tenant: str = "", token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 options: Sequence[tuple[str, object]] = (), data_path: str = "auto") -> None:
        if data_path not in DATA_PATHS:
            raise ValueError(f"data_path must be one of {DATA_PATHS}, not {data_path!r}")
        opts = _channel_options(max_message_bytes, options)
        self.target = target
        self.timeout = timeout
        self.tenant = tenant
        self.data_path = data_path
        self._metadata = ((AUTH_METADATA, f"Bearer {token}"),) if token else None
        self._channel = (grpc.secure_channel(target, credentials, options=opts) if credentials is not None
                         else grpc.insecure_channel(target, options=opts))
        self._stub = FastKVCacheStub(self._channel)  # Get/Put payloads skip protobuf (same bytes)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._shm: ShmLink | None = None
        self._shm_tried = data_path == "grpc" or (data_path == "auto" and not is_local_target(target))
        self._shm_lock = threading.Lock()

    def _link(self, timeout: float | None) -> ShmLink | None:
        """The shared-memory link, opened on first use; ``None``: use the gRPC streams.

        In ``auto`` mode a server without shared memory (or an unreachable arena socket) is noted once
        and the streams are used from then on; in ``shm`` mode that raises.
        """
        if self._shm is not None or self._shm_tried:
            return self._shm
        with self._shm_lock:
            if self._shm is None and not self._shm_tried:
                try:
                    self._shm = ShmLink.open(self._stub, self._metadata, self.timeout if timeout is None else timeout)
                except (KVTierClientError, OSError) as exc:
                    _no_link(self.target, self.data_path, exc)
                self._shm_tried = True
            return self._shm

    def _drop_link(self, exc: KVTierClientError) -> bool:
        """After a shared-memory call failed: forget a link the server no longer knows (it restarted,
        or reclaimed it), so the next call opens a new one. Returns whether to retry over a new link."""
        if exc.code != grpc.StatusCode.FAILED_PRECONDITION or self._shm is None:
            return False
        with self._shm_lock:
            if self._shm is not None:
                self._shm.close()
                self._shm = None
                self._shm_tried = False
        return True

    def _call(self, method, request, timeout):
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise cp.client_error(exc) from None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server's health check says SERVING.

        :raises KVTierClientError: ``DEADLINE_EXCEEDED`` if it does not within ``timeout`` seconds.
        """
        end = time.monotonic() + timeout
        last = "no answer"
        while (left := end - time.monotonic()) > 0:
            try:
                resp = self._health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                          timeout=min(left, 5.0), wait_for_ready=True)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            time.sleep(min(0.05, max(end - time.monotonic(), 0)))
        raise KVTierClientError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"{self.target} not serving after {timeout:.1f} s ({last})")

    def lookup(self, namespace: Namespace, token_ids, *, timeout: float | None = None) -> LookupInfo:
        """Longest cached prefix of ``token_ids`` and the tier of each of its blocks (moves no data)."""
        return cp.lookup_info(self._call(self._stub.Lookup, cp.lookup_request(namespace, token_ids), timeout))

    def put(self, namespace: Namespace, token_ids, blocks: Sequence[Payload], *, first_block: int = 0,
            session_id: str | None = None, durable: bool = False, priority: int = 0, ttl_seconds: float = 0.0,
            checksums: bool = True, timeout: float | None = None) -> PutInfo:
        """Store blocks ``first_block…`` of ``token_ids`` (streamed in ≤ 1 MiB chunks).

        :param blocks: tensors/ndarrays of the layout's dtype and shape ``[2, L, H, t, D]`` (any device),
            or raw bytes; block ``i`` covers tokens ``[(first_block+i)*T, …)``, only the last may be partial.
        :param session_id: also record the chain of ``token_ids`` as this session.
        :param durable: answer only once blocks and session are on disk.
        :param checksums: send each block's XXH3-64 so the server verifies it.
        :raises KVTierClientError: ``INVALID_ARGUMENT`` (locally or from the server) for a wrong dtype,
            size or count; any code the server answers with.
        """
        if (link := self._link(timeout)) is not None:
            header, views = _prepare_put_views(namespace, token_ids, blocks, first_block, session_id, durable, priority,
                                               ttl_seconds)
            try:
                return cp.put_info(self._shm_call(link.put, header, views, timeout=timeout))
            except KVTierClientError as exc:
                if not self._drop_link(exc) or (link := self._link(timeout)) is None:
                    raise
                return cp.put_info(self._shm_call(link.put, header, views, timeout=timeout))
        stream = _prepare_put(namespace, token_ids, blocks, first_block, session_id, durable, priority, ttl_seconds,
                              checksums)
        return cp.put_info(self._call(self._stub.Put, stream, timeout))

    def _shm_call(self, method, *args, timeout: float | None):
        try:
            return method(self._stub, self._metadata, self.timeout if timeout is None else timeout, *args)
        except grpc.RpcError as exc:
            raise cp.client_error(exc) from None

    def get(self, keys: Sequence[BlockKey] | None = None, *, session_id: str | None = None, tenant: str | None = None,
            start_block: int = 0, max_blocks: int = 0, timeout: float | None = None,
            device: str | torch.device | None = None) -> GetResult:
        """Blocks of ``keys`` (prefix order) or of a session's chain, stopping at the first miss.

        :param device: where the blocks go (``None`` or ``"cpu"``: host tensors, as they arrive). For a
            CUDA device whose GPU is the hot tier of a server on this host (shared-memory link), the
            hot blocks come by CUDA IPC, copied device to device and not checksummed again
            (``service/client/ipc.py``); the others, and every block in any other case, come the
            usual way and are moved there with ``.to(device)``.
        :raises KVTierClientError: ``DATA_LOSS`` if a block fails its checksum (the stream is
            cancelled, nothing is returned); ``NOT_FOUND`` for an unknown session.
        """
        req = cp.get_request(keys, session_id, self.tenant if tenant is None else tenant, start_block, max_blocks)
        if device is None or torch.device(device).type == "cpu":
            return self._get(req, timeout)
        link = self._link(timeout) if ipc_client.cuda_device(device) is not None else None
        return ipc_client.get_on_device(self._stub, self._metadata, self.timeout if timeout is None else timeout, link,
                                        req, torch.device(device), self._get)

    def _get(self, req: pb.GetRequest, timeout: float | None) -> GetResult:
        """:meth:`get` of a built request: through the shared-memory link if any, else the stream."""
        if (link := self._link(timeout)) is not None:
            try:
                return self._shm_call(link.get, req, timeout=timeout)
            except KVTierClientError as exc:
                if not self._drop_link(exc) or (link := self._link(timeout)) is None:
                    raise
                return self._shm_call(link.get, req, timeout=timeout)
        asm = GetAssembler()
        try:
            call = self._stub.Get(req, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
            try:
                for msg in call:
                    asm.feed(msg)
            except KVTierClientError:
                call.cancel()
                raise
        except grpc.RpcError as exc:
            raise cp.client_error(exc) from None
        return asm.result()

    def resume(self, session_id: str, *, tenant: str | None = None, prefetch_budget_ms: int = 0,
               timeout: float | None = None) -> ResumeInfo:
        """A session's manifest; the server starts moving its blocks to the top tier.

        :raises KVTierClientError: ``NOT_FOUND`` if there is no such session.
        """
        req = pb.ResumeRequest(tenant=self.tenant if tenant is None else tenant, session_id=session_id,
                               prefetch_budget_ms=prefetch_budget_ms)
        return cp.resume_info(self._call(self._stub.Resume, req, timeout))

    def prefetch(self, keys: Sequence[BlockKey] | None = None, *, session_id: str | None = None,
                 tenant: str | None = None, budget_ms: int = 0, wait: bool = False,
                 timeout: float | None = None) -> PrefetchInfo:
        """Move blocks (or a session's blocks) up to the top tier; with ``wait``, answer when done."""
        req = cp.prefetch_request(keys, session_id, self.tenant if tenant is None else tenant, budget_ms, wait)
        return cp.prefetch_info(self._call(self._stub.Prefetch, req, timeout))

    def delete_session(self, session_id: str, *, tenant: str | None = None, erase_blocks: bool = False,
                       timeout: float | None = None) -> int:
        """Forget a session (``erase_blocks``: also erase its blocks everywhere). Returns copies erased."""
        req = pb.DeleteSessionRequest(tenant=self.tenant if tenant is None else tenant, session_id=session_id,
                                      erase_blocks=erase_blocks)
        return self._call(self._stub.DeleteSession, req, timeout).blocks_erased

    def invalidate(self, namespace: Namespace | None = None, *, model: str | None = None, revision: str = "",
                   tenant: str | None = None, timeout: float | None = None) -> int:
        """Delete every block and session of a namespace, or of a model (one revision or all).

        :returns: block copies deleted across tiers.
        """
        req = cp.invalidate_request(namespace, model, revision, self.tenant if tenant is None else tenant)
        return self._call(self._stub.Invalidate, req, timeout).blocks_deleted

    def stats(self, *, timeout: float | None = None) -> StatsInfo:
        """Per-tier usage and counters."""
        return cp.stats_info(self._call(self._stub.Stats, pb.StatsRequest(), timeout))

    def close(self) -> None:
        """Close the channel and the shared-memory link, if any (idempotent)."""
        with self._shm_lock:
            if self._shm is not None:
                self._shm.close()
                self._shm = None
            self._shm_tried = True
        self._channel.close()

    def __enter__(self) -> "KVTierClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncKVTierClient:
    """``grpc.aio`` client: the methods of :class:`KVTierClient` as coroutines, same arguments and results.

    Create and use it inside one running event loop; ``async with`` closes it. Checksums are
    computed and verified on the loop thread (XXH3 runs at several GB/s). ``data_path`` as for
    :class:`KVTierClient`: on the same host, puts and gets go through a shared-memory arena, and a
    call waiting for a free range of it never blocks the loop.
    """

    def __init__(self, target: str, *, timeout: float | None = 60.0, tenant: str = "", token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 options: Sequence[tuple[str, object]] = (), data_path: str = "auto") -> None:
        if data_path not in DATA_PATHS:
            raise ValueError(f"data_path must be one of {DATA_PATHS}, not {data_path!r}")
        opts = _channel_options(max_message_bytes, options)
        self.target = target
        self.timeout = timeout
        self.tenant = tenant
        self.data_path = data_path
        self._metadata = ((AUTH_METADATA, f"Bearer {token}"),) if token else None
        self._channel = (grpc.aio.secure_channel(target, credentials, options=opts) if credentials is not None
                         else grpc.aio.insecure_channel(target, options=opts))
        self._stub = FastKVCacheStub(self._channel)  # Get/Put payloads skip protobuf (same bytes)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._shm: ShmLink | None = None
        self._shm_tried = data_path == "grpc" or (data_path == "auto" and not is_local_target(target))
        self._shm_lock = asyncio.Lock()

    async def _link(self, timeout: float | None) -> ShmLink | None:
        """See :meth:`KVTierClient._link`."""
        if self._shm is not None or self._shm_tried:
            return self._shm
        async with self._shm_lock:
            if self._shm is None and not self._shm_tried:
                try:
                    self._shm = await ShmLink.open_async(self._stub, self._metadata,
                                                         self.timeout if timeout is None else timeout)
                except (KVTierClientError, OSError) as exc:
                    _no_link(self.target, self.data_path, exc)
                self._shm_tried = True
            return self._shm

    async def _shm_call(self, method, *args, timeout: float | None):
        """Run ``method`` (a link's ``put_async``/``get_async``); after FAILED_PRECONDITION (the server
        forgot the arena: it restarted) once more over a new link, as :meth:`KVTierClient.put` does."""
        for attempt in (0, 1):
            link = await self._link(timeout)
            try:
                return await getattr(link, method)(self._stub, self._metadata,
                                                   self.timeout if timeout is None else timeout, *args)
            except grpc.RpcError as exc:
                err = cp.client_error(exc)
            if attempt or err.code != grpc.StatusCode.FAILED_PRECONDITION:
                raise err
            async with self._shm_lock:
                if self._shm is link:
                    link.close()
                    self._shm, self._shm_tried = None, False
            if await self._link(timeout) is None:
                raise err

    async def _call(self, method, request, timeout):
        try:
            return await method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise cp.client_error(exc) from None

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """See :meth:`KVTierClient.wait_ready`."""
        end = time.monotonic() + timeout
        last = "no answer"
        while (left := end - time.monotonic()) > 0:
            try:
                resp = await self._health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                timeout=min(left, 5.0), wait_for_ready=True)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            await asyncio.sleep(min(0.05, max(end - time.monotonic(), 0)))
        raise KVTierClientError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"{self.target} not serving after {timeout:.1f} s ({last})")

    async def lookup(self, namespace: Namespace, token_ids, *, timeout: float | None = None) -> LookupInfo:
        """See :meth:`KVTierClient.lookup`."""
        return cp.lookup_info(await self._call(self._stub.Lookup, cp.lookup_request(namespace, token_ids), timeout))

    async def put(self, namespace: Namespace, token_ids, blocks: Sequence[Payload], *, first_block: int = 0,
                  session_id: str | None = None, durable: bool = False, priority: int = 0, ttl_seconds: float = 0.0,
                  checksums: bool = True, timeout: float | None = None) -> PutInfo:
        """See :meth:`KVTierClient.put`."""
        if await self._link(timeout) is not None:
            header, views = _prepare_put_views(namespace, token_ids, blocks, first_block, session_id, durable, priority,
                                               ttl_seconds)
            return cp.put_info(await self._shm_call("put_async", header, views, timeout=timeout))
        stream = _prepare_put(namespace, token_ids, blocks, first_block, session_id, durable, priority, ttl_seconds,
                              checksums)
        return cp.put_info(await self._call(self._stub.Put, stream, timeout))

    async def get(self, keys: Sequence[BlockKey] | None = None, *, session_id: str | None = None,
                  tenant: str | None = None, start_block: int = 0, max_blocks: int = 0,
                  timeout: float | None = None) -> GetResult:
        """See :meth:`KVTierClient.get` (host tensors only)."""
        req = cp.get_request(keys, session_id, self.tenant if tenant is None else tenant, start_block, max_blocks)
        if await self._link(timeout) is not None:
            return await self._shm_call("get_async", req, timeout=timeout)
        asm = GetAssembler()
        call = self._stub.Get(req, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
        try:
            async for msg in call:
                asm.feed(msg)
        except KVTierClientError:
            call.cancel()
            raise
        except grpc.RpcError as exc:
            raise cp.client_error(exc) from None
        return asm.result()

    async def resume(self, session_id: str, *, tenant: str | None = None, prefetch_budget_ms: int = 0,
                     timeout: float | None = None) -> ResumeInfo:
        """See :meth:`KVTierClient.resume`."""
        req = pb.ResumeRequest(tenant=self.tenant if tenant is None else tenant, session_id=session_id,
                               prefetch_budget_ms=prefetch_budget_ms)
        return cp.resume_info(await self._call(self._stub.Resume, req, timeout))

    async def prefetch(self, keys: Sequence[BlockKey] | None = None, *, session_id: str | None = None,
                       tenant: str | None = None, budget_ms: int = 0, wait: bool = False,
                       timeout: float | None = None) -> PrefetchInfo:
        """See :meth:`KVTierClient.prefetch`."""
        req = cp.prefetch_request(keys, session_id, self.tenant if tenant is None else tenant, budget_ms, wait)
        return cp.prefetch_info(await self._call(self._stub.Prefetch, req, timeout))

    async def delete_session(self, session_id: str, *, tenant: str | None = None, erase_blocks: bool = False,
                             timeout: float | None = None) -> int:
        """See :meth:`KVTierClient.delete_session`."""
        req = pb.DeleteSessionRequest(tenant=self.tenant if tenant is None else tenant, session_id=session_id,
                                      erase_blocks=erase_blocks)
        return (await self._call(self._stub.DeleteSession, req, timeout)).blocks_erased

    async def invalidate(self, namespace: Namespace | None = None, *, model: str | None = None, revision: str = "",
                         tenant: str | None = None, timeout: float | None = None) -> int:
        """See :meth:`KVTierClient.invalidate`."""
        req = cp.invalidate_request(namespace, model, revision, self.tenant if tenant is None else tenant)
        return (await self._call(self._stub.Invalidate, req, timeout)).blocks_deleted

    async def stats(self, *, timeout: float | None = None) -> StatsInfo:
        """See :meth:`KVTierClient.stats`."""
        return cp.stats_info(await self._call(self._stub.Stats, pb.StatsRequest(), timeout))

    async def close(self) -> None:
        """Close the channel and the shared-memory link, if any (idempotent)."""
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        self._shm_tried = True
        await self._channel.close()

    async def __aenter__(self) -> "AsyncKVTierClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
