"""Python clients of the kvtier service: :class:`KVTierClient` (blocking) and :class:`AsyncKVTierClient`.

Both speak ``kvtier.v1.KVCache`` over one channel, return the dataclasses of
:mod:`kvtier.service.client.types` and raise only :class:`~kvtier.service.client.types.KVTierClientError`
(with the gRPC code and the server's rich error details). Blocks go out as ≤ 1 MiB chunks with their
XXH3-64 and come back as tensors of the dtype and shape the server announced, each verified against
its checksum first: a corrupted block raises ``DATA_LOSS``, never returns. Example::

    with KVTierClient("127.0.0.1:50051") as kv:
        kv.wait_ready(10)
        info = kv.lookup(namespace, token_ids)
        kv.put(namespace, token_ids, blocks[info.cached_blocks:], first_block=info.cached_blocks, session_id="c1")
        got = kv.get(session_id="c1")          # got.blocks (or got itself): list of torch.Tensor

Every call is written once, as steps of :class:`~kvtier.service.client.core.ClientCore`; the blocking
client runs them with :func:`~kvtier.service.client.steps.run`, the asyncio one with
:func:`~kvtier.service.client.steps.run_async`. With an OpenTelemetry tracer provider installed,
every RPC has a CLIENT span and carries the caller's trace context (``service/client/tracing.py``).
Imports grpc, wire/ and the client's modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import grpc
import grpc.experimental
import torch
from grpc_health.v1 import health_pb2_grpc

from kvtier.service.client.blockwire import Payload
from kvtier.service.client.core import DATA_PATHS, ClientCore  # noqa: F401 - DATA_PATHS re-exported
from kvtier.service.client.shm import ShmLink
from kvtier.service.client.steps import HEALTH, KVCACHE, Transport, run, run_async
from kvtier.service.client.types import GetResult, KVResult, LookupInfo, PrefetchInfo, PutInfo, ResumeInfo, StatsInfo
from kvtier.service.wire.fast import FastKVCacheStub
from kvtier.tiering.keys import BlockKey, Namespace

#: Metadata key of the bearer token (``service/server/auth.py`` reads the same key).
AUTH_METADATA = "authorization"
#: Health-check name of the service.
SERVICE_NAME = KVCACHE
#: Matches the server's default ``max_message_bytes`` (chunks are ≤ 1 MiB, so any ≥ 2 MiB works).
DEFAULT_MAX_MESSAGE_BYTES = 8 << 20


class _Client:
    """What both clients hold: the channel (of ``channels``: ``grpc`` or ``grpc.aio``), its stubs and
    transport, and the :class:`ClientCore`. Arguments as :class:`KVTierClient`'s."""

    def __init__(self, channels: ModuleType, target: str, *, timeout: float | None, tenant: str, token: str | None,
                 credentials: grpc.ChannelCredentials | None, max_message_bytes: int,
                 options: Sequence[tuple[str, object]], data_path: str) -> None:
        self._core = ClientCore(target, timeout=timeout, tenant=tenant, data_path=data_path)
        #: The server's ``host:port`` (or ``unix:`` path) and how block bytes travel, as given.
        self.target, self.data_path = target, data_path
        opts = [("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes), *options]
        self._channel = (channels.secure_channel(target, credentials, options=opts) if credentials is not None
                         else channels.insecure_channel(target, options=opts))
        self._stub = FastKVCacheStub(self._channel)  # Get/Put payloads skip protobuf (same bytes)
        metadata = ((AUTH_METADATA, f"Bearer {token}"),) if token else None
        self._transport = Transport({KVCACHE: self._stub, HEALTH: health_pb2_grpc.HealthStub(self._channel)},
                                    metadata, target)

    @property
    def timeout(self) -> float | None:
        """Default deadline in seconds of every call."""
        return self._core.timeout

    @property
    def tenant(self) -> str:
        """The client's own tenant for session calls (``""``: the credentials', or the server's default)."""
        return self._core.tenants.default

    # the link's state, for tests that look at it
    _shm = property(lambda self: self._core.link)
    _shm_tried = property(lambda self: self._core.link_tried)


class KVTierClient(_Client):
    """Blocking client. Thread-safe (gRPC channels are); use as a context manager or call :meth:`close`.

    :param target: ``host:port`` of the server.
    :param timeout: default deadline in seconds of every call (``None``: no deadline).
    :param tenant: tenant of session calls that name none and whose session this client did not put
        (``""``: the tenant of the token on a server that authenticates, else the server's default).
    :param token: bearer token sent as ``authorization`` metadata with every call (servers with auth).
    :param credentials: TLS channel credentials (insecure channel when omitted).
    :param max_message_bytes: channel send/receive limit; keep it equal to the server's.
    :param options: extra channel options.
    :param data_path: how block bytes travel: ``"auto"`` (shared memory when the target is on this
        host, ``127.0.0.1``/``localhost``/``::1``/``unix:``, and the server offers it; else the gRPC
        streams), ``"shm"`` (shared memory or an error) or ``"grpc"`` (streams only).
    :raises ValueError: for an unknown ``data_path``.

    Session calls (``get(session_id=…)``, :meth:`resume`, :meth:`prefetch`, :meth:`delete_session`)
    act for ``tenant=`` if given, else the tenant of ``namespace=`` if given, else that of the
    namespace this client last put the session under, else the client's ``tenant``.
    """

    def __init__(self, target: str, *, timeout: float | None = 60.0, tenant: str = "", token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 options: Sequence[tuple[str, object]] = (), data_path: str = "auto") -> None:
        # Get streams are read by the calling thread itself: no polling thread started (and waited on) for
        # every call that finds none running, the most of a small Get's client time (grpc's experimental
        # SingleThreadedUnaryStream; streams are read by one thread here anyway)
        options = [(grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1), *options]
        super().__init__(grpc, target, timeout=timeout, tenant=tenant, token=token, credentials=credentials,
                         max_message_bytes=max_message_bytes, options=options, data_path=data_path)

    def _link(self, timeout: float | None) -> ShmLink | None:
        """The shared-memory link, opened on first use; ``None``: use the gRPC streams."""
        return run(self._core.open_link(timeout), self._transport)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server's health check says SERVING.

        :raises KVTierClientError: ``DEADLINE_EXCEEDED`` if it does not within ``timeout`` seconds.
        """
        run(self._core.wait_ready(timeout), self._transport)

    def lookup(self, namespace: Namespace, token_ids, *, accept_lossy: bool = False,
               timeout: float | None = None) -> LookupInfo:
        """Longest cached prefix of ``token_ids`` and the tier of each of its blocks (moves no data).

        :param accept_lossy: count blocks a read would give approximate (a lossy namespace's blocks read
            back from the cold tier; :attr:`LookupInfo.lossy`); by default the prefix ends before them."""
        return run(self._core.lookup(namespace, token_ids, timeout, accept_lossy), self._transport)

    def put(self, namespace: Namespace, token_ids, blocks: Sequence[Payload], *, first_block: int = 0,
            session_id: str | None = None, durable: bool = False, priority: int = 0, ttl_seconds: float = 0.0,
            checksums: bool = True, timeout: float | None = None) -> PutInfo:
        """Store blocks ``first_block…`` of ``token_ids`` (streamed in ≤ 1 MiB chunks, or through shared memory).

        :param blocks: tensors/ndarrays of the layout's dtype and shape ``[2, L, H, t, D]`` (any device),
            or raw bytes; block ``i`` covers tokens ``[(first_block+i)*T, …)``, only the last may be partial.
        :param session_id: also record the chain of ``token_ids`` as this session (of ``namespace``'s tenant).
        :param durable: answer only once blocks and session are on disk.
        :param checksums: send each block's XXH3-64 so the server verifies it.
        :raises KVTierClientError: ``INVALID_ARGUMENT`` (locally or from the server) for a wrong dtype,
            size or count; any code the server answers with.
        """
        return run(self._core.put(namespace, token_ids, blocks, first_block=first_block, session_id=session_id,
                                  durable=durable, priority=priority, ttl_seconds=ttl_seconds, checksums=checksums,
                                  timeout=timeout), self._transport)

    def block_buffers(self, namespace: Namespace, tokens: int, *, first_block: int = 0,
                      timeout: float | None = None) -> list[torch.Tensor]:
        """Empty CPU tensors for blocks ``first_block…`` of a ``tokens``-token sequence, to produce blocks
        into and :meth:`put` (the layout's dtype and shapes; the last block may be partial).

        Through shared memory they view the client's arena, so :meth:`put` sends them without copying
        or checksumming them (the server checksums the copy it keeps). Each stays leased until it (and
        every view of it) is garbage: drop them once put. Past half the arena, with Get's blocks still
        held, or over gRPC, they are ordinary tensors. Never waits for arena space.

        :raises KVTierClientError: ``INVALID_ARGUMENT`` for a ``first_block`` past the sequence's blocks.
        """
        return run(self._core.block_buffers(namespace, tokens, first_block=first_block, timeout=timeout),
                   self._transport)

    def get(self, keys: Sequence[BlockKey] | None = None, *, session_id: str | None = None, tenant: str | None = None,
            namespace: Namespace | None = None, start_block: int = 0, max_blocks: int = 0,
            timeout: float | None = None, device: str | torch.device | None = None,
            accept_lossy: bool = False) -> GetResult:
        """Blocks of ``keys`` (prefix order) or of a session's chain, stopping at the first miss.

        :param namespace: the namespace the keys or session belong to: its tenant is the call's.
        :param accept_lossy: also take approximate blocks (a lossy namespace's blocks read back from the cold
            tier; :attr:`GetResult.lossy` says which); by default such a block is a miss and the chain stops.
        :param device: where the blocks go (``None`` or ``"cpu"``: host tensors, as they arrive). For a
            CUDA device whose GPU is the hot tier of a server on this host (shared-memory link), the
            hot blocks come by CUDA IPC, copied device to device and not checksummed again
            (``service/client/ipc.py``); the others, and every block in any other case, come the
            usual way and are moved there with ``.to(device)``.
        :returns: a :class:`GetResult`; ``len(result)`` is its number of blocks, iterating it yields them.
        :raises KVTierClientError: ``DATA_LOSS`` if a block fails its checksum (the stream is
            cancelled, nothing is returned); ``NOT_FOUND`` for an unknown session.
        """
        return run(self._core.get(keys, session_id=session_id, tenant=tenant, namespace=namespace,
                                  start_block=start_block, max_blocks=max_blocks, timeout=timeout, device=device,
                                  accept_lossy=accept_lossy), self._transport)

    def get_kv(self, keys: Sequence[BlockKey], *, namespace: Namespace, capacity: int = 0,
               timeout: float | None = None, accept_lossy: bool = False) -> KVResult:
        """Blocks of ``keys`` (prefix order, stopping at the first miss) written layer-major into one host
        tensor ``[2, layers, kv_heads, capacity, head_dim]`` of ``namespace``'s layout, each verified on
        the bytes written there: the K/V tensors an attention cache takes as views (no concatenation).

        Over shared memory the server scatters the blocks straight into the client's arena (the range
        stays leased while the tensor or a view of it lives, within the link's alias budget; past it, and
        without shared memory, the client scatters the Get stream's blocks into a fresh tensor).

        :param capacity: tokens of the tensor (default: ``len(keys)`` full blocks; never fewer): the
            rest is room a cache can grow into without copying.
        :raises KVTierClientError: ``DATA_LOSS`` if a block fails its checksum (nothing is returned);
            ``INVALID_ARGUMENT`` for a capacity below the blocks or blocks of another layout.
        """
        return run(self._core.get_kv(keys, namespace=namespace, capacity=capacity, timeout=timeout,
                                     accept_lossy=accept_lossy), self._transport)

    def resume(self, session_id: str, *, tenant: str | None = None, namespace: Namespace | None = None,
               prefetch_budget_ms: int = 0, timeout: float | None = None, accept_lossy: bool = False) -> ResumeInfo:
        """A session's manifest; the server starts moving its blocks to the top tier.

        :param accept_lossy: count approximate blocks in ``cached_blocks`` (:attr:`ResumeInfo.lossy`).
        :raises KVTierClientError: ``NOT_FOUND`` if there is no such session.
        """
        return run(self._core.resume(session_id, tenant=tenant, namespace=namespace,
                                     prefetch_budget_ms=prefetch_budget_ms, timeout=timeout,
                                     accept_lossy=accept_lossy), self._transport)

    def prefetch(self, keys: Sequence[BlockKey] | None = None, *, session_id: str | None = None,
                 tenant: str | None = None, namespace: Namespace | None = None, budget_ms: int = 0, wait: bool = False,
                 timeout: float | None = None) -> PrefetchInfo:
        """Move blocks (or a session's blocks) up to the top tier; with ``wait``, answer when done."""
        return run(self._core.prefetch(keys, session_id=session_id, tenant=tenant, namespace=namespace,
                                       budget_ms=budget_ms, wait=wait, timeout=timeout), self._transport)

    def delete_session(self, session_id: str, *, tenant: str | None = None, namespace: Namespace | None = None,
                       erase_blocks: bool = False, timeout: float | None = None) -> int:
        """Forget a session (``erase_blocks``: also erase its blocks everywhere). Returns copies erased."""
        return run(self._core.delete_session(session_id, tenant=tenant, namespace=namespace, erase_blocks=erase_blocks,
                                             timeout=timeout), self._transport)

    def invalidate(self, namespace: Namespace | None = None, *, model: str | None = None, revision: str = "",
                   tenant: str | None = None, timeout: float | None = None) -> int:
        """Delete every block and session of a namespace, or of a model (one revision or all).

        :returns: block copies deleted across tiers.
        """
        return run(self._core.invalidate(namespace, model=model, revision=revision, tenant=tenant, timeout=timeout),
                   self._transport)

    def stats(self, *, timeout: float | None = None) -> StatsInfo:
        """Per-tier usage and counters."""
        return run(self._core.stats(timeout), self._transport)

    def close(self) -> None:
        """Close the channel and the shared-memory link, if any (idempotent)."""
        self._core.close_link()
        self._channel.close()

    def __enter__(self) -> "KVTierClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncKVTierClient(_Client):
    """``grpc.aio`` client: the methods of :class:`KVTierClient` as coroutines, same arguments and results.

    Create and use it inside one running event loop; ``async with`` closes it. Checksums are
    computed and verified on the loop thread (XXH3 runs at several GB/s). ``data_path`` as for
    :class:`KVTierClient`: on the same host, puts and gets go through a shared-memory arena, and a
    call waiting for a free range of it never blocks the loop; ``get(..., device=…)`` copies CUDA IPC
    blocks on a worker thread.
    """

    def __init__(self, target: str, *, timeout: float | None = 60.0, tenant: str = "", token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 options: Sequence[tuple[str, object]] = (), data_path: str = "auto") -> None:
        super().__init__(grpc.aio, target, timeout=timeout, tenant=tenant, token=token, credentials=credentials,
                         max_message_bytes=max_message_bytes, options=options, data_path=data_path)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """See :meth:`KVTierClient.wait_ready`."""
        await run_async(self._core.wait_ready(timeout), self._transport)

    async def lookup(self, namespace: Namespace, token_ids, *, accept_lossy: bool = False,
                     timeout: float | None = None) -> LookupInfo:
        """See :meth:`KVTierClient.lookup`."""
        return await run_async(self._core.lookup(namespace, token_ids, timeout, accept_lossy), self._transport)

    async def put(self, namespace: Namespace, token_ids, blocks: Sequence[Payload], *, first_block: int = 0,
                  session_id: str | None = None, durable: bool = False, priority: int = 0, ttl_seconds: float = 0.0,
                  checksums: bool = True, timeout: float | None = None) -> PutInfo:
        """See :meth:`KVTierClient.put`."""
        return await run_async(self._core.put(
            namespace, token_ids, blocks, first_block=first_block, session_id=session_id, durable=durable,
            priority=priority, ttl_seconds=ttl_seconds, checksums=checksums, timeout=timeout), self._transport)

    async def block_buffers(self, namespace: Namespace, tokens: int, *, first_block: int = 0,
                            timeout: float | None = None) -> list[torch.Tensor]:
        """See :meth:`KVTierClient.block_buffers`."""
        return await run_async(self._core.block_buffers(namespace, tokens, first_block=first_block, timeout=timeout),
                               self._transport)

    async def get(self, keys: Sequence[BlockKey] | None = None, *, session_id: str | None = None,
                  tenant: str | None = None, namespace: Namespace | None = None, start_block: int = 0,
                  max_blocks: int = 0, timeout: float | None = None,
                  device: str | torch.device | None = None, accept_lossy: bool = False) -> GetResult:
        """See :meth:`KVTierClient.get` (``device`` included)."""
        return await run_async(self._core.get(
            keys, session_id=session_id, tenant=tenant, namespace=namespace, start_block=start_block,
            max_blocks=max_blocks, timeout=timeout, device=device, accept_lossy=accept_lossy), self._transport)

    async def resume(self, session_id: str, *, tenant: str | None = None, namespace: Namespace | None = None,
                     prefetch_budget_ms: int = 0, timeout: float | None = None,
                     accept_lossy: bool = False) -> ResumeInfo:
        """See :meth:`KVTierClient.resume`."""
        return await run_async(self._core.resume(
            session_id, tenant=tenant, namespace=namespace, prefetch_budget_ms=prefetch_budget_ms,
            timeout=timeout, accept_lossy=accept_lossy), self._transport)

    async def get_kv(self, keys: Sequence[BlockKey], *, namespace: Namespace, capacity: int = 0,
                     timeout: float | None = None, accept_lossy: bool = False) -> KVResult:
        """See :meth:`KVTierClient.get_kv`."""
        return await run_async(self._core.get_kv(keys, namespace=namespace, capacity=capacity, timeout=timeout,
                                                 accept_lossy=accept_lossy), self._transport)

    async def prefetch(self, keys: Sequence[BlockKey] | None = None, *, session_id: str | None = None,
                       tenant: str | None = None, namespace: Namespace | None = None, budget_ms: int = 0,
                       wait: bool = False, timeout: float | None = None) -> PrefetchInfo:
        """See :meth:`KVTierClient.prefetch`."""
        return await run_async(self._core.prefetch(
            keys, session_id=session_id, tenant=tenant, namespace=namespace, budget_ms=budget_ms, wait=wait,
            timeout=timeout), self._transport)

    async def delete_session(self, session_id: str, *, tenant: str | None = None, namespace: Namespace | None = None,
                             erase_blocks: bool = False, timeout: float | None = None) -> int:
        """See :meth:`KVTierClient.delete_session`."""
        return await run_async(self._core.delete_session(
            session_id, tenant=tenant, namespace=namespace, erase_blocks=erase_blocks, timeout=timeout),
            self._transport)

    async def invalidate(self, namespace: Namespace | None = None, *, model: str | None = None, revision: str = "",
                         tenant: str | None = None, timeout: float | None = None) -> int:
        """See :meth:`KVTierClient.invalidate`."""
        return await run_async(self._core.invalidate(
            namespace, model=model, revision=revision, tenant=tenant, timeout=timeout), self._transport)

    async def stats(self, *, timeout: float | None = None) -> StatsInfo:
        """See :meth:`KVTierClient.stats`."""
        return await run_async(self._core.stats(timeout), self._transport)

    async def close(self) -> None:
        """Close the channel and the shared-memory link, if any (idempotent)."""
        self._core.close_link()
        await self._channel.close()

    async def __aenter__(self) -> "AsyncKVTierClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
