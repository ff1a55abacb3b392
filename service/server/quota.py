"""Per-request, per-tenant and server-wide limits: each breach is ``RESOURCE_EXHAUSTED`` with ``QuotaFailure``.

May import ``service.server.errors`` only (and the store, passed in, for usage counts).

=====================================  ===========================================================
setting                                limit (0 = none)                          subject
=====================================  ===========================================================
``security.max_blocks_per_request``    blocks of the chain a Put, Lookup, Get    ``request:blocks``
                                       or Prefetch names
``security.tenant_memory_bytes``       bytes a tenant holds in hot + warm        ``tenant:<t>:memory_bytes``
``security.tenant_cold_bytes``         bytes a tenant holds in the cold tier     ``tenant:<t>:cold_bytes``
``security.max_sessions_per_tenant``   sessions of a tenant                      ``tenant:<t>:sessions``
``server.max_open_puts_per_tenant``    Put streams of a tenant open at once      ``tenant:<t>:open_puts``
``server.put_pending_bytes``           payload bytes all open Put streams may    ``server:put_pending_bytes``
                                       declare together
=====================================  ===========================================================

Byte quotas are hard admission checks before a Put reaches the store (:meth:`Limits.admit_put`): the
tenant's current bytes in a tier, plus the raw bytes of its Puts admitted and still running (reserved
under one lock, so concurrent Puts cannot overshoot together), plus the raw bytes this Put carries
must fit that tier's quota (for the cold tier this is conservative: records are compressed). A tenant
at its memory quota first sheds its OWN least valuable unpinned blocks from memory (to disk in
write-back; in write-through they are there already) and is refused only when that cannot make room.
Blocks still queued for the disk writer are not counted in the cold usage until committed. A tenant
over its cold quota frees room with DeleteSession(erase_blocks) or Invalidate.

The two stream limits (:class:`PutBudget`) are what keeps one caller from exhausting the server for
everyone: a tenant's idle half-open Puts take at most ``max_open_puts_per_tenant`` of the server's
``max_concurrent_rpcs``, and headers declaring huge blocks reserve budget, not memory (the assembler
allocates as bytes arrive), so a few 40-byte headers cannot commit the server to gigabytes.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from kvtier.service.server.errors import QuotaExceeded


class Reservations:
    """Raw bytes of each tenant's admitted Puts still running, and the lock admissions take."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: Counter[str] = Counter()


@dataclass(frozen=True, slots=True)
class Limits:
    """The per-request and per-tenant limits in force (0 = unlimited). Immutable but for the byte
    reservations of running Puts; thread-safe."""

    max_blocks_per_request: int = 0
    tenant_memory_bytes: int = 0
    tenant_cold_bytes: int = 0
    max_sessions_per_tenant: int = 0
    #: bytes of admitted, unfinished Puts per tenant (shared by copies of these limits)
    reserved: Reservations = field(default_factory=lambda: Reservations(), compare=False, repr=False)

    def check_blocks(self, n: int, rpc: str) -> None:
        """:raises QuotaExceeded: if a request names more than ``max_blocks_per_request`` blocks."""
        if self.max_blocks_per_request and n > self.max_blocks_per_request:
            raise QuotaExceeded(f"{rpc} names {n} blocks; at most {self.max_blocks_per_request} per request "
                                "(page with start_block/max_blocks, or split the put)",
                                subject="request:blocks")

    @contextlib.contextmanager
    def admit_put(self, store, tenant: str, nbytes: int, new_session: bool) -> Iterator[None]:
        """Admit a Put of ``nbytes`` raw bytes by ``tenant`` and hold its bytes against the tenant's
        quotas until the block ends (run the ``store.put`` inside it). Blocking: call it off the loop.

        :param new_session: the Put creates a session that does not exist yet.
        :raises QuotaExceeded: naming the tenant and the exhausted quota; nothing is held then.
        """
        with self.reserved.lock:
            self.check_put(store, tenant, nbytes, new_session, running=self.reserved.held[tenant])
            self.reserved.held[tenant] += nbytes
        try:
            yield
        finally:
            with self.reserved.lock:
                self.reserved.held[tenant] -= nbytes
                if not self.reserved.held[tenant]:
                    del self.reserved.held[tenant]

    def check_put(self, store, tenant: str, nbytes: int, new_session: bool, running: int = 0) -> None:
        """Admission of a Put of ``nbytes`` raw bytes by ``tenant``, with ``running`` bytes of its Puts
        admitted and not finished (:meth:`admit_put` holds the lock that makes this a hard limit). Over
        the memory quota, the tenant's own blocks are shed first (``store.shed``).

        :raises QuotaExceeded: naming the tenant and the exhausted quota.
        """
        if nbytes and (self.tenant_memory_bytes or self.tenant_cold_bytes):
            usage = store.tenant_usage(tenant)
            over = usage["memory"] + running + nbytes - self.tenant_memory_bytes
            if self.tenant_memory_bytes and over > 0 and nbytes + running <= self.tenant_memory_bytes:
                store.shed(tenant, over)  # its own least valuable blocks make room, not the Put's refusal
                usage = store.tenant_usage(tenant)
            for tier, quota in (("memory", self.tenant_memory_bytes), ("cold", self.tenant_cold_bytes)):
                if quota and usage[tier] + running + nbytes > quota:
                    raise QuotaExceeded(f"tenant's {tier} quota: {usage[tier]} held + {running} being put + "
                                        f"{nbytes} bytes exceed {quota}", subject=f"tenant:{tenant}:{tier}_bytes")
        if self.max_sessions_per_tenant and new_session:
            if store.session_count(tenant) >= self.max_sessions_per_tenant:
                raise QuotaExceeded(f"tenant has {self.max_sessions_per_tenant} sessions, the most allowed; "
                                    "delete one first", subject=f"tenant:{tenant}:sessions")


class PutBudget:
    """Put streams open per tenant, and payload bytes declared by all open Put streams together.

    :param max_open_per_tenant: Put streams one tenant may have open at once (0 = no limit).
    :param max_pending_bytes: bytes the headers of all open Puts may declare together (0 = no limit);
        a single Put declaring more than this is refused too.

    Use it on the event loop only (not thread-safe; nothing here blocks).
    """

    def __init__(self, max_open_per_tenant: int = 0, max_pending_bytes: int = 0) -> None:
        self.max_open_per_tenant = max_open_per_tenant
        self.max_pending_bytes = max_pending_bytes
        #: bytes declared by the headers of the open Puts
        self.pending_bytes = 0
        #: bytes of payload the open Puts have received so far (what they hold in memory)
        self.received_bytes = 0
        self._open: Counter[str] = Counter()

    def open_puts(self, tenant: str) -> int:
        """Put streams ``tenant`` has open now."""
        return self._open[tenant]

    def stats(self) -> dict[str, int]:
        """Counters for ``Stats``: ``put_pending_bytes``, ``put_received_bytes``, ``puts_open``."""
        return {"put_pending_bytes": self.pending_bytes, "put_received_bytes": self.received_bytes,
                "puts_open": sum(self._open.values())}

    def reserve(self, tenant: str, declared: int) -> PutHold:
        """Count one open Put of ``tenant`` declaring ``declared`` bytes until the hold is released.

        :raises QuotaExceeded: when the tenant has ``max_open_per_tenant`` Puts open already, or the
            declared bytes would take the open Puts past ``max_pending_bytes``; nothing is held then.
        """
        if self.max_open_per_tenant and self._open[tenant] >= self.max_open_per_tenant:
            raise QuotaExceeded(f"tenant has {self.max_open_per_tenant} Put streams open, the most allowed "
                                "(server.max_open_puts_per_tenant); finish or cancel one first",
                                subject=f"tenant:{tenant}:open_puts")
        if self.max_pending_bytes and self.pending_bytes + declared > self.max_pending_bytes:
            raise QuotaExceeded(f"the header declares {declared} bytes; open Puts hold {self.pending_bytes} of the "
                                f"server's {self.max_pending_bytes} (server.put_pending_bytes); retry later or "
                                "split the Put", subject="server:put_pending_bytes")
        self._open[tenant] += 1
        self.pending_bytes += declared
        return PutHold(self, tenant, declared)

    def release(self, hold: PutHold) -> None:
        """Give back what :meth:`reserve` counted for ``hold`` (call :meth:`PutHold.release`, which does it once)."""
        self.received_bytes -= hold.received
        self.pending_bytes -= hold.declared
        self._open[hold.tenant] -= 1
        if not self._open[hold.tenant]:
            del self._open[hold.tenant]

    @contextlib.contextmanager
    def hold(self, tenant: str, declared: int) -> Iterator[Callable[[int], None]]:
        """:meth:`reserve` for the ``with`` block (a Put stream's life).

        :returns: (as the ``with`` target) :meth:`PutHold.arrived`, to call with each chunk's size.
        :raises QuotaExceeded: as :meth:`reserve`.
        """
        held = self.reserve(tenant, declared)
        try:
            yield held.arrived
        finally:
            held.release()


class PutHold:
    """One open Put's place in a :class:`PutBudget` (from :meth:`PutBudget.reserve`). Event loop only."""

    __slots__ = ("_budget", "tenant", "declared", "received")

    def __init__(self, budget: PutBudget, tenant: str, declared: int) -> None:
        self._budget = budget
        self.tenant = tenant
        self.declared = declared
        self.received = 0

    def arrived(self, n: int) -> None:
        """``n`` more payload bytes of this Put arrived (``PutBudget.received_bytes`` counts them)."""
        self.received += n
        self._budget.received_bytes += n

    def release(self) -> None:
        """Give the place back (idempotent)."""
        if self._budget is not None:
            budget, self._budget = self._budget, None
            budget.release(self)
