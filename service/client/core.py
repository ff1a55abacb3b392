"""The one client core, sans-IO: every kvtier RPC of the clients written once, as steps.

:class:`ClientCore` holds what a client knows between calls (deadline default, the session tenants, the
shared-memory link and whether to try one) and turns each public call into a generator of steps
(``service/client/steps.py``). :class:`~kvtier.service.client.client.KVTierClient` runs them with the
blocking driver, :class:`~kvtier.service.client.client.AsyncKVTierClient` with the asyncio one, so the
two clients share every line of behaviour. Imports wire/, the client's modules and tiering's vocabulary.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import grpc
import torch
from grpc_health.v1 import health_pb2

from kvtier.service.client import ipc as ipc_client
from kvtier.service.client import requests as cp
from kvtier.service.client.blockwire import (GetAssembler, Payload, block_shapes, check_payload_count, payload_view,
                                             put_requests)
from kvtier.service.client.kvget import KVAssembler, kv_capacity
from kvtier.service.client.shm import ShmLink, is_local_target
from kvtier.service.client.steps import HEALTH, KVCACHE, Steps, Stream, Unary, Wait
from kvtier.service.client.tenants import SessionTenants
from kvtier.service.client.types import TORCH_DTYPES, KVTierClientError
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.tiering.keys import BlockKey, Namespace
from kvtier.tiering.layout import blocks_for

#: Values of ``data_path``: pick by target, shared memory only, gRPC streams only.
DATA_PATHS = ("auto", "shm", "grpc")
#: Seconds between looks while another call opens the shared-memory link.
OPEN_POLL_S = 0.01

log = logging.getLogger(__name__)


class ClientCore:
    """State and steps of one client. Thread-safe: state changes under one lock never held across a step.

    :param target: ``host:port`` (or ``unix:`` path) of the server.
    :param timeout: default deadline in seconds of every call (``None``: no deadline).
    :param tenant: the client's tenant for session calls (:class:`SessionTenants`).
    :param data_path: ``"auto"``, ``"shm"`` or ``"grpc"`` (see :class:`KVTierClient`).
    :raises ValueError: for an unknown ``data_path``.
    """

    def __init__(self, target: str, *, timeout: float | None, tenant: str, data_path: str) -> None:
        if data_path not in DATA_PATHS:
            raise ValueError(f"data_path must be one of {DATA_PATHS}, not {data_path!r}")
        self.target = target
        self.timeout = timeout
        self.data_path = data_path
        self.tenants = SessionTenants(tenant)
        #: The shared-memory link once open; ``link_tried``: whether to stop trying to open one.
        self.link: ShmLink | None = None
        self.link_tried = data_path == "grpc" or (data_path == "auto" and not is_local_target(target))
        self._state = threading.Condition()
        self._opening = False
        #: the server said (PutResponse.accepts_first_chunk) that a Put's first chunk may ride in its header
        self.put_first_chunk = False

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    # -- the shared-memory link ------------------------------------------------------------------
    def open_link(self, timeout: float | None) -> Steps:
        """Steps giving the shared-memory link, opened on first use; ``None``: use the gRPC streams.

        In ``auto`` mode a server without shared memory (or an unreachable arena socket) is noted once
        and the streams are used from then on; in ``shm`` mode that raises (``UNAVAILABLE`` for a
        socket error), and the next call tries again. Concurrent first calls open one link between them.
        """
        while True:
            with self._state:
                if self.link is not None or self.link_tried:
                    return self.link
                if not self._opening:
                    self._opening = True
                    break
            yield Wait(OPEN_POLL_S, self._state)
        link, failure, opened = None, None, False
        try:
            link = yield from ShmLink.open(self._timeout(timeout))
            opened = True
        except (KVTierClientError, OSError) as exc:
            failure = exc
        finally:  # also when the call is cancelled mid-way: then nothing is decided
            with self._state:
                self._opening = False
                if opened and self.link_tried:  # the client was closed meanwhile
                    link.close()
                    link = None
                elif opened or (failure is not None and self.data_path != "shm"):
                    self.link, self.link_tried = link, True
                self._state.notify_all()
        if failure is not None:
            self._no_link(failure)
        return link

    def _no_link(self, exc: Exception) -> None:
        """Opening the link failed with ``exc``: raise it in ``shm`` mode, else note it."""
        if self.data_path == "shm":
            if isinstance(exc, KVTierClientError):
                raise exc
            raise KVTierClientError(grpc.StatusCode.UNAVAILABLE, f"shared-memory arena unreachable: {exc}") from None
        log.debug("shared memory not available from %s (%s); using the gRPC streams", self.target, exc)

    def _over_link(self, link: ShmLink, steps: Callable[[ShmLink], Steps], timeout: float | None) -> Steps:
        """``steps(link)``; after FAILED_PRECONDITION (the server forgot the arena: it restarted, or
        reclaimed it) once more over a new link."""
        try:
            return (yield from steps(link))
        except KVTierClientError as exc:
            if exc.code != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            with self._state:
                if self.link is link:
                    link.close()
                    self.link, self.link_tried = None, False
            if (link := (yield from self.open_link(timeout))) is None:
                raise
        return (yield from steps(link))

    def close_link(self) -> None:
        """Close the link, if any, and open none from now on (idempotent)."""
        with self._state:
            if self.link is not None:
                self.link.close()
                self.link = None
            self.link_tried = True

    # -- the RPCs ----------------------------------------------------------------------------------
    def wait_ready(self, timeout: float) -> Steps:
        """Steps until the server's health check says SERVING.

        :raises KVTierClientError: ``DEADLINE_EXCEEDED`` if it does not within ``timeout`` seconds.
        """
        end = time.monotonic() + timeout
        last = "no answer"
        while (left := end - time.monotonic()) > 0:
            try:
                resp = yield Unary("Check", health_pb2.HealthCheckRequest(service=KVCACHE), min(left, 5.0),
                                   service=HEALTH, wait_for_ready=True)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except KVTierClientError as exc:
                last = f"{exc.code.name}: {exc.details}"
            yield Wait(min(0.05, max(end - time.monotonic(), 0)))
        raise KVTierClientError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"{self.target} not serving after {timeout:.1f} s ({last})")

    def lookup(self, namespace: Namespace, token_ids, timeout: float | None, accept_lossy: bool = False) -> Steps:
        """Steps of :meth:`KVTierClient.lookup`."""
        req = cp.lookup_request(namespace, token_ids, accept_lossy)
        return cp.lookup_info((yield Unary("Lookup", req, self._timeout(timeout))))

    def put(self, namespace: Namespace, token_ids, blocks: Sequence[Payload], *, first_block: int,
            session_id: str | None, durable: bool, priority: int, ttl_seconds: float, checksums: bool,
            timeout: float | None) -> Steps:
        """Steps of :meth:`KVTierClient.put`: validated locally (payload views are taken before any call),
        then through the link if any, else as one Put stream."""
        check_payload_count(blocks, blocks_for(len(token_ids), namespace.layout.block_tokens), first_block)
        views = [payload_view(b, namespace.layout.dtype, first_block + i) for i, b in enumerate(blocks)]
        header = cp.put_header(namespace, token_ids, first_block=first_block, block_count=len(views),
                               session_id=session_id, durable=durable, priority=priority, ttl_seconds=ttl_seconds)
        deadline = self._timeout(timeout)
        if (link := (yield from self.open_link(timeout))) is not None:
            resp = yield from self._over_link(link, lambda lk: lk.put(header, views, deadline), timeout)
        else:
            resp = yield from self._put_stream(header, views, checksums, deadline)
        self.tenants.remember(session_id, namespace)
        return cp.put_info(resp)

    def block_buffers(self, namespace: Namespace, tokens: int, *, first_block: int, timeout: float | None) -> Steps:
        """Steps of :meth:`KVTierClient.block_buffers`: leased in the link's arena if there is one
        (:meth:`ShmLink.buffers`), else ordinary tensors."""
        shapes = block_shapes(namespace.layout, tokens, first_block)
        dtype = TORCH_DTYPES[namespace.layout.dtype]
        if (link := (yield from self.open_link(timeout))) is not None:
            return link.buffers(shapes, dtype)
        return [torch.empty(shape, dtype=dtype) for shape in shapes]

    def _put_stream(self, header: pb.PutHeader, views: Sequence[memoryview], checksums: bool,
                    deadline: float | None) -> Steps:
        """Steps of one Put stream; the first chunk rides in the header's message once the server said it
        reads that. A server that stops reading it (an older one behind the same address) refuses the
        Put as INVALID_ARGUMENT: it is sent once more the long way, which is then kept."""
        first = self.put_first_chunk
        try:
            resp = yield Unary("Put", put_requests(header, views, with_checksums=checksums, first_chunk=first),
                               deadline)
        except KVTierClientError as exc:
            if not first or exc.code is not grpc.StatusCode.INVALID_ARGUMENT:
                raise
            self.put_first_chunk = False
            resp = yield Unary("Put", put_requests(header, views, with_checksums=checksums), deadline)
        self.put_first_chunk = resp.accepts_first_chunk
        return resp

    def get(self, keys: Sequence[BlockKey] | None, *, session_id: str | None, tenant: str | None,
            namespace: Namespace | None, start_block: int, max_blocks: int, timeout: float | None,
            device: str | torch.device | None, accept_lossy: bool = False) -> Steps:
        """Steps of :meth:`KVTierClient.get`."""
        req = cp.get_request(keys, session_id, self.tenants.resolve(session_id, tenant, namespace), start_block,
                             max_blocks, accept_lossy)
        if device is None or torch.device(device).type == "cpu":
            return (yield from self.fetch(req, timeout))
        link = (yield from self.open_link(timeout)) if ipc_client.cuda_device(device) is not None else None
        return (yield from ipc_client.get_on_device_steps(self._timeout(timeout), link, req, torch.device(device),
                                                          self.fetch))

    def fetch(self, req: pb.GetRequest, timeout: float | None) -> Steps:
        """Steps of a get of a built request, on the host: through the link if any, else the Get stream."""
        if (link := (yield from self.open_link(timeout))) is not None:
            deadline = self._timeout(timeout)
            return (yield from self._over_link(link, lambda lk: lk.get(req, deadline), timeout))
        asm = GetAssembler()
        stream_req = pb.GetRequest()
        stream_req.CopyFrom(req)
        stream_req.inline_data = True  # the assembler reads a block's bytes in its header's message
        yield Stream("Get", stream_req, self._timeout(timeout), asm.feed)
        return asm.result()

    def get_kv(self, keys: Sequence[BlockKey], *, namespace: Namespace, capacity: int, timeout: float | None,
               accept_lossy: bool = False) -> Steps:
        """Steps of :meth:`KVTierClient.get_kv`: scattered by the server into the arena when the link's
        alias budget holds the destination, else by the client from the Get stream."""
        lay = namespace.layout
        capacity = kv_capacity(lay, len(keys), capacity)
        req = cp.get_request(list(keys), None, self.tenants.resolve(None, None, namespace), 0, 0, accept_lossy)
        kv_bytes = lay.block_bytes(1) * capacity  # a destination holds `capacity` tokens of the layout
        link = yield from self.open_link(timeout)
        if link is not None and link.holds_kv(kv_bytes) and link.slots.fits_ever(kv_bytes):
            deadline = self._timeout(timeout)
            return (yield from self._over_link(link, lambda lk: lk.get_kv(req, lay, capacity, deadline), timeout))
        asm = KVAssembler(lay, capacity)
        yield Stream("Get", req, self._timeout(timeout), asm.feed)
        return asm.result()

    def resume(self, session_id: str, *, tenant: str | None, namespace: Namespace | None, prefetch_budget_ms: int,
               timeout: float | None, accept_lossy: bool = False) -> Steps:
        """Steps of :meth:`KVTierClient.resume`."""
        req = pb.ResumeRequest(tenant=self.tenants.resolve(session_id, tenant, namespace), session_id=session_id,
                               prefetch_budget_ms=prefetch_budget_ms, accept_lossy=accept_lossy)
        return cp.resume_info((yield Unary("Resume", req, self._timeout(timeout))))

    def prefetch(self, keys: Sequence[BlockKey] | None, *, session_id: str | None, tenant: str | None,
                 namespace: Namespace | None, budget_ms: int, wait: bool, timeout: float | None) -> Steps:
        """Steps of :meth:`KVTierClient.prefetch`."""
        req = cp.prefetch_request(keys, session_id, self.tenants.resolve(session_id, tenant, namespace), budget_ms,
                                  wait)
        return cp.prefetch_info((yield Unary("Prefetch", req, self._timeout(timeout))))

    def delete_session(self, session_id: str, *, tenant: str | None, namespace: Namespace | None,
                       erase_blocks: bool, timeout: float | None) -> Steps:
        """Steps of :meth:`KVTierClient.delete_session`."""
        tenant = self.tenants.resolve(session_id, tenant, namespace)
        req = pb.DeleteSessionRequest(tenant=tenant, session_id=session_id, erase_blocks=erase_blocks)
        erased = (yield Unary("DeleteSession", req, self._timeout(timeout))).blocks_erased
        self.tenants.forget(session_id, tenant)
        return erased

    def invalidate(self, namespace: Namespace | None, *, model: str | None, revision: str, tenant: str | None,
                   timeout: float | None) -> Steps:
        """Steps of :meth:`KVTierClient.invalidate`."""
        req = cp.invalidate_request(namespace, model, revision, self.tenants.default if tenant is None else tenant)
        return (yield Unary("Invalidate", req, self._timeout(timeout))).blocks_deleted

    def stats(self, timeout: float | None) -> Steps:
        """Steps of :meth:`KVTierClient.stats`."""
        return cp.stats_info((yield Unary("Stats", pb.StatsRequest(), self._timeout(timeout))))
