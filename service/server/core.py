"""ServerCore: what every KVCache handler needs, as one small explicit interface.

May import ``service.wire``, ``service.server`` (auth, chain, door, errors, put_assembly, quota) and ``tiering``.

The servicer (``service/server/servicer.py``) and the same-host handlers (``shm_rpc.py``, ``ipc.py``)
share this object and nothing else of each other: who is calling, the chain a Get-shaped request
reads (``chain.py``), a Put's plan at the door and its commit (written once, for ``Put`` and
``PutShm``), and the Put stream limits. Thread-safety: :meth:`ServerCore.commit_put` blocks and runs
on a worker thread; everything else runs on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from kvtier.service.server import chain, door
from kvtier.service.server.auth import Authenticator, Principal
from kvtier.service.server.put_assembly import PutPlan, next_message, plan_from_header
from kvtier.service.server.quota import Limits, PutBudget
from kvtier.service.wire import convert
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.tiering.errors import InvalidBlock, SessionNotFound
from kvtier.tiering.results import PutResult
from kvtier.tiering.store import TieredStore
from kvtier.tiering.layout import blocks_for


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the principal its credentials name (``None`` without auth) and the tenant they
    bind it to (``None``: it may name one)."""

    principal: Principal | None
    bound: str | None

    @classmethod
    def of(cls, principal: Principal | None) -> "Caller":
        """The caller ``principal`` is (bound to its tenant, if it has one)."""
        return cls(principal, principal.tenant if principal is not None else None)

    def tenant(self, requested: str) -> str:
        """The tenant a request naming ``requested`` acts for (``convert.tenant_of``).

        :raises InvalidBlock: if it names another tenant than its credentials, or a bad one.
        """
        return convert.tenant_of(requested, self.bound)


class ServerCore:
    """The store and the limits, as the handlers use them.

    :param store: the engine (never closed here).
    :param auth: who may call (no tokens: everyone, as the tenant the request names).
    :param limits: per-request and per-tenant limits.
    :param puts: the Put stream limits (open streams per tenant, declared bytes server-wide).
    :param max_put_bytes: payload bytes one Put may declare (0 = no limit).
    :param max_message_bytes: the server's message size limit; a chain whose replies would not fit is
        refused at the door (0 = no check).
    :param stream_idle_s: seconds a Put stream may stay silent before it is closed (0 = no limit).
    """

    def __init__(self, store: TieredStore, *, auth: Authenticator | None = None, limits: Limits | None = None,
                 puts: PutBudget | None = None, max_put_bytes: int = 0, max_message_bytes: int = 0,
                 stream_idle_s: float = 0, lossy_codecs: dict[str, list[str]] | None = None) -> None:
        self.store = store
        self.lossy_codecs = lossy_codecs or {}
        self.auth = auth or Authenticator()
        self.limits = limits or Limits()
        self.puts = puts or PutBudget()
        self.max_put_bytes = max_put_bytes
        self.max_message_bytes = max_message_bytes
        self.stream_idle_s = stream_idle_s

    def caller(self, context: grpc.aio.ServicerContext) -> Caller:
        """The caller of an RPC.

        :raises Unauthenticated: when tokens are configured and the call has none, or an unknown one.
        """
        return Caller.of(self.auth.authenticate(context.invocation_metadata()))

    # -- reads -----------------------------------------------------------------------------------------
    async def target_keys(self, request, tenant: str, rpc: str):
        """:func:`service.server.chain.target_keys` over this store and limits."""
        return await chain.target_keys(self.store, self.limits, request, tenant, rpc)

    async def read_chain(self, request: pb.GetRequest, tenant: str, rpc: str = "Get") -> chain.ChainRead:
        """:func:`service.server.chain.read_chain` over this store and limits."""
        return await chain.read_chain(self.store, self.limits, request, tenant, rpc)

    def check_chain(self, n_blocks: int, rpc: str) -> None:
        """:raises QuotaExceeded: if a chain of ``n_blocks`` is over the request limit or its replies' size."""
        self.limits.check_blocks(n_blocks, rpc)
        door.check_chain(n_blocks, self.max_message_bytes, rpc)

    # -- puts ------------------------------------------------------------------------------------------
    def plan_put(self, header: pb.PutHeader, caller: Caller) -> PutPlan:
        """A ``PutHeader`` validated at the door (``put_assembly.plan_from_header``) and against the
        per-request block limit.

        :raises InvalidBlock: naming the bad field. :raises QuotaExceeded: naming the limit.
        """
        plan = plan_from_header(header, caller.tenant(header.namespace.tenant), max_bytes=self.max_put_bytes,
                                max_message_bytes=self.max_message_bytes)
        self.limits.check_blocks(blocks_for(len(plan.token_ids), plan.namespace.layout.block_tokens), "Put")
        self.check_codec(plan.namespace, "header.namespace.cold_codec")
        return plan

    def check_codec(self, ns, field: str = "namespace.cold_codec") -> None:
        """:raises InvalidBlock: naming ``field`` and the setting, if ``ns`` chooses a lossy cold codec
        that ``[store] lossy_codecs`` does not allow for its tenant."""
        if not ns.cold_codec:
            return
        allowed = self.lossy_codecs.get(ns.tenant, []) + self.lossy_codecs.get("*", [])
        if ns.cold_codec in allowed or ns.cold_codec.partition("/")[0] in allowed:
            return
        raise InvalidBlock(f"{field} {ns.cold_codec!r} is not allowed for tenant {ns.tenant!r}: the server's "
                           f"[store] lossy_codecs setting must list it for the tenant (or \"*\"), e.g. "
                           f"lossy_codecs = {{\"{ns.tenant}\" = [\"{ns.cold_codec.partition('/')[0]}\"]}}",
                           field=field)

    async def next_message(self, stream):
        """The next message of a Put stream, ``None`` at its end (``put_assembly.next_message``).

        :raises StreamIdle: after ``stream_idle_s`` seconds of silence.
        """
        return await next_message(stream, self.stream_idle_s)

    def commit_put(self, plan: PutPlan, blocks: Sequence, *, checksums: Sequence[int | None] | None = None,
                   owned: bool = False) -> PutResult:
        """Store a Put's blocks: quotas against the real byte count, then one ``store.put`` for the
        whole Put (so an error leaves nothing of it). Blocking: call it on a worker thread.

        :param checksums: the XXH3-64 of each block (``None``: none sent), checked on the store's own copy
            (``PutShm``).
        :param owned: the blocks are ``bytearray`` s or flat ``uint8`` arrays nobody else holds (``Put``'s
            assembler, in the store's host pool): no copy.
        :raises QuotaExceeded: over the tenant's byte quota (after shedding its own memory blocks) or its
            session quota. Store errors pass through.
        """
        tenant = plan.namespace.tenant
        new_session = plan.session_id is not None and self._is_new_session(tenant, plan.session_id)
        with self.limits.admit_put(self.store, tenant, sum(len(b) for b in blocks), new_session):
            return self.store.put(plan.namespace, plan.token_ids, blocks, first_block=plan.first_block,
                                  session_id=plan.session_id, durable=plan.durable, priority=plan.priority,
                                  ttl_s=plan.ttl_s, checksums=checksums, owned=owned)

    def _is_new_session(self, tenant: str, session_id: str) -> bool:
        if not self.limits.max_sessions_per_tenant:
            return False
        try:
            self.store.get_session(tenant, session_id)
        except SessionNotFound:
            return True
        return False
