"""Per-request and per-tenant limits: each breach is ``RESOURCE_EXHAUSTED`` with ``QuotaFailure``.

=============================  =================================================================
setting (``security.``)        limit (0 = none)
=============================  =================================================================
``max_blocks_per_request``     blocks of the chain a Put, Lookup, Get or Prefetch names
``tenant_memory_bytes``        bytes a tenant holds in the memory tiers (hot + warm)
``tenant_cold_bytes``          bytes a tenant holds in the cold tier (record footprints)
``max_sessions_per_tenant``    sessions of a tenant
=============================  =================================================================

Byte quotas are admission checks before a Put reaches the store: a Put is refused when the tenant's
current bytes in a tier plus the raw bytes it carries would exceed that tier's quota (for the cold
tier this is conservative: records are compressed). Puts of one tenant running at the same moment,
and blocks still queued for the disk writer, are not counted against each other, so a tenant can
overshoot by that much. A tenant over quota frees room with DeleteSession(erase_blocks) or Invalidate.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.tiering.errors import CapacityExceeded


class QuotaExceeded(CapacityExceeded):
    """A per-request or per-tenant limit was hit.

    :ivar subject: the ``QuotaFailure.Violation.subject``, e.g. ``tenant:acme:cold_bytes``.
    """

    def __init__(self, message: str, *, subject: str) -> None:
        super().__init__(message)
        self.subject = subject


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits in force (0 = unlimited). Immutable; thread-safe."""

    max_blocks_per_request: int = 0
    tenant_memory_bytes: int = 0
    tenant_cold_bytes: int = 0
    max_sessions_per_tenant: int = 0

    def check_blocks(self, n: int, rpc: str) -> None:
        """:raises QuotaExceeded: if a request names more than ``max_blocks_per_request`` blocks."""
        if self.max_blocks_per_request and n > self.max_blocks_per_request:
            raise QuotaExceeded(f"{rpc} names {n} blocks; at most {self.max_blocks_per_request} per request "
                                "(page with start_block/max_blocks, or split the put)",
                                subject="request:blocks")

    def check_put(self, store, tenant: str, nbytes: int, new_session: bool) -> None:
        """Admission of a Put of ``nbytes`` raw bytes by ``tenant`` (blocking: call it off the loop).

        :param new_session: the Put creates a session that does not exist yet.
        :raises QuotaExceeded: naming the tenant and the exhausted quota.
        """
        if self.tenant_memory_bytes or self.tenant_cold_bytes:
            usage = store.tenant_usage(tenant)
            for tier, quota in (("memory", self.tenant_memory_bytes), ("cold", self.tenant_cold_bytes)):
                if quota and nbytes and usage[tier] + nbytes > quota:
                    raise QuotaExceeded(f"tenant's {tier} quota: {usage[tier]} + {nbytes} bytes exceed {quota}",
                                        subject=f"tenant:{tenant}:{tier}_bytes")
        if self.max_sessions_per_tenant and new_session:
            if store.session_count(tenant) >= self.max_sessions_per_tenant:
                raise QuotaExceeded(f"tenant has {self.max_sessions_per_tenant} sessions, the most allowed; "
                                    "delete one first", subject=f"tenant:{tenant}:sessions")
